"""Where the pipeline's arrays live, by the rules of `unialign_jax.parallel`.

Weights follow the logical-axis rules (FSDP: split over 'fsdp', wide matmuls over
'tensor'); each batch is split over data × fsdp; the one negative prompt is whole on every
device. On a single device all of this is a no-op.
"""

from __future__ import annotations

import jax
from flax import nnx
from jax.sharding import Mesh

from unialign_jax.parallel import batch_sharding, make_mesh, replicated
from unialign_jax.parallel.mesh import BATCH_AXES
from unialign_jax.parallel.rules import state_shardings

__all__ = ["batch_ways", "chunk_size", "default_mesh", "place_module", "put"]


def default_mesh() -> Mesh:
    """All devices on the 'fsdp' axis: batch and weights both split over every device."""
    return make_mesh()


def batch_ways(mesh: Mesh) -> int:
    """Number of pieces a batch is split into (the product of the batch axes' sizes)."""
    ways = 1
    for axis in BATCH_AXES:
        ways *= mesh.shape.get(axis, 1)
    return ways


def place_module(module: nnx.Module, mesh: Mesh) -> None:
    """Moves every array of `module` to its place on `mesh` (in place; no-op if there)."""
    state = nnx.state(module)
    nnx.update(module, jax.device_put(state, state_shardings(state, mesh)))


def put(x, mesh: Mesh, *, batch: bool = True) -> jax.Array:
    """`x` on the mesh: its leading (batch) axis split, or (`batch=False`) whole everywhere."""
    return jax.device_put(x, batch_sharding(mesh) if batch else replicated(mesh))


def chunk_size(num_items: int, batch_size: int, ways: int) -> int:
    """Items per compiled call: at most `batch_size`, rounded up to a multiple of `ways`."""
    size = max(1, min(batch_size, num_items))
    return -(-size // ways) * ways
