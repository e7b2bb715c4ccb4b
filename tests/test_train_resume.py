"""Checkpoints through the real CLI (`unialign-train`) on a built synthetic corpus:
exact resume (parameters, optimizer, EMA, PRNG, data position) and SIGTERM preemption.

Each run is a fresh process, as a restart is; a persistent compilation cache shared by
the runs keeps the repeated compiles cheap.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from unialign_jax.training.trainer import TIMING_METRICS as TIMING_KEYS

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Synthetic shapes (t2i, edit, compose), built into 16 px shards, and a tiny T5
    tokenizer."""
    from unialign_jax.data import cli as data_cli
    from unialign_jax.data.build.synth import corpus_texts
    from unialign_jax.text.tokenizer import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("corpus")
    assert data_cli.main(["synth", "--out", str(root / "synth"), "--n", "24",
                          "--size", "16"]) == 0
    for kind in ("t2i", "edit", "compose"):
        assert data_cli.main(["build", "--jsonl", str(root / "synth" / f"{kind}_train.jsonl"),
                              "--kind", kind, "--out", str(root / kind), "--resolution", "16",
                              "--image-format", "raw", "--threads", "1"]) == 0
    train_tiny_tokenizer(corpus_texts(), root / "tokenizer", vocab_size=60)
    return {"root": root, "cache": str(root / "jax_cache")}


def _command(corpus, workdir, *overrides):
    return [sys.executable, "-m", "unialign_jax.training.cli",
            "--config", "tiny", "--workdir", str(workdir),
            f"models.tokenizer={corpus['root'] / 'tokenizer'}",
            f"data.t2i_shards=('{corpus['root'] / 't2i'}',)",
            f"data.edit_shards=('{corpus['root'] / 'edit'}',)", *overrides]


def _all_tasks(corpus) -> str:
    """The mapping form of the task mix, with composition (replaces the two-task mix that
    `_command` gives through the older keys)."""
    return "data.tasks=" + repr({task: (str(corpus["root"] / task),)
                                 for task in ("t2i", "edit", "compose")})


def _env(corpus):
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_backend_optimization_level=0",
                UNIALIGN_JAX_COMPILATION_CACHE=corpus["cache"],
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _train(corpus, workdir, *overrides):
    proc = subprocess.run(_command(corpus, workdir, *overrides), env=_env(corpus),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _restore_state(workdir, step):
    """The raw arrays of a saved train state (no target: exactly what is on disk)."""
    import orbax.checkpoint as ocp

    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _data_state(workdir, step):
    folder = os.path.join(workdir, "checkpoints", str(step), "data")
    return {name: open(os.path.join(folder, name)).read() for name in sorted(os.listdir(folder))
            if name.startswith("process_")}


def _assert_same_state(a, b):
    """Two restored train states are the same tree with bit-identical arrays."""
    import jax

    assert jax.tree.structure(a) == jax.tree.structure(b)
    for path, x in jax.tree_util.tree_leaves_with_path(a):
        y = b
        for key in path:
            y = y[key.key] if hasattr(key, "key") else y[key.idx]
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                      err_msg=jax.tree_util.keystr(path))


def test_resume_is_exact(corpus, tmp_path):
    """Three tasks (t2i, edit, compose, t2i): the resumed run starts at the composition
    batch."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tasks = _all_tasks(corpus)
    _train(corpus, straight, "run.num_steps=4", tasks)
    _train(corpus, resumed, "run.num_steps=2", tasks)
    assert sorted(os.listdir(resumed / "checkpoints")) == ["2"]
    second = _train(corpus, resumed, "run.num_steps=4", tasks)
    assert "resuming from step 2" in second.stdout + second.stderr

    a, b = _restore_state(straight, 4), _restore_state(resumed, 4)
    _assert_same_state(a, b)
    assert int(np.asarray(a["step"])) == 4
    assert _metrics(straight) == _metrics(resumed)
    assert [m["step"] for m in _metrics(resumed)] == [1, 2, 3, 4]
    assert _data_state(straight, 4) == _data_state(resumed, 4) != {}
    # Four different batches (t2i, edit, compose, t2i): the data position really advanced.
    losses = [m["loss_image"] for m in _metrics(straight)]
    assert len(set(losses)) == 4


def test_every_task_reaches_the_step_with_its_condition_images(corpus, tmp_path, monkeypatch):
    """The trainer's batches, as the jitted step receives them: text-to-image without
    sources, editing with 1, composition with the 3 its shards were built with. (The step
    itself is not run here — compiling its three shapes in-process is slow on CI; the
    exact-resume test above trains all three through it.)"""
    from unialign_configs import load
    from unialign_jax import configlib
    from unialign_jax.training import trainer

    seen, make_step = [], trainer.make_train_step

    def spy(*args, **kwargs):
        made = make_step(*args, **kwargs)

        def step(state, frozen, batch):
            seen.append(None if "sources" not in batch else tuple(batch["sources"].shape))
            return state, {"loss": np.float32(0.0), "nonfinite": np.float32(0.0)}

        return dataclasses.replace(made, step=step)

    monkeypatch.setattr(trainer, "make_train_step", spy)
    cfg = configlib.apply_overrides(load("tiny"), [
        f"models.tokenizer={corpus['root'] / 'tokenizer'}", _all_tasks(corpus),
        "data.task_weights={'t2i': 2}", "run.num_steps=4", "run.ckpt_every=100"])
    trainer.train(cfg, str(tmp_path / "run"), echo=lambda _: None)
    # Weights 2 : 1 : 1 cycle as t2i, edit, t2i, compose.
    assert seen == [None, (8, 1, 16, 16, 3), None, (8, 3, 16, 16, 3)]


def test_logged_throughput_is_model_flops(corpus, tmp_path):
    """Each log row's model TFLOP/s per chip is its samples/s times the mean FLOPs per
    sample of the task mix (three text-to-image batches per editing batch here), as
    `training.flops` counts."""
    from unialign_configs import load
    from unialign_jax.text.tokenizer import load_tokenizer
    from unialign_jax.training import flops

    _train(corpus, tmp_path, "run.num_steps=2", "data.task_weights=(3.0,1.0)")
    cfg = load("tiny")
    vocab = len(load_tokenizer(str(corpus["root"] / "tokenizer")))
    transformer = dataclasses.replace(cfg.models.transformer, vocab_size=vocab)
    per_sample = [flops.sample_flops(transformer, cfg.models.t5, cfg.models.vae, flops.StepShape(
        cfg.data.resolution, cfg.data.max_length, edits))["total"] for edits in (0, 1)]
    with open(tmp_path / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        np.testing.assert_allclose(row["model_tflops_per_chip"],
                                   row["samples_per_s"] * (3 * per_sample[0] + per_sample[1])
                                   / 4 / 1e12, rtol=1e-9)
        assert "mfu" not in row  # no known peak for a CPU


def _stop_while_training(corpus, workdir, signum):
    """Starts a long run in its own process group, waits for its first logged step, then
    signals the group as a terminal's Ctrl-C does (data workers included)."""
    proc = subprocess.Popen(_command(corpus, workdir, "run.num_steps=100000",
                                     "run.ckpt_every=100000", "data.workers=1"),
                            env=_env(corpus), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.exists() and metrics.read_text().strip()):
        assert proc.poll() is None, proc.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "training never logged a step"
        time.sleep(0.5)
    os.killpg(proc.pid, signum)
    output, _ = proc.communicate(timeout=300)
    return proc.returncode, output


@pytest.mark.parametrize("signum,code,said", [(signal.SIGTERM, 143, "preempted at step"),
                                              (signal.SIGINT, 130, "interrupted at step")])
def test_a_signal_leaves_a_checkpoint_that_resumes_exactly(corpus, tmp_path, signum, code,
                                                           said):
    """SIGTERM (a preemption) and Ctrl-C (SIGINT to the whole process group) both finish the
    step, save, exit with 128 + the signal and say so in one line, with no traceback; the
    rerun resumes to the same bits as a run that was never stopped."""
    workdir = tmp_path / "stopped"
    returncode, output = _stop_while_training(corpus, workdir, signum)
    assert returncode == code, output[-4000:]
    assert said in output and "Traceback" not in output, output[-4000:]
    with Image.open(workdir / "loss_curves.png") as curves:  # drawn when a run stops, too
        assert curves.format == "PNG"
    steps = [int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()]
    assert len(steps) == 1 and steps[0] >= 1, steps
    saved = steps[0]
    assert int(np.asarray(_restore_state(workdir, saved)["step"])) == saved
    assert max(m["step"] for m in _metrics(workdir)) >= saved

    rerun = _train(corpus, workdir, f"run.num_steps={saved + 1}", "data.workers=1")
    assert f"resuming from step {saved}" in rerun.stdout + rerun.stderr
    assert [m["step"] for m in _metrics(workdir)][-1] == saved + 1
    straight = tmp_path / "straight"
    _train(corpus, straight, f"run.num_steps={saved + 1}", f"run.ckpt_every={saved + 1}",
           "data.workers=1")
    _assert_same_state(_restore_state(workdir, saved + 1), _restore_state(straight, saved + 1))
