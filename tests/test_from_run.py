"""From a training run to a pipeline: `load_pipeline(WORKDIR)`, `unialign-sample --ckpt
WORKDIR` and `unialign-convert from-run` on a tiny run trained here (4 steps, checkpoints at
2 and 4). Expected weights come from the Orbax train state read directly and from the
trainer's own model builder (the random frozen T5 / VAE), never from the reader tested.
"""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

import unialign_jax
from test_train_resume import _train as train
from test_train_resume import corpus  # noqa: F401  (module fixture: shards + tokenizer)
from unialign_convert import cli as convert_cli
from unialign_jax.checkpoints.io import CheckpointError
from unialign_jax.sampling import cli as sample_cli
from unialign_jax.sampling.preprocess import InputError

PROMPT = "a red circle"


@pytest.fixture(scope="module")
def run(corpus, tmp_path_factory):  # noqa: F811
    """A tiny run trained by `unialign-train` (as test_train_resume runs it, sharing its
    compilation cache): (work dir, the trainer's own models built from its config.json —
    the reference for the random frozen T5 / VAE)."""
    from unialign_jax.parallel import make_mesh
    from unialign_jax.text.tokenizer import load_tokenizer
    from unialign_jax.runs.config import TrainConfig
    from unialign_jax.runs.builder import build_models

    workdir = tmp_path_factory.mktemp("run") / "train"
    train(shared_cache(corpus, tmp_path_factory), workdir, "run.num_steps=4", "run.ckpt_every=2")
    cfg = TrainConfig.from_dict(json.loads((workdir / "config.json").read_text()))
    models = build_models(cfg.models, cfg.compute, make_mesh(),
                          len(load_tokenizer(cfg.models.tokenizer)), seed=cfg.run.seed)
    return str(workdir), models


def shared_cache(corpus, tmp_path_factory):  # noqa: F811
    """`corpus` with a compilation cache shared by every module of the session that trains
    the tiny config (the programs are the same)."""
    return dict(corpus, cache=str(tmp_path_factory.getbasetemp() / "tiny_train_jax_cache"))


def saved(workdir, step, key):
    """`key` ('params' / 'ema_params') of a saved train state, exactly as on disk."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))[key]


def leaves(tree):
    return [(jax.tree_util.keystr(p), np.asarray(x))
            for p, x in jax.tree_util.tree_leaves_with_path(tree)]


def assert_trees_equal(a, b):
    a, b = leaves(a), leaves(b)
    assert [p for p, _ in a] == [p for p, _ in b]
    for (path, x), (_, y) in zip(a, b):
        assert x.dtype == y.dtype, path
        np.testing.assert_array_equal(x, y, err_msg=path)


def state(module, *filters):
    return nnx.to_pure_dict(nnx.state(module, *filters))


def test_work_dir_loads_with_its_latest_ema_weights_and_the_runs_frozen_models(run):
    workdir, models = run
    pipe = unialign_jax.load_pipeline(workdir, batch_size=1, progress=False)
    c = pipe.components
    assert_trees_equal(state(c.transformer, nnx.Param), saved(workdir, 4, "ema_params"))
    # the run's random frozen models, redrawn: the trainer's own arrays
    assert_trees_equal(state(c.t5), models["t5"].rest)
    assert_trees_equal(state(c.vae), models["vae"].rest)
    assert_trees_equal(state(c.transformer, nnx.Not(nnx.Param)), models["transformer"].rest)
    assert c.tokenizer.pad_token == "</s>"  # the run trained padding with </s>
    image = pipe.generate([PROMPT], height=16, width=32, num_steps=2, seed=3)[0]
    assert image.size == (32, 16) and image.mode == "RGB"

    raw = unialign_jax.load_pipeline(workdir, step=2, weights="raw", progress=False)
    assert_trees_equal(state(raw.components.transformer, nnx.Param),
                       saved(workdir, 2, "params"))


def test_from_run_folder_holds_what_the_work_dir_loads(run, tmp_path):
    workdir, _ = run
    for weights, flags, step, key in (("ema", [], 4, "ema_params"),
                                      ("raw", ["--raw", "--step", "2"], 2, "params")):
        dst = tmp_path / weights
        assert convert_cli.main(["from-run", workdir, str(dst), *flags]) == 0
        index = json.loads((dst / "pipeline.json").read_text())
        assert index["training_run"] == {"run": workdir, "step": step, "weights": weights}
        assert index["frozen"]["t5"] == {"seed": 1, "param_dtype": "float32"}
        folder = unialign_jax.load_pipeline(str(dst), progress=False).components
        direct = unialign_jax.load_pipeline(workdir, step=step, weights=weights,
                                            progress=False).components
        assert_trees_equal(state(folder.transformer, nnx.Param), saved(workdir, step, key))
        for part in ("transformer", "t5", "vae"):
            assert_trees_equal(state(getattr(folder, part)), state(getattr(direct, part)))
        # inference pads with the folder's pad token: the folder keeps the run's </s>
        assert folder.tokenizer.pad_token == "</s>" and len(folder.tokenizer) == index[
            "vocab_size"]
        assert folder.scheduler == direct.scheduler == {"shift": 3.0,
                                                       "num_train_timesteps": 1000}
        # prompts are sampled at the run's training length, not the release's 256; images
        # at its resolution; the negative prompt is the null prompt it dropped to
        trained = json.loads(open(os.path.join(workdir, "config.json")).read())
        assert trained["data"]["max_length"] != 256 and trained["data"]["resolution"] != 512
        assert (index["text_length"], index["resolution"], index["negative_prompt"]) == (
            trained["data"]["max_length"], trained["data"]["resolution"], " ")
        assert folder.trained_with == direct.trained_with
        assert folder.trained_with.text_length == trained["data"]["max_length"]


def test_sample_cli_takes_a_work_dir_and_records_the_weights(run, tmp_path, caplog):
    workdir, _ = run
    common = ["t2i", "--ckpt", workdir, "--prompt", PROMPT, "--height", "16", "--width", "16",
              "--steps", "2", "--no-progress", "--no-compilation-cache"]
    assert sample_cli.main([*common, "--out", str(tmp_path / "a")]) == 0
    # Reading one item of a training step is not a missing file (Orbax warned that it was).
    assert "Metadata file does not exist" not in caplog.text
    sidecar = json.loads((tmp_path / "a" / "00000.json").read_text())
    assert sidecar["training_run"] == {"run": workdir, "step": 4, "weights": "ema"}
    trained = json.loads(open(os.path.join(workdir, "config.json")).read())
    assert sidecar["text_length"] == trained["data"]["max_length"]
    assert (tmp_path / "a" / "00000.png").exists()
    assert sample_cli.main([*common, "--out", str(tmp_path / "b"), "--step", "2",
                            "--weights", "raw"]) == 0
    sidecar = json.loads((tmp_path / "b" / "00000.json").read_text())
    assert sidecar["training_run"] == {"run": workdir, "step": 2, "weights": "raw"}


def test_bad_choices_name_what_exists(run, tmp_path):
    workdir, _ = run
    with pytest.raises(CheckpointError, match=r"no checkpoint of step 3; saved steps: \[2, 4\]"):
        unialign_jax.load_pipeline(workdir, step=3)
    with pytest.raises(CheckpointError, match="pipeline.json"):
        unialign_jax.load_pipeline(str(tmp_path))
    assert convert_cli.main(["from-run", str(tmp_path), str(tmp_path / "dst")]) == 2
    assert not (tmp_path / "dst").exists()
    dst = tmp_path / "pipe"
    assert convert_cli.main(["from-run", workdir, str(dst)]) == 0
    with pytest.raises(InputError, match="not a training work dir"):
        unialign_jax.load_pipeline(str(dst), step=2)


def test_a_loaded_pipeline_saves_as_a_folder_that_loads_the_same(run, tmp_path):
    workdir, _ = run
    pipe = unialign_jax.load_pipeline(workdir, progress=False)
    pipe.save_pretrained(str(tmp_path / "saved"))
    again = unialign_jax.load_pipeline(str(tmp_path / "saved"), progress=False).components
    for part in ("transformer", "t5", "vae"):
        assert_trees_equal(state(getattr(again, part)), state(getattr(pipe.components, part)))
    assert again.tokenizer.pad_token == "</s>" and again.scheduler == pipe.components.scheduler
