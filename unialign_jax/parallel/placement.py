"""Putting models and batches on a mesh: moving a built module, and host arrays → global
batch arrays (a run's models are made in place by `runs.builder.run_model`).

Every placement comes from the logical-axis rules (`rules.py`), so training, sampling and
the memory planner place the same model the same way.
"""

from __future__ import annotations

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from unialign_jax.parallel import rules


def place_module(module: nnx.Module, mesh: Mesh) -> None:
    """Moves every array of `module` to its place on `mesh` (in place; no-op if there) and
    points the module's activation constraints at the same mesh."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, rules.state_shardings(state, mesh)))
    if hasattr(module, "activation_sharding"):
        module.activation_sharding = rules.ActivationSharding(mesh)


def put(x, mesh: Mesh, *, batch: bool = True) -> jax.Array:
    """`x` on the mesh: its leading (batch) axis split, or (`batch=False`) whole everywhere.
    On a mesh over several processes every process passes the same whole value (a host
    array, or a local one such as PRNG keys) and places its own devices' part of it."""
    sharding = rules.batch_sharding(mesh) if batch else rules.replicated(mesh)
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        return jax.random.wrap_key_data(put(jax.random.key_data(x), mesh, batch=batch),
                                        impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """The whole value of `x` on this process: a global array spanning other processes is
    gathered from them (every process must call this with the same array)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(x)


def put_host_batch(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """This host's rows of a global batch → global arrays split over the batch axes (every
    host passes its own rows; on one host this is the whole batch)."""
    sharding = rules.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}
