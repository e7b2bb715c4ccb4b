"""LoRA training through the real CLI (`unialign-train ... lora.rank=4`, the tiny config on
the synthetic corpus, over a random bf16 base): the loss falls; the train state, its
optimizer moments and the checkpoints hold only the factors; everything else of the model
is the trainer's own base draw, bit for bit; resuming is exact; `export-lora` writes a file
that diffusers' PEFT loading applies to the base as our loader of the run does."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx, traverse_util

from test_from_run import shared_cache
from test_train_resume import _metrics
from test_train_resume import _train as train
from test_train_resume import corpus  # noqa: F401  (module fixture: shards + tokenizer)
from unialign_convert import cli as convert_cli
from unialign_jax.runs import work_dir as training_runs
from unialign_jax.models import lora
from unialign_jax.parallel import make_mesh
from unialign_jax.text.tokenizer import load_tokenizer
from unialign_jax.runs.config import TrainConfig
from unialign_jax.runs.builder import build_models

STEPS = 60
LORA = ("lora.rank=4", "lora.alpha=8", "lora.base_dtype=bfloat16", "optimizer.lr=1e-2",
        f"run.num_steps={STEPS}", f"run.ckpt_every={STEPS // 2}", "run.log_every=1")
RTOL = 1e-4  # float32: ours vs PyTorch


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):  # noqa: F811
    """A LoRA run, its config and the trainer's own models built from it (the reference
    for the frozen base)."""
    corpus = shared_cache(corpus, tmp_path_factory)
    workdir = tmp_path_factory.mktemp("lora") / "train"
    train(corpus, workdir, *LORA)
    cfg = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    models = build_models(cfg.models, cfg.compute, make_mesh(),
                          len(load_tokenizer(cfg.models.tokenizer)), seed=cfg.run.seed,
                          lora=cfg.lora)
    return {"workdir": workdir, "cfg": cfg, "models": models, "corpus": corpus}


@pytest.fixture(scope="module")
def loaded(run):
    """The run's transformer as `load_pipeline(WORKDIR)`, `from-run` and `export` read it
    (`training_runs.transformer_module`, raw weights of the last step): its base with the
    factors merged in."""
    workdir = str(run["workdir"])
    config = training_runs.read_run_config(workdir)
    vocab = len(training_runs.run_tokenizer(workdir, config))
    return training_runs.transformer_module(
        workdir, STEPS, "raw", training_runs.model_config(workdir, "transformer", vocab, config),
        config=config)


def saved_state(workdir, step):
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def flat(tree):
    return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


def test_loss_falls_and_only_the_factors_are_trained_and_saved(run):
    losses = [m["loss"] for m in _metrics(run["workdir"])]
    assert len(losses) == STEPS
    assert np.mean(losses[-20:]) < 0.85 * np.mean(losses[:10]), losses

    cfg = run["cfg"]
    assert cfg.lora.base is None  # resolved: no transformer folder, the seed's random init
    state = saved_state(run["workdir"], STEPS)
    adapted = {("blocks", "attn", n) for n in ("to_q", "to_k", "to_v", "to_out", "add_q_proj",
                                                "add_k_proj", "add_v_proj", "to_add_out")}
    for tree in (state["params"], state["ema_params"], state["opt_state"][1][0]["mu"],
                 state["opt_state"][1][0]["nu"]):
        paths = set(flat(tree))
        assert {p[-1] for p in paths} == set(lora.FACTORS)
        assert {p[:-1] for p in paths} == adapted
    leaves = jax.tree_util.tree_leaves_with_path(state)
    base_like = [jax.tree_util.keystr(p) for p, _ in leaves if "kernel" in jax.tree_util.keystr(p)]
    assert base_like == [], "no base tensor is saved"
    assert flat(state["params"])[("blocks", "attn", "to_q", "lora_b")].any(), "B trained"


def test_everything_but_the_factors_is_the_base_bit_for_bit(run, loaded):
    """The run's model as the loader gives it (base + scale·A·B) against the trainer's own
    base draw and the saved factors."""
    cfg, models = run["cfg"], run["models"]
    frozen = flat(models["transformer"].rest)
    assert frozen[("blocks", "attn", "to_q", "kernel")].dtype == jnp.bfloat16
    loaded = flat(nnx.to_pure_dict(nnx.state(loaded)))
    factors = flat(saved_state(run["workdir"], STEPS)["params"])
    assert set(loaded) == set(frozen)
    for path, base in frozen.items():
        expected = base.astype(np.float32)
        if path[:-1] + ("lora_a",) in factors and path[-1] == "kernel":
            a, b = factors[path[:-1] + ("lora_a",)], factors[path[:-1] + ("lora_b",)]
            expected = expected + cfg.lora.scale * (a @ b)
            np.testing.assert_allclose(loaded[path], expected, rtol=1e-6, atol=1e-6,
                                       err_msg=str(path))
        else:
            np.testing.assert_array_equal(loaded[path], expected, err_msg=str(path))


def test_resume_continues_the_run_exactly(run, tmp_path):
    """A copy of the run stopped after its middle checkpoint, rerun to the end."""
    resumed = tmp_path / "resumed"
    shutil.copytree(run["workdir"], resumed)
    shutil.rmtree(resumed / "checkpoints" / str(STEPS))
    proc = train(run["corpus"], resumed, *LORA)
    assert f"resuming from step {STEPS // 2}" in proc.stdout + proc.stderr
    a, b = ({jax.tree_util.keystr(p): np.asarray(x)
             for p, x in jax.tree_util.tree_leaves_with_path(saved_state(w, STEPS))}
            for w in (run["workdir"], resumed))
    assert a.keys() == b.keys()
    for key, value in a.items():
        np.testing.assert_array_equal(value, b[key], err_msg=key)
    assert _metrics(resumed) == _metrics(run["workdir"])


def test_export_lora_applies_in_pytorch_as_we_load_the_run(run, loaded, tmp_path,
                                                          monkeypatch):
    """The LoRA file, loaded in PyTorch exactly as the README's block shows, into its base
    exported under the name the README uses."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("peft")
    from test_export_torch_route import readme_python
    from unialign_convert.export import write_export

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "qs_lora.safetensors"
    assert convert_cli.main(["export-lora", str(run["workdir"]), str(path), "--raw"]) == 0
    assert (tmp_path / "qs_lora.safetensors.produced_by.json").exists()  # the README says so
    written = (path.read_bytes(), os.stat(path).st_mtime_ns)
    # The same command again is a no-op (a retry loop reruns everything); other options
    # against the same file are an error.
    assert convert_cli.main(["export-lora", str(run["workdir"]), str(path), "--raw"]) == 0
    assert (path.read_bytes(), os.stat(path).st_mtime_ns) == written
    assert convert_cli.main(["export-lora", str(run["workdir"]), str(path)]) == 2
    base = run["models"]["transformer"]  # the frozen base: every variable but the factors
    os.makedirs(tmp_path / "exported" / "qs_base")
    write_export("transformer", base.module().config, jax.tree.map(np.asarray, base.rest),
                 str(tmp_path / "exported" / "qs_base"))
    user = {}
    exec(readme_python('load_lora_adapter("qs_lora.safetensors"'), user)
    torch_model = user["transformer"]
    assert len(torch_model.peft_config) == 1

    ours = loaded
    cfg = ours.config
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((2, cfg.in_channels, 8, 8), dtype=np.float32)
    context = rng.standard_normal((2, 6, cfg.joint_attention_dim), dtype=np.float32)
    timestep = np.array([900.0, 20.0], np.float32)
    with torch.no_grad():
        sample, logits, *_ = torch_model(torch.from_numpy(latents),
                                         encoder_hidden_states=torch.from_numpy(context),
                                         timestep=torch.from_numpy(timestep))
    out = ours(jnp.asarray(latents.transpose(0, 2, 3, 1)), jnp.asarray(timestep),
               jnp.asarray(context))
    for mine, theirs in ((np.asarray(out.sample).transpose(0, 3, 1, 2), sample.numpy()),
                         (np.asarray(out.text_logits), logits.numpy())):
        assert np.abs(mine - theirs).max() / np.abs(theirs).max() <= RTOL


def test_export_lora_refuses_what_a_lora_file_cannot_hold(run, tmp_path, capsys):
    assert convert_cli.main(["export-lora", str(run["workdir"]), str(tmp_path)]) == 2
    assert "is a folder, not a file" in capsys.readouterr().err
    with_full = tmp_path / "with_full"
    shutil.copytree(run["workdir"], with_full)
    config = json.loads((with_full / "config.json").read_text())
    config["lora"]["train_also"] = ["text_proj_out.*"]
    (with_full / "config.json").write_text(json.dumps(config))
    assert convert_cli.main(["export-lora", str(with_full), str(tmp_path / "x.st")]) == 2
    assert "also trained full tensors" in capsys.readouterr().err
    config["lora"]["rank"] = 0
    (with_full / "config.json").write_text(json.dumps(config))
    assert convert_cli.main(["export-lora", str(with_full), str(tmp_path / "x.st")]) == 2
    assert "is not a LoRA run" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x.st")
