"""The optimizer recipe by value: warmup, clipping, AdamW, EMA and the release's summed-
gradient clipping, against the release's own pieces run in PyTorch.

The release (train.py) sums the gradients of its micro-batches (12 per GPU), clips that sum
at global norm 2.0 (`if grad_norm > grad_clip: scale_grad(model, grad_clip / grad_norm)`),
steps `torch.optim.AdamW` and then `transformers.get_constant_schedule_with_warmup`. Ours
(`training.state.make_optimizer` / `learning_rate`, used by `training.step`) must give the
same parameters: checked on their own, and through the real jitted train step with a stand-in
objective whose gradient is known (gradient = s · D for a fixed unit direction D, s set by
the batch), so that the step's accumulation, scaling, clipping, AdamW and EMA are what is
tested. Tolerance: 1e-6 of the largest parameter (float32 arithmetic on values of order 1);
each test also shows that dropping the clip moves the result by more than 100× that.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from unialign_jax.training import objective
from unialign_jax.runs.config import OptimizerConfig
from unialign_jax.training.state import learning_rate, make_optimizer, update_ema

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-6


def release_run(params: list[np.ndarray], grads: list[list[np.ndarray]], cfg: OptimizerConfig,
                clip: bool = True) -> list[list[np.ndarray]]:
    """The release's optimizer loop over `grads` (per step, per parameter: the gradient as the
    release holds it, i.e. summed over micro-batches); the parameters after each step."""
    tensors = [torch.tensor(p, dtype=torch.float32, requires_grad=True) for p in params]
    opt = torch.optim.AdamW(tensors, lr=cfg.lr, betas=(cfg.b1, cfg.b2), eps=cfg.eps,
                            weight_decay=cfg.weight_decay)
    sched = transformers.get_constant_schedule_with_warmup(opt,
                                                           num_warmup_steps=cfg.warmup_steps)
    out = []
    for step_grads in grads:
        for t, g in zip(tensors, step_grads):
            t.grad = torch.tensor(g, dtype=torch.float32)
        norm = sum(float(t.grad.norm(dtype=torch.float32)) ** 2 for t in tensors) ** 0.5
        if clip and norm > cfg.grad_clip_norm:
            for t in tensors:
                t.grad.mul_(cfg.grad_clip_norm / norm)
        opt.step()
        sched.step()
        out.append([t.detach().numpy().copy() for t in tensors])
    return out


def max_rel_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    scale = max(float(np.abs(x).max()) for x in b)
    return max(float(np.abs(np.asarray(x, np.float64) - y).max()) for x, y in zip(a, b)) / scale


# -- the optimizer on its own ---------------------------------------------------------------

def test_lr_is_linear_warmup_then_constant_as_the_release_scheduler():
    cfg = OptimizerConfig(lr=3e-5, warmup_steps=2000)
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    release = transformers.get_constant_schedule_with_warmup(opt, num_warmup_steps=2000)
    schedule = learning_rate(cfg)
    for step in (0, 1, 1000, 1999, 2000, 2001, 80_000):
        closed_form = 3e-5 * min(step / 2000, 1.0)
        assert float(schedule(step)) == pytest.approx(closed_form, rel=1e-6, abs=1e-12)
        assert release.lr_lambdas[0](step) * 3e-5 == pytest.approx(closed_form, rel=1e-12)
    no_warmup = learning_rate(dataclasses.replace(cfg, warmup_steps=0))
    assert float(no_warmup(0)) == float(no_warmup(5000)) == pytest.approx(3e-5)


@pytest.mark.parametrize("warmup", [0, 100])
def test_cosine_decay_option_is_transformers_cosine_schedule_with_warmup(warmup):
    """Not the release's recipe (constant after warmup) but an option: `cosine_end_step`
    E decays as `get_cosine_schedule_with_warmup(num_training_steps=E)`, 0 after E."""
    cfg = OptimizerConfig(lr=1e-3, warmup_steps=warmup, cosine_end_step=2000)
    opt = torch.optim.AdamW([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    reference = transformers.get_cosine_schedule_with_warmup(
        opt, num_warmup_steps=warmup, num_training_steps=2000).lr_lambdas[0]
    schedule = learning_rate(cfg)
    for step in (0, 1, 50, 99, 100, 101, 700, 1500, 1999, 2000):
        assert float(schedule(step)) == pytest.approx(1e-3 * reference(step), rel=1e-5,
                                                      abs=1e-10), step
    assert float(schedule(2000)) == float(schedule(2500)) == 0.0


def tiny_tree(seed=0):
    rng = np.random.default_rng(seed)
    return {"a": rng.normal(size=(3,)).astype(np.float32),
            "b": {"w": rng.normal(size=(2, 2)).astype(np.float32)}}


def scaled_to(tree, norm):
    leaves = jax.tree.leaves(tree)
    total = np.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in leaves))
    return jax.tree.map(lambda x: (x * (norm / total)).astype(np.float32), tree)


def run_ours(cfg, params, grads):
    tx = make_optimizer(cfg)
    state, p, out = tx.init(params), params, []
    for g in grads:
        updates, state = tx.update(g, state, p)
        p = jax.tree.map(lambda x, u: x + u, p, updates)
        out.append([np.asarray(x) for x in jax.tree.leaves(p)])
    return out


def test_clipping_applies_exactly_above_the_threshold_by_threshold_over_norm():
    """Global norms 3 (clipped to 2), 1.5 (kept), 5 (clipped), 2 (at the threshold): each
    step equals AdamW on g·min(1, 2/‖g‖), the release's clip; warmup makes the lr vary."""
    cfg = OptimizerConfig(lr=0.05, warmup_steps=2, weight_decay=0.01, grad_clip_norm=2.0)
    params = tiny_tree(0)
    grads = [scaled_to(tiny_tree(s), n) for s, n in ((1, 3.0), (2, 1.5), (3, 5.0), (4, 2.0))]
    ours = run_ours(cfg, params, grads)
    release = release_run(jax.tree.leaves(params), [jax.tree.leaves(g) for g in grads], cfg)
    for k, (a, b) in enumerate(zip(ours, release)):
        assert max_rel_diff(a, b) < TOL, f"step {k}"
    # The clip matters here: AdamW without it ends elsewhere.
    unclipped = release_run(jax.tree.leaves(params), [jax.tree.leaves(g) for g in grads], cfg,
                            clip=False)
    assert max_rel_diff(ours[-1], unclipped[-1]) > 100 * TOL


def test_ema_after_k_steps_of_constant_params_is_the_closed_form():
    p, e0, decay = tiny_tree(5), tiny_tree(6), 0.9
    ema = e0
    for k in range(1, 8):
        ema = update_ema(ema, p, decay)
        for got, pk, ek in zip(jax.tree.leaves(ema), jax.tree.leaves(p), jax.tree.leaves(e0)):
            want = pk + (ek.astype(np.float64) - pk) * decay ** k
            np.testing.assert_allclose(np.asarray(got), want, rtol=TOL, atol=TOL)


# -- through the real train step ------------------------------------------------------------

MICRO = 12             # the release's micro-batches per GPU (local batch 48 / 4)
# Per optimizer step, the mean over micro-batches of s (the mean gradient's norm): the
# summed gradient's norm is 12× that, so ±1.0 and 0.2 are clipped (12, 2.4 > 2.0) and 0.15,
# 0.05 are not (1.8, 0.6) — on the mean, the threshold is 2/12 ≈ 0.167.
MEAN_S = (1.0, 0.05, -1.0, 0.2, 0.15, 0.05)


def known_gradient_loss(direction):
    """A stand-in objective s · <params, D>, s the micro-batch's mean pixel: its gradient
    is s · D (D = `direction`, a tree like the parameters)."""
    def loss_fn(transformer, t5, vae, batch, null_context, key, cfg, mask_id, groups=None):
        params = nnx.to_pure_dict(nnx.state(transformer, nnx.Param))
        dots = jax.tree.map(lambda p, d: jnp.vdot(p, d), params, direction)
        loss = jnp.mean(batch["target"]) * sum(jax.tree.leaves(dots))
        return loss, {"loss": loss}

    return loss_fn


@pytest.fixture(scope="module")
def tiny_models():
    """The train step's three models, small and random (drawn on the host: far cheaper than
    `build_models`' jitted initialisers; the stand-in objective reads no weights)."""
    from test_sampling_pipeline import random_module
    from unialign_configs import load
    from unialign_jax import configlib
    from unialign_jax.models.mmdit import MMDiT
    from unialign_jax.models.t5 import T5Encoder
    from unialign_jax.models.vae import AutoencoderKL
    from unialign_jax.parallel import make_mesh, replicated
    from unialign_jax.runs.builder import SplitModel
    from unialign_jax.training.step import FrozenModels

    cfg = configlib.apply_overrides(load("tiny"), ["models.transformer.vocab_size=64"])
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    place = lambda state: jax.device_put(nnx.to_pure_dict(state), replicated(mesh))  # noqa

    def split(build, seed, trained=False):
        module = random_module(build, seed)
        if trained:
            graphdef, params, rest = nnx.split(module, nnx.Param, ...)
            return SplitModel(graphdef, place(params), place(rest))
        graphdef, state = nnx.split(module)
        return SplitModel(graphdef, {}, place(state))

    m = cfg.models
    models = {"transformer": split(lambda: MMDiT(m.transformer, rngs=nnx.Rngs(0)), 1, True),
              "t5": split(lambda: T5Encoder(m.t5, rngs=nnx.Rngs(0)), 2),
              "vae": split(lambda: AutoencoderKL(m.vae, rngs=nnx.Rngs(0)), 3)}
    frozen = FrozenModels.of(models, jax.device_put(np.ones((1, 8), np.int32),
                                                    replicated(mesh)))
    rng = np.random.default_rng(7)
    direction = scaled_to(jax.tree.map(lambda x: rng.normal(size=x.shape).astype(np.float32),
                                       models["transformer"].params), 1.0)
    return cfg, mesh, models, frozen, direction


def train_step(tiny_models, monkeypatch, optimizer: OptimizerConfig):
    from unialign_jax.training.step import make_train_step

    cfg, mesh, models, frozen, direction = tiny_models
    monkeypatch.setattr(objective, "micro_batch_loss", known_gradient_loss(direction))
    run = dataclasses.replace(cfg.run, batch_size=MICRO, micro_batch_per_device=1)
    step = make_train_step(models, frozen, mesh, optimizer=optimizer, loss=cfg.loss,
                           run=run, mask_id=63)
    assert step.num_micro == MICRO
    return step


def row_values(mean_s: float) -> np.ndarray:
    """s of each of the 12 rows (one row per micro-batch), spread around their mean."""
    return mean_s + 0.01 * (np.arange(MICRO) - (MICRO - 1) / 2)


def batch_of(mean_s: float, step) -> dict:
    """12 rows, row m a constant image of value s_m."""
    target = np.broadcast_to(row_values(mean_s)[:, None, None, None], (MICRO, 16, 16, 3))
    ids = np.zeros((MICRO, 8), np.int32)
    return step.put_batch({"target": target.astype(np.float32), "caption_ids": ids,
                           "instruction_ids": ids})


def test_train_step_reproduces_the_release_sum_then_clip_at_2(tiny_models, monkeypatch):
    """gradient_scale 12 (configs/unialignment_512.py): our mean gradient × 12 is the
    release's sum, clipped at 2.0 — on the mean, at 2/12 — then AdamW, warmup, EMA."""
    optimizer = OptimizerConfig(lr=1e-2, warmup_steps=2, grad_clip_norm=2.0,
                                gradient_scale=float(MICRO), ema_decay=0.9)
    step = train_step(tiny_models, monkeypatch, optimizer)
    frozen, direction = tiny_models[3], jax.tree.leaves(tiny_models[4])
    state = step.init()
    initial = [np.asarray(x) for x in jax.tree.leaves(state.params)]
    sums = [float(np.sum(row_values(mean))) for mean in MEAN_S]
    release = release_run(initial, [[s * d for d in direction] for s in sums], optimizer)

    ema = [x.astype(np.float64) for x in initial]
    for k, mean in enumerate(MEAN_S):
        state, metrics = step.step(state, frozen, batch_of(mean, step))
        params = [np.asarray(x) for x in jax.tree.leaves(state.params)]
        assert max_rel_diff(params, release[k]) < TOL, f"step {k}"
        # The grad norm reported is the release's (of the sum, before clipping); the lr is
        # the one this update used.
        assert float(metrics["grad_norm"]) == pytest.approx(abs(sums[k]), rel=1e-5)
        assert float(metrics["lr"]) == pytest.approx(1e-2 * min(k / 2, 1.0), rel=1e-6)
        ema = [0.9 * e + 0.1 * p.astype(np.float64) for e, p in zip(ema, release[k])]
        assert max_rel_diff(jax.tree.leaves(state.ema_params), ema) < TOL, f"EMA step {k}"

    # Clipping the mean at 2.0 (gradient_scale 1) would almost never clip: another result.
    unclipped = release_run(initial, [[s * d for d in direction] for s in sums], optimizer,
                            clip=False)
    assert max_rel_diff(params, unclipped[-1]) > 100 * TOL


def test_train_step_ema_of_constant_params_is_the_closed_form(tiny_models, monkeypatch):
    """lr 0 keeps the parameters; from an EMA of zeros, e_k = p + (0 − p)·decay^k."""
    decay = 0.8
    step = train_step(tiny_models, monkeypatch,
                      OptimizerConfig(lr=0.0, warmup_steps=0, ema_decay=decay))
    state = step.init()
    p = [np.asarray(x, np.float64) for x in jax.tree.leaves(state.params)]
    state = state.replace(ema_params=jax.tree.map(jnp.zeros_like, state.ema_params))
    for k in range(1, 5):
        state, _ = step.step(state, tiny_models[3], batch_of(0.3, step))
        want = [x * (1.0 - decay ** k) for x in p]
        assert max_rel_diff(jax.tree.leaves(state.params), p) == 0.0
        assert max_rel_diff(jax.tree.leaves(state.ema_params), want) < TOL, f"step {k}"
