"""The train step on 8 simulated CPU devices (mesh data=2 × fsdp=4) equals the 1-device
step, and parameters / optimizer state / EMA are really sharded.

The check runs in a subprocess (this file as a script) because the device count must be
fixed before JAX starts, and pytest runs every module in one process.
"""

import json
import os
import subprocess
import sys

import numpy as np

TOLERANCE = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(**overrides):
    import dataclasses
    from unialign_jax.training.config import load_config

    cfg = load_config(os.path.join(REPO, "configs", "tiny.py"))
    transformer = dict(cfg.transformer, vocab_size=64)
    return dataclasses.replace(cfg, transformer=transformer, batch_size=16,
                               tokenizer="unused", t2i_shards=("unused",), **overrides)


def edit_batch(seed=0):
    """An editing batch (one source image: the image pass has condition tokens) with
    teacher rows, so every loss term is active; the text-to-image path is its subset."""
    rng = np.random.default_rng(seed)
    return {"target": rng.uniform(-1, 1, (16, 16, 16, 3)).astype(np.float32),
            "sources": rng.uniform(-1, 1, (16, 1, 16, 16, 3)).astype(np.float32),
            "caption_ids": rng.integers(0, 63, (16, 8)).astype(np.int32),
            "instruction_ids": rng.integers(0, 63, (16, 8)).astype(np.int32),
            "teacher_image": rng.normal(size=(16, 40)).astype(np.float32),
            "teacher_text": rng.normal(size=(16, 40)).astype(np.float32)}


def run(mesh_shape, devices):
    import jax
    from unialign_jax.parallel import make_mesh
    from unialign_jax.training.models import build_models
    from unialign_jax.training.step import TrainStep

    mesh = make_mesh(*mesh_shape, devices=devices)
    per_device = 16 // 2 // (mesh.shape["data"] * mesh.shape["fsdp"])  # 2 micro-batches
    cfg = tiny_config(micro_batch_per_device=per_device)
    trainer = TrainStep(build_models(cfg, mesh, None), cfg, mesh, mask_id=63,
                        null_ids=np.ones((1, 8), np.int32))
    assert trainer.num_micro == 2
    state = trainer.init_state()
    initial = jax.device_get(state.params)
    state, m = trainer.step(state, trainer.frozen, trainer.put_batch(edit_batch()))
    return state, initial, [{k: float(v) for k, v in jax.device_get(m).items()}]


def _max_diff(a, b):
    import jax
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def worker() -> dict:
    import jax
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    one, one_init, one_metrics = run((1, 1, 1), jax.devices()[:1])
    many, many_init, many_metrics = run((2, 4, 1), jax.devices())

    kernel = many.params["blocks"]["ff"]["proj_in"]["kernel"]        # (layers, embed, mlp)
    mu = many.opt_state[1][0].mu["blocks"]["ff"]["proj_in"]["kernel"]
    ema = many.ema_params["blocks"]["ff"]["proj_in"]["kernel"]
    sharded_leaves = sum(1 for x in jax.tree.leaves(many.params)
                         if x.addressable_shards[0].data.size < x.size)
    return {
        "init_diff": _max_diff(one_init, jax.device_get(many_init)),
        "param_diff": _max_diff(jax.device_get(one.params), jax.device_get(many.params)),
        "opt_diff": _max_diff(jax.device_get(one.opt_state), jax.device_get(many.opt_state)),
        "ema_diff": _max_diff(jax.device_get(one.ema_params), jax.device_get(many.ema_params)),
        "metric_diff": max(abs(a[k] - b[k]) for a, b in zip(one_metrics, many_metrics)
                           for k in a),
        "metrics": many_metrics,
        "param_change": _max_diff(many_init, jax.device_get(many.params)),
        "kernel_spec": str(kernel.sharding.spec), "mu_spec": str(mu.sharding.spec),
        "ema_spec": str(ema.sharding.spec),
        "kernel_shard_shape": list(kernel.addressable_shards[0].data.shape),
        "kernel_shape": list(kernel.shape),
        "sharded_leaves": sharded_leaves, "num_leaves": len(jax.tree.leaves(many.params)),
        "fsdp_spec_ok": kernel.sharding.spec == P(None, "fsdp", None),
    }


def test_eight_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                                     "--xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    # Same initialisation, same losses and update (2 accumulated micro-batches) on both.
    assert result["init_diff"] == 0.0
    assert result["metric_diff"] <= TOLERANCE, result
    assert result["param_diff"] <= TOLERANCE, result
    assert result["opt_diff"] <= TOLERANCE, result
    assert result["ema_diff"] <= TOLERANCE, result
    # The step did something: parameters moved and every loss term is active.
    assert result["param_change"] > 1e-4
    for m in result["metrics"]:
        for k in ("loss_image", "loss_caption", "loss_contrastive", "loss_align_text",
                  "loss_align_image"):
            assert m[k] > 0, (k, m)
    # Parameters, AdamW moments and EMA are FSDP-sharded: 'embed' split over fsdp = 4.
    assert result["fsdp_spec_ok"], result["kernel_spec"]
    assert result["mu_spec"] == result["kernel_spec"] == result["ema_spec"]
    assert result["kernel_shard_shape"][1] * 4 == result["kernel_shape"][1]
    assert result["sharded_leaves"] > result["num_leaves"] // 2


if __name__ == "__main__":
    print(json.dumps(worker()))
