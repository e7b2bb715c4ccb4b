"""The sharded train step: gradient accumulation over micro-batches (a `scan`), global-norm
clipping, AdamW and EMA, all inside one `jit` with explicit in/out shardings.

The global batch of `batch_size` rows, split over data × fsdp, is viewed as
(micro-batch, accumulation) with the accumulation axis *second*, so that every device
keeps its own rows and each micro-batch is spread over all devices (no resharding).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unialign_jax.parallel import rules
from unialign_jax.parallel.mesh import BATCH_AXES
from unialign_jax.training import objective
from unialign_jax.training.models import SplitModel
from unialign_jax.training.state import (TrainState, init_state, learning_rate, make_optimizer,
                                         state_shardings)


def batch_devices(mesh: Mesh) -> int:
    return int(np.prod([mesh.shape[a] for a in BATCH_AXES]))


def accumulation_steps(cfg, mesh: Mesh) -> int:
    """Micro-batches per optimizer step: batch_size / (micro_batch_per_device × batch
    devices); the global micro-batch is what the contrastive loss contrasts within."""
    micro = cfg.micro_batch_per_device * batch_devices(mesh)
    if cfg.batch_size % micro:
        raise ValueError(f"batch_size {cfg.batch_size} is not a multiple of the global "
                         f"micro-batch {micro} (micro_batch_per_device "
                         f"{cfg.micro_batch_per_device} × {batch_devices(mesh)} devices on "
                         "data × fsdp)")
    return cfg.batch_size // micro


def _placement(tree: Any) -> Any:
    return jax.tree.map(lambda x: x.sharding, tree)


class TrainStep:
    """Builds the train state and the jitted step for `models` on `mesh`.

    `step(state, frozen, batch)` → (new state, metrics) where `frozen` holds the frozen
    weights (`self.frozen`) and `batch` is a dict of global arrays (see `put_batch`).
    """

    def __init__(self, models: dict[str, SplitModel], cfg, mesh: Mesh, *, mask_id: int,
                 null_ids: np.ndarray):
        self.cfg, self.mesh, self.mask_id = cfg, mesh, mask_id
        self.models = models
        self.optimizer = make_optimizer(cfg)
        self.schedule = learning_rate(cfg)
        self.num_micro = accumulation_steps(cfg, mesh)
        self.weights = objective.LossWeights.from_config(cfg)
        repl = rules.replicated(mesh)
        self.batch_sharding = rules.batch_sharding(mesh)
        self.param_shardings = _placement(models["transformer"].params)
        null_ids = np.asarray(null_ids, np.int32).reshape(1, -1)
        null_ids = (jax.device_put(null_ids, repl) if _is_concrete(models["t5"].rest)
                    else jax.ShapeDtypeStruct(null_ids.shape, np.int32, sharding=repl))
        self.frozen = {"buffers": models["transformer"].rest, "t5": models["t5"].rest,
                       "vae": models["vae"].rest, "null_ids": null_ids}
        self.frozen_shardings = _placement(self.frozen)
        abstract = jax.eval_shape(self._init, models["transformer"].params)
        self.state_shardings = state_shardings(abstract, self.param_shardings, self.optimizer,
                                               mesh)
        self.abstract_state = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract,
            self.state_shardings)
        self.step = jax.jit(self._step, in_shardings=(self.state_shardings,
                                                      self.frozen_shardings,
                                                      self.batch_sharding),
                            out_shardings=(self.state_shardings, repl), donate_argnums=0)

    def _init(self, params) -> TrainState:
        return init_state(params, self.optimizer, self.cfg.seed)

    def init_state(self) -> TrainState:
        """Step 0 from the models' current parameters, created in place on the mesh."""
        return jax.jit(self._init, out_shardings=self.state_shardings)(
            self.models["transformer"].params)

    def put_batch(self, host_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """This host's rows of the global batch → global arrays split over data × fsdp."""
        return {k: jax.make_array_from_process_local_data(self.batch_sharding, np.asarray(v))
                for k, v in objective.batch_inputs(host_batch).items()}

    # -- the step -----------------------------------------------------------------------
    def _micro_batches(self, batch: dict) -> dict:
        """(A·M, ...) → (A, M, ...) with row m·A + a in micro-batch a (device-local view)."""
        a = self.num_micro
        spec = NamedSharding(self.mesh, P(None, BATCH_AXES))

        def split(x):
            m = x.shape[0] // a
            x = x.reshape((m, a) + x.shape[1:]).swapaxes(0, 1)
            return jax.lax.with_sharding_constraint(x, spec)

        return jax.tree.map(split, batch)

    def _step(self, state: TrainState, frozen: dict, batch: dict):
        with rules.activation_sharding(self.mesh):
            return self._traced_step(state, frozen, batch)

    def _traced_step(self, state: TrainState, frozen: dict, batch: dict):
        tr, t5_def, vae_def = (self.models[k].graphdef for k in ("transformer", "t5", "vae"))
        t5 = nnx.merge(t5_def, frozen["t5"])
        vae = nnx.merge(vae_def, frozen["vae"])
        rng, step_key = jax.random.split(jax.random.wrap_key_data(state.rng))
        null_context = jax.lax.stop_gradient(t5(frozen["null_ids"]))

        def loss_fn(params, micro, key):
            model = nnx.merge(tr, params, frozen["buffers"])
            return objective.unialign_loss(model, t5, vae, micro, null_context, key,
                                           self.weights, self.mask_id)

        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

        def accumulate(carry, xs):
            index, micro = xs
            (_, terms), grads = grad_fn(state.params, micro, jax.random.fold_in(step_key, index))
            grads = jax.lax.with_sharding_constraint(grads, self.param_shardings)
            grad_sum, term_sum = carry
            return (jax.tree.map(jnp.add, grad_sum, grads),
                    jax.tree.map(jnp.add, term_sum, terms)), None

        micro = self._micro_batches(batch)
        zeros = jax.tree.map(jnp.zeros_like, state.params)
        first = jax.tree.map(lambda x: x[0], micro)
        term_zeros = jax.tree.map(
            lambda s: jnp.zeros(s.shape, s.dtype),
            jax.eval_shape(loss_fn, state.params, first, step_key)[1])
        (grads, terms), _ = jax.lax.scan(accumulate, (zeros, term_zeros),
                                         (jnp.arange(self.num_micro), micro))
        grads = jax.tree.map(lambda g: g / self.num_micro, grads)
        terms = jax.tree.map(lambda t: t / self.num_micro, terms)

        updates, opt_state = self.optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        decay = self.cfg.ema_decay
        ema = jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p, state.ema_params, params)
        metrics = {**terms, "grad_norm": optax.global_norm(grads),
                   "lr": self.schedule(state.step)}
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                               ema_params=ema, rng=jax.random.key_data(rng))
        return new_state, metrics


def _is_concrete(tree: Any) -> bool:
    return all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree))
