"""The sharded train step: gradient accumulation over micro-batches (a `scan`), clipping,
AdamW and EMA, all inside one `jit` with explicit in/out shardings.

`make_train_step` builds it from the models, the frozen state and the config sections it
needs; the result is data (`TrainStep`: the jitted function, the state's shardings and
abstract shape, the number of micro-batches). The global batch of `batch_size` rows, split
over data × fsdp, is viewed as (micro-batch, accumulation) with the accumulation axis
*second*, so that every device keeps its own rows, each micro-batch is spread over all
devices (no resharding), and within a micro-batch each device holds one consecutive block
of rows — the release's per-GPU micro-batch, over which it contrasts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unialign_jax.data.read.batch_spec import model_inputs
from unialign_jax.parallel import rules
from unialign_jax.parallel.mesh import BATCH_AXES
from unialign_jax.parallel.placement import put_host_batch
from unialign_jax.training import objective
from unialign_jax.runs.config import LossConfig, OptimizerConfig, RunConfig
from unialign_jax.runs.builder import SplitModel
from unialign_jax.training.state import (TrainState, init_state, learning_rate, make_optimizer,
                                         state_shardings, update_ema)


@struct.dataclass
class FrozenModels:
    """What the step reads but never trains: the transformer's buffers, T5 and the VAE (as
    states of their graph definitions), and the null prompt's ids."""

    buffers: Any
    t5: Any
    vae: Any
    null_ids: jax.Array   # (1, L) int32, or a ShapeDtypeStruct when planning

    @classmethod
    def of(cls, models: dict[str, SplitModel], null_ids) -> "FrozenModels":
        return cls(buffers=models["transformer"].rest, t5=models["t5"].rest,
                   vae=models["vae"].rest, null_ids=null_ids)


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """`step(state, frozen, batch)` → (new state, metrics); `init()` → step 0's state."""

    step: Callable
    init: Callable[[], TrainState]
    abstract_state: TrainState
    state_shardings: TrainState
    batch_sharding: NamedSharding
    num_micro: int
    mesh: Mesh

    def put_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows of the global batch → global arrays split over data × fsdp."""
        return put_host_batch(model_inputs(host_batch), self.mesh)


def accumulation_steps(run: RunConfig, mesh: Mesh) -> int:
    """Micro-batches per optimizer step: batch_size / (micro_batch_per_device × batch
    devices)."""
    ways = rules.batch_ways(mesh)
    micro = run.micro_batch_per_device * ways
    if run.batch_size % micro:
        raise ValueError(f"run.batch_size {run.batch_size} is not a multiple of the global "
                         f"micro-batch {micro} (run.micro_batch_per_device "
                         f"{run.micro_batch_per_device} × {ways} devices on data × fsdp)")
    return run.batch_size // micro


def make_train_step(models: dict[str, SplitModel], frozen: FrozenModels, mesh: Mesh, *,
                    optimizer: OptimizerConfig, loss: LossConfig, run: RunConfig,
                    mask_id: int) -> TrainStep:
    """The jitted step for `models` on `mesh`. `frozen` may hold arrays or (for planning)
    ShapeDtypeStructs with shardings: only its placement is read here."""
    tx = make_optimizer(optimizer)
    schedule = learning_rate(optimizer)
    num_micro = accumulation_steps(run, mesh)
    groups = objective.Groups.for_mesh(loss, rules.batch_ways(mesh))
    graphdefs = {k: m.graphdef for k, m in models.items()}
    placement = lambda tree: jax.tree.map(lambda x: x.sharding, tree)  # noqa: E731
    param_shardings = placement(models["transformer"].params)
    use_ema = optimizer.ema_decay is not None

    def init(params) -> TrainState:
        return init_state(params, tx, run.seed, ema=use_ema)

    abstract = jax.eval_shape(init, models["transformer"].params)
    shardings = state_shardings(abstract, param_shardings, tx, mesh)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            abstract, shardings)
    batch_sharding = rules.batch_sharding(mesh)
    micro_spec = NamedSharding(mesh, P(None, BATCH_AXES))

    def split_micro_batches(batch: dict) -> dict:
        """(A·M, ...) → (A, M, ...) with row m·A + a in micro-batch a (device-local view)."""
        def split(x):
            x = x.reshape((x.shape[0] // num_micro, num_micro) + x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, micro_spec)

        return jax.tree.map(split, batch)

    def step(state: TrainState, frozen: FrozenModels, batch: dict):
        t5 = nnx.merge(graphdefs["t5"], frozen.t5)
        vae = nnx.merge(graphdefs["vae"], frozen.vae)
        rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        null_context = jax.lax.stop_gradient(t5(frozen.null_ids))

        def loss_fn(params, micro, key):
            transformer = nnx.merge(graphdefs["transformer"], params, frozen.buffers)
            return objective.micro_batch_loss(transformer, t5, vae, micro, null_context, key,
                                              loss, mask_id, groups)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry, xs):
            index, micro = xs
            (_, terms), grads = grad_fn(state.params, micro, jax.random.fold_in(step_key, index))
            grads = jax.lax.with_sharding_constraint(grads, param_shardings)
            grad_sum, term_sum = carry
            return (jax.tree.map(jnp.add, grad_sum, grads),
                    jax.tree.map(jnp.add, term_sum, terms)), None

        micro = split_micro_batches(batch)
        first = jax.tree.map(lambda x: x[0], micro)
        term_zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                                  jax.eval_shape(loss_fn, state.params, first, step_key)[1])
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (grads, terms), _ = jax.lax.scan(accumulate, (zeros, term_zeros),
                                         (jnp.arange(num_micro), micro))
        # The optimizer sees the mean gradient × gradient_scale (the release: the sum).
        grads = jax.tree.map(lambda g: g * (optimizer.gradient_scale / num_micro), grads)
        terms = jax.tree.map(lambda t: t / num_micro, terms)

        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = (update_ema(state.ema_params, params, optimizer.ema_decay) if use_ema
               else None)
        grad_norm = optax.tree.norm(grads)
        # Non-finite guard: such a step keeps the old parameters, moments and EMA (the
        # batch is consumed and the step counted); the trainer stops after
        # run.max_nonfinite_steps of them in a row.
        finite = jnp.isfinite(terms["loss"]) & jnp.isfinite(grad_norm)
        params, opt_state, ema = jax.tree.map(
            lambda new, old: jnp.where(finite, new, old), (params, opt_state, ema),
            (state.params, state.opt_state, state.ema_params))
        metrics = {**terms, "grad_norm": grad_norm, "lr": schedule(state.step),
                   "nonfinite": 1.0 - finite.astype(jnp.float32)}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                          ema_params=ema, rng=jax.random.key_data(rng)), metrics

    jitted = jax.jit(step, in_shardings=(shardings, placement(frozen), batch_sharding),
                     out_shardings=(shardings, rules.replicated(mesh)), donate_argnums=0)
    return TrainStep(
        step=jitted, init=lambda: jax.jit(init, out_shardings=shardings)(
            models["transformer"].params),
        abstract_state=abstract, state_shardings=shardings, batch_sharding=batch_sharding,
        num_micro=num_micro, mesh=mesh)
