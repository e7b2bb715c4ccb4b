"""Train state (step, parameters, AdamW state, EMA, PRNG), the optimizer, and shardings."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct
from jax.sharding import Mesh

from unialign_jax.parallel import rules
from unialign_jax.runs.config import OptimizerConfig


@struct.dataclass
class TrainState:
    step: jax.Array        # int32 scalar: optimizer updates done
    params: Any            # trained transformer parameters (nested dict, param_dtype)
    opt_state: Any         # optax state: clipping + AdamW moments
    ema_params: Any        # exponential moving average of `params` (None: no EMA)
    rng: jax.Array         # uint32 PRNG key data, split once per step


def learning_rate(cfg: OptimizerConfig) -> optax.Schedule:
    """Linear warmup from 0 over `warmup_steps`, then constant (the release's
    `get_constant_schedule_with_warmup`): the update of step s (0-based) uses
    lr·min(s / warmup, 1); with `cosine_end_step` E, after the warmup it is
    lr·(1 + cos(π·min((s − warmup) / (E − warmup), 1))) / 2 instead."""
    warmup, end = cfg.warmup_steps, cfg.cosine_end_step

    def schedule(count):
        # lr·(s / warmup) directly: optax.linear_schedule's lr − lr·(1 − s / warmup) loses
        # ~1e-4 of the early values to float32 cancellation.
        factor = jnp.minimum(count / warmup, 1.0) if warmup else jnp.ones_like(count, float)
        if end:
            done = jnp.clip((count - warmup) / (end - warmup), 0.0, 1.0)
            factor = jnp.where(count < warmup, factor, 0.5 * (1.0 + jnp.cos(jnp.pi * done)))
        return cfg.lr * factor

    if not (warmup or end):
        return optax.constant_schedule(cfg.lr)
    return schedule


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
    """Global-norm clipping, then AdamW with torch's defaults (decoupled weight decay on all
    parameters, as torch.optim.AdamW)."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip_norm),
        optax.adamw(learning_rate(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                    weight_decay=cfg.weight_decay))


def init_state(params: Any, optimizer: optax.GradientTransformation, seed: int,
               ema: bool) -> TrainState:
    """Step 0: fresh optimizer moments, EMA = the initial parameters."""
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=optimizer.init(params),
                      ema_params=jax.tree.map(jnp.copy, params) if ema else None,
                      rng=jax.random.key_data(jax.random.key(seed)))


def update_ema(ema: Any, params: Any, decay: float) -> Any:
    """e ← decay·e + (1 − decay)·p."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, ema, params)


def state_shardings(abstract_state: TrainState, param_shardings: Any,
                    optimizer: optax.GradientTransformation, mesh: Mesh) -> TrainState:
    """Parameters, EMA and the optimizer's per-parameter moments sharded like the
    parameters; counters and the PRNG replicated."""
    repl = rules.replicated(mesh)
    opt = optax.tree_map_params(optimizer, lambda _, s: s, abstract_state.opt_state,
                                param_shardings, transform_non_params=lambda _: repl)
    return TrainState(step=repl, params=param_shardings, opt_state=opt,
                      ema_params=None if abstract_state.ema_params is None else param_shardings,
                      rng=repl)
