"""Evaluation while training (`run.eval_every`): the held-out eval loss at fixed timesteps and
noise — the same numbers after a restart and on 1 or 8 devices — and the validation samples
(PNGs, grid, settings, TensorBoard images).

The corpus and the `unialign-train` runner are tests/test_train_resume.py's. The mesh check
runs in a subprocess (this file as a script), as tests/test_parallel_equivalence.py does:
the device count is fixed before JAX starts.
"""

import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from test_train_resume import _env, _metrics, _train, corpus  # noqa: F401 (a fixture)

# Two meshes sum the same float32 terms in another order (as the train step's check).
TOLERANCE = 1e-5


def test_eval_draws_put_every_row_on_the_fixed_grid():
    """Row i at timestep grid[i mod 8] exactly (through the trainer's own timestep map),
    no null prompt even at p = 1, caption times at the centres of their strata."""
    import jax
    import jax.numpy as jnp

    from unialign_jax.diffusion import flow, masked
    from unialign_jax.training import evaluation

    grid = evaluation.timestep_grid()
    assert grid.tolist() == [62, 187, 312, 437, 562, 687, 812, 937]
    draws = evaluation.eval_draws(jax.random.key(0), (20, 2, 2, 4), 8)
    _, timesteps = flow.training_timesteps(draws.flow_logit_normal)
    np.testing.assert_array_equal(np.asarray(timesteps), np.resize(grid, 20))
    assert not bool(jnp.any(draws.null_prompt_uniform < 1.0))
    times = masked.antithetic_times(draws.caption_time_uniform, 0.0)
    np.testing.assert_allclose(np.asarray(times), (np.arange(20) + 0.5) / 20, rtol=1e-6)
    again = evaluation.eval_draws(jax.random.key(0), (20, 2, 2, 4), 8)
    np.testing.assert_array_equal(np.asarray(draws.flow_noise), np.asarray(again.flow_noise))


def test_eval_needs_what_it_evaluates_and_the_reverse():
    from unialign_configs import load
    from unialign_jax import configlib

    base = ["models.tokenizer=/tok", "data.tasks={'t2i': ('/t2i',)}"]

    def problems(*overrides):
        cfg = configlib.apply_overrides(load("tiny"), [*base, *overrides])
        try:
            cfg.validate()
        except ValueError as e:
            return str(e)
        return ""

    assert problems("run.eval_every=10", "data.eval_tasks={'t2i': '/held'}") == ""
    assert "nothing to evaluate" in problems("run.eval_every=10")
    assert "run.eval_every is 0" in problems("run.validation_prompts=/p.txt")
    assert "unknown tasks ['t2l']" in problems("run.eval_every=1", "data.eval_tasks={'t2l': '/x'}")
    assert "run.eval_batches must be at least 1" in problems(
        "run.eval_every=1", "data.eval_tasks={'t2i': '/x'}", "run.eval_batches=0")


def _prompts_file(corpus, folder) -> str:
    """A text-to-image prompt and an edit of a 32 px image (the sampler's smallest input)."""
    from PIL import Image

    source = Image.open(corpus["root"] / "synth" / "images" / "edit_000000_source.png")
    source.resize((32, 32), Image.NEAREST).save(folder / "source.png")
    path = folder / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "a red circle"}) + "\n"
                    + json.dumps({"prompt": "make the red square cyan", "image": "source.png",
                                  "seed": 7}) + "\n")
    return str(path)


def _eval_rows(workdir):
    return [{k: v for k, v in m.items() if k == "step" or k.startswith("eval/")}
            for m in _metrics(workdir) if any(k.startswith("eval/") for k in m)]


def _tensorboard_tags(folder) -> dict[str, set]:
    """{tag: kinds of value ('simple_value', 'image')} of every event file in `folder` (the
    TFRecord framing read by hand: length, its CRC, the Event, its CRC)."""
    from tensorboardX.proto import event_pb2

    tags = {}
    for name in os.listdir(folder):
        data = open(os.path.join(folder, name), "rb").read()
        at = 0
        while at < len(data):
            (length,) = struct.unpack("<Q", data[at:at + 8])
            event = event_pb2.Event.FromString(data[at + 12:at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                tags.setdefault(value.tag, set()).add(value.WhichOneof("value"))
    return tags


def test_eval_loss_survives_a_restart_and_validation_writes_samples(corpus, tmp_path):
    """Eval at steps 2 and 4 of a straight run (with validation samples) and of a run
    restarted at step 2 (without them): the same eval losses, bit for bit."""
    eval_tasks = "data.eval_tasks=" + repr({t: (str(corpus["root"] / t),)
                                            for t in ("t2i", "edit")})
    common = ("run.eval_every=2", "run.eval_batches=2", eval_tasks)
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(corpus, straight, "run.num_steps=4", *common, "run.tensorboard=True",
           f"run.validation_prompts={_prompts_file(corpus, tmp_path)}",
           "run.validation_steps=2")
    _train(corpus, resumed, "run.num_steps=2", *common)
    _train(corpus, resumed, "run.num_steps=4", *common)

    rows = _eval_rows(straight)
    assert [r["step"] for r in rows] == [2, 4]
    assert rows == _eval_rows(resumed)
    for term in ("loss", "loss_image", "loss_caption", "loss_contrastive"):
        for key in (f"eval/{term}", f"eval/t2i/{term}", f"eval/edit/{term}"):
            assert np.isfinite(rows[0][key]) and rows[0][key] > 0, key
    # The mean over both tasks' batches (two each).
    assert rows[0]["eval/loss"] == pytest.approx(
        (rows[0]["eval/t2i/loss"] + rows[0]["eval/edit/loss"]) / 2)
    # The weights moved between the evals, so did the loss.
    assert rows[0]["eval/loss"] != rows[1]["eval/loss"]

    for step in (2, 4):
        folder = straight / "validation" / str(step)
        assert sorted(os.listdir(folder)) == ["00000.png", "00001.png", "grid.png",
                                              "validation.json"]
        settings = json.loads((folder / "validation.json").read_text())
        assert settings["step"] == step and settings["weights"] == "ema"
        assert [(i["prompt"], i["seed"], len(i["images"])) for i in settings["items"]] == [
            ("a red circle", 0, 0), ("make the red square cyan", 7, 1)]
    assert not (resumed / "validation").exists()
    tags = _tensorboard_tags(straight / "tensorboard")
    assert tags["validation/00000"] == tags["validation/00001"] == {"image"}
    assert tags["eval/loss"] == {"simple_value"}


def test_a_bad_validation_item_stops_the_run_before_training(corpus, tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "x", "images": ["a.png"] * 4}) + "\n")
    proc = subprocess.run(
        [sys.executable, "-m", "unialign_jax.training.cli", "--config", "tiny", "--workdir",
         str(tmp_path / "run"), f"models.tokenizer={corpus['root'] / 'tokenizer'}",
         f"data.t2i_shards=('{corpus['root'] / 't2i'}',)", "run.eval_every=2",
         f"run.validation_prompts={path}"],
        env=_env(corpus), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2
    assert "item 0: 4 condition images; the model takes at most 3" in proc.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def eval_on_mesh(root: str, mesh_shape, devices) -> dict:
    """The eval loss of the initial weights on `mesh_shape` (t2i and composition batches)."""
    import jax
    from unialign_configs import load
    from unialign_jax import configlib
    from unialign_jax.parallel import make_mesh, replicated
    from unialign_jax.text.tokenizer import load_tokenizer, mask_token_id, tokenize
    from unialign_jax.training import evaluation
    from unialign_jax.runs.builder import build_models
    from unialign_jax.training.step import FrozenModels, make_train_step

    cfg = configlib.apply_overrides(load("tiny"), [
        f"models.tokenizer={root}/tokenizer", f"data.tasks={{'t2i': ('{root}/t2i',)}}",
        f"data.eval_tasks={{'t2i': ('{root}/t2i',), 'compose': ('{root}/compose',)}}",
        "run.eval_every=1", "run.eval_batches=2", "run.micro_batch_per_device=1"])
    mesh = make_mesh(*mesh_shape, devices=devices)
    tokenizer = load_tokenizer(cfg.models.tokenizer)
    models = build_models(cfg.models, cfg.compute, mesh, len(tokenizer), seed=cfg.run.seed)
    frozen = FrozenModels.of(models, jax.device_put(
        tokenize(tokenizer, [" "], cfg.data.max_length), replicated(mesh)))
    trainer = make_train_step(models, frozen, mesh, optimizer=cfg.optimizer, loss=cfg.loss,
                              run=cfg.run, mask_id=mask_token_id(tokenizer))
    state = trainer.init()
    evaluator = evaluation.evaluator(cfg, trainer, models, mask_token_id(tokenizer))
    first = evaluator(state.ema_params, frozen)
    assert evaluator(state.ema_params, frozen) == first  # the same weights, the same numbers
    return first


def worker(root: str) -> dict:
    import jax

    assert jax.device_count() == 8, jax.devices()
    return {"one": eval_on_mesh(root, (1, 1, 1), jax.devices()[:1]),
            "eight": eval_on_mesh(root, (2, 4, 1), jax.devices())}


def test_eval_loss_is_the_same_on_one_and_eight_devices(corpus):
    env = dict(_env(corpus), XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                                       "--xla_backend_optimization_level=0")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), str(corpus["root"])],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    one, eight = result["one"], result["eight"]
    assert set(one) == set(eight)
    assert {"eval/loss", "eval/t2i/loss_image", "eval/compose/loss_contrastive"} <= set(one)
    worst = max(abs(one[k] - eight[k]) for k in one if k != "eval/seconds")
    assert worst <= TOLERANCE, (worst, one, eight)
    assert one["eval/loss_contrastive"] > 0 and one["eval/loss_caption"] > 0


if __name__ == "__main__":
    print(json.dumps(worker(sys.argv[1])))
