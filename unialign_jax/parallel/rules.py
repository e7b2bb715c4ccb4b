"""Logical axis names → mesh axes: the one place that decides where every array lives.

Models annotate parameters with logical names ('embed', 'mlp', 'heads', ...; see
`unialign_jax.models.layers`). `LOGICAL_AXIS_RULES` maps each name to a mesh axis of
`unialign_jax.parallel.mesh` (or None: replicated). A dimension that the mesh axis does
not divide, or whose mesh axis is already used by another dimension of the same array,
falls back to replicated, so one rule set serves every model size and mesh.
"""

from __future__ import annotations

import contextlib
from typing import Mapping

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unialign_jax.parallel.mesh import BATCH_AXES

LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    "batch": BATCH_AXES,
    # Model width: FSDP-sharded, so weights and optimizer state are split over fsdp.
    "embed": "fsdp",
    # Wide matmul dimensions: tensor-parallel.
    "mlp": "tensor",
    "heads": "tensor",
    "vocab": "tensor",
    "adapter": "tensor",
    # Inputs of the context embedder (T5 width) sit opposite an 'embed' axis.
    "context_embed": "tensor",
    # Alignment teacher width, opposite an 'adapter' axis.
    "teacher": "fsdp",
    # VAE convolutions: replicated. The VAE is small (84M) and channel-sharded weights
    # would pull XLA into channel-sharding its full-resolution activations.
    "conv_in": None,
    "conv_out": None,
    # The scanned layer axis stays whole: each scan step slices one layer.
    "layers": None,
    "relpos_buckets": None,
}


def _mesh_axes(name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in LOGICAL_AXIS_RULES:
        raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES; add one in "
                         "unialign_jax/parallel/rules.py")
    axes = LOGICAL_AXIS_RULES[name]
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def logical_to_mesh(logical: P | tuple, shape: tuple[int, ...], mesh: Mesh) -> P:
    """The mesh PartitionSpec of an array of `shape` annotated with logical names."""
    logical = tuple(logical) + (None,) * (len(shape) - len(tuple(logical)))
    used: set[str] = set()
    out = []
    for name, size in zip(logical, shape):
        axes = tuple(a for a in _mesh_axes(name) if a in mesh.shape and mesh.shape[a] > 1)
        ways = 1
        for a in axes:
            ways *= mesh.shape[a]
        if not axes or used & set(axes) or size % ways:
            out.append(None)
            continue
        used |= set(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return P(*out)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings (same structure as `state`) from the variables' `out_sharding`."""
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda spec, x: NamedSharding(mesh, logical_to_mesh(spec, x.shape, mesh)),
                        specs, state, is_leaf=lambda s: isinstance(s, P))


def module_shardings(mesh: Mesh):
    """`shardings=` argument of the checkpoint loaders: abstract module → State of shardings."""
    return lambda module: state_shardings(nnx.state(module), mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data × fsdp; everything else whole."""
    return NamedSharding(mesh, P(_mesh_axes("batch")))


# -- activations ------------------------------------------------------------------------
# Parameters split over fsdp along 'embed' would otherwise let XLA's propagation split the
# activations along 'embed' too and replicate the batch (a whole global micro-batch of
# attention scores per chip). Models call `constrain_batch` on the streams they carry
# between layers; the train step enables it for its mesh while it is traced.
_ACTIVATION_MESH: list[Mesh] = []


@contextlib.contextmanager
def activation_sharding(mesh: Mesh):
    """Within this block (while tracing), `constrain_batch` splits activations over the
    batch axes of `mesh`; outside it, `constrain_batch` is the identity."""
    _ACTIVATION_MESH.append(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.pop()


def constrain_batch(x: jax.Array) -> jax.Array:
    """Keeps `x` split over data × fsdp along its leading (batch) axis, other axes whole."""
    if not _ACTIVATION_MESH:
        return x
    mesh = _ACTIVATION_MESH[-1]
    axes = tuple(a for a in _mesh_axes("batch") if mesh.shape[a] > 1)
    ways = 1
    for a in axes:
        ways *= mesh.shape[a]
    if not axes or x.shape[0] % ways:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(axes)))
