"""The train step on 8 simulated CPU devices (mesh data=2 × fsdp=4) equals the 1-device
step, and parameters / optimizer state / EMA are really sharded.

What "equals" may mean is set by the arithmetic. The two meshes sum the same float32 terms
in another order, so losses and gradients agree to a few float32 roundings of their scale
(`TOLERANCE`, relative to each tensor's largest gradient). AdamW's first step moves a
parameter by lr · g / (|g| + eps): about lr wherever |g| ≫ eps, whatever |g| is, so a
rounding difference in a near-zero gradient can move a parameter by a large fraction of lr.
The update is therefore compared where |g| is well above eps (`CONFIDENT_GRADIENT`), where
that ratio is fixed by the arithmetic too.

The check runs in a subprocess (this file as a script) because the device count must be
fixed before JAX starts, and pytest runs every module in one process.
"""

import json
import os
import subprocess
import sys

import numpy as np

TOLERANCE = 1e-5
# |g| above which AdamW's first update lr·g/(|g| + eps) is insensitive to a summation-order
# difference δ in g: its change is about lr·δ·eps/g², ≤ 1e-6·lr for δ ≤ 1e-8 here.
CONFIDENT_GRADIENT = 1e-5
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(*overrides):
    from unialign_jax import configlib
    from unialign_configs import load

    return configlib.apply_overrides(load("tiny"), [
        "models.transformer.vocab_size=64", "run.batch_size=16", *overrides])


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


def run(mesh_shape, devices, *overrides):
    import jax
    from unialign_jax.parallel import make_mesh, replicated
    from unialign_jax.runs.builder import build_models
    from unialign_jax.training.step import FrozenModels, make_train_step

    mesh = make_mesh(*mesh_shape, devices=devices)
    per_device = 16 // 2 // (mesh.shape["data"] * mesh.shape["fsdp"])  # 2 micro-batches
    cfg = tiny_config(f"run.micro_batch_per_device={per_device}", *overrides)
    models = build_models(cfg.models, cfg.compute, mesh, None, seed=cfg.run.seed)
    frozen = FrozenModels.of(models, jax.device_put(np.ones((1, 8), np.int32),
                                                    replicated(mesh)))
    trainer = make_train_step(models, frozen, mesh, optimizer=cfg.optimizer, loss=cfg.loss,
                              run=cfg.run, mask_id=63)
    assert trainer.num_micro == 2
    state = trainer.init()
    initial = jax.device_get(state.params)
    state, m = trainer.step(state, frozen, trainer.put_batch(edit_batch()))
    return state, initial, [{k: float(v) for k, v in jax.device_get(m).items()}]


def contrastive_scopes() -> dict:
    """The objective with explicit draws on a batch split over 8 devices: "device" scopes
    (one group per device, as the release contrasts and stratifies per GPU) and "global"."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
    from unialign_jax.parallel import ActivationSharding, batch_sharding, batch_ways, make_mesh
    from unialign_jax.training import objective
    from unialign_jax.runs.config import LossConfig

    mesh = make_mesh(2, 4, 1)
    groups = objective.Groups.for_mesh(LossConfig(), batch_ways(mesh))
    rng = np.random.default_rng(3)
    b = 16
    inputs = objective.Inputs(
        latents=jnp.asarray(rng.normal(size=(b, 8, 8, 16)), jnp.float32),
        caption_latents=jnp.asarray(rng.normal(size=(b, 8, 8, 16)), jnp.float32),
        conditions=(), instruction_ids=jnp.asarray(rng.integers(0, 60, (b, 8)), jnp.int32),
        caption_ids=jnp.asarray(rng.integers(0, 60, (b, 8)), jnp.int32))
    draws = objective.Draws.sample(jax.random.key(5), (b, 8, 8, 16), 8)
    null = jnp.zeros((1, 8, 32))
    t5 = lambda ids: jnp.tanh(ids[..., None].astype(jnp.float32) / 7 + jnp.arange(32) / 9)

    def contrastive(model, inputs, draws, groups):
        return objective.objective(model, t5, inputs, draws, null, LossConfig(block_depth=1),
                                   63, groups)[1]["loss_contrastive"]

    config = MMDiTConfig.tiny(vocab_size=64)
    single = MMDiT(config, rngs=nnx.Rngs(0))
    sharded = MMDiT(config, rngs=nnx.Rngs(0), activation_sharding=ActivationSharding(mesh))
    put = lambda tree: jax.device_put(tree, batch_sharding(mesh))
    whole = objective.Groups()
    on_mesh = nnx.jit(contrastive, static_argnums=3)(sharded, put(inputs), put(draws), groups)
    per_block = [float(contrastive(single, *jax.tree.map(lambda x: x[d * 2:(d + 1) * 2],
                                                         (inputs, draws)), whole))
                 for d in range(8)]
    return {"groups": [groups.contrastive, groups.antithetic], "device_scope": float(on_mesh),
            "mean_of_blocks": float(np.mean(per_block)),
            "global_on_mesh": float(nnx.jit(contrastive, static_argnums=3)(
                sharded, put(inputs), put(draws), whole)),
            "global_one_device": float(contrastive(single, inputs, draws, whole))}


def _max_diff(a, b):
    import jax
    return max(float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_relative_diff(a, b):
    """max over tensors of max|a − b| / max|a|: each tensor against its own scale."""
    import jax
    return max(float(np.max(np.abs(x - y)) / max(np.max(np.abs(x)), 1e-30))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _first_moment_gradients(state, b1):
    """The (clipped, scaled) gradient of the first step, read back from AdamW's first moment
    m = (1 − b1)·g."""
    import jax
    mu = state.opt_state[1][0].mu
    return jax.tree.map(lambda m: np.asarray(m, np.float64) / (1 - b1), jax.device_get(mu))


def _confident_update_diff(init, one, many, grads, scale):
    """max |Δp_one − Δp_many| / scale over the entries whose gradient is well above eps,
    less one float32 rounding of the stored parameter (an update differing in its last
    digits may round the parameter to the neighbouring float32)."""
    import jax
    worst = 0.0
    for p0, p1, p8, g in zip(*(jax.tree.leaves(t) for t in (init, one, many, grads))):
        mask = np.abs(g) > CONFIDENT_GRADIENT
        if mask.any():
            rounding = np.spacing(np.abs(np.asarray(p1, np.float32))).astype(np.float64)
            d1 = np.asarray(p1, np.float64) - np.asarray(p0, np.float64)
            d8 = np.asarray(p8, np.float64) - np.asarray(p0, np.float64)
            excess = np.maximum(np.abs(d1 - d8) - rounding, 0.0)
            worst = max(worst, float(np.max(excess[mask])) / scale)
    return worst


def worker() -> dict:
    import jax
    from jax.sharding import PartitionSpec as P

    assert jax.device_count() == 8, jax.devices()
    # With both scopes global the objective does not depend on the mesh.
    whole = ("loss.contrastive_scope=global", "loss.antithetic_scope=global")
    one, one_init, one_metrics = run((1, 1, 1), jax.devices()[:1], *whole)
    many, many_init, many_metrics = run((2, 4, 1), jax.devices(), *whole)

    kernel = many.params["blocks"]["ff"]["proj_in"]["kernel"]        # (layers, embed, mlp)
    mu = many.opt_state[1][0].mu["blocks"]["ff"]["proj_in"]["kernel"]
    ema = many.ema_params["blocks"]["ff"]["proj_in"]["kernel"]
    sharded_leaves = sum(1 for x in jax.tree.leaves(many.params)
                         if x.addressable_shards[0].data.size < x.size)
    b1 = tiny_config().optimizer.b1
    one_grads, many_grads = (_first_moment_gradients(s, b1) for s in (one, many))
    confident = sum(int((np.abs(g) > CONFIDENT_GRADIENT).sum()) for g in jax.tree.leaves(one_grads))
    lr = one_metrics[0]["lr"]
    return {
        "init_diff": _max_diff(one_init, jax.device_get(many_init)),
        "grad_diff": _max_relative_diff(one_grads, many_grads),
        "update_diff": _confident_update_diff(one_init, jax.device_get(one.params),
                                              jax.device_get(many.params), one_grads, lr),
        "ema_update_diff": _confident_update_diff(one_init, jax.device_get(one.ema_params),
                                                  jax.device_get(many.ema_params), one_grads,
                                                  lr * (1 - tiny_config().optimizer.ema_decay)),
        "confident_fraction": confident / sum(g.size for g in jax.tree.leaves(one_grads)),
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
        "contrastive": contrastive_scopes(),
    }


def test_eight_devices_match_one_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                                     "--xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])

    # Same initialisation, same losses, gradients and update (2 accumulated micro-batches).
    assert result["init_diff"] == 0.0
    assert result["metric_diff"] <= TOLERANCE, result
    assert result["grad_diff"] <= TOLERANCE, result
    # The update, in units of lr, where the gradient fixes it (most entries: the comparison
    # covers the model, not a corner of it).
    assert result["confident_fraction"] > 0.5, result
    assert result["update_diff"] <= TOLERANCE, result
    assert result["ema_update_diff"] <= TOLERANCE, result
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
    # Contrastive scope: "device" on 8 devices = the mean of the 8 per-device losses, each
    # computed alone; "global" on 8 devices = the whole batch on one device.
    c = result["contrastive"]
    assert c["groups"] == [8, 8]
    np.testing.assert_allclose(c["device_scope"], c["mean_of_blocks"], rtol=1e-5)
    np.testing.assert_allclose(c["global_on_mesh"], c["global_one_device"], rtol=1e-5)
    assert abs(c["device_scope"] - c["global_one_device"]) > 1e-3


if __name__ == "__main__":
    print(json.dumps(worker()))
