"""Logical axis names → mesh axes: the one place that decides where every array lives.

Models name the axes of their parameters ('embed', 'mlp', 'heads', ...; see
`unialign_jax.models.layers`) and of the activations they carry ('activation_batch',
'activation_length', 'activation_embed', 'activation_heads', 'activation_mlp').
`LOGICAL_AXIS_RULES` maps each name to mesh axes of `unialign_jax.parallel.mesh` (or None:
replicated). A dimension that its mesh axes do not divide, or whose mesh axis is already
used by another dimension of the same array, falls back to replicated, so one rule set
serves every model size, batch and mesh.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Sequence

import jax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unialign_jax.models.runtime import Runtime

from unialign_jax.parallel.mesh import BATCH_AXES

LOGICAL_AXIS_RULES: Mapping[str, str | tuple[str, ...] | None] = {
    # -- parameters ---------------------------------------------------------------------
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
    # -- activations and batches ----------------------------------------------------------
    # Rows of a batch are split over data × fsdp; within a row the activations stay whole
    # along the width (FSDP gathers weights, not activations), heads and MLP follow tensor.
    "activation_batch": BATCH_AXES,
    "activation_length": None,
    "activation_embed": None,
    "activation_heads": "tensor",
    "activation_mlp": "tensor",
}


def _mesh_axes(name: str | None) -> tuple[str, ...]:
    if name is None:
        return ()
    if name not in LOGICAL_AXIS_RULES:
        raise ValueError(f"logical axis {name!r} has no rule in LOGICAL_AXIS_RULES; add one in "
                         "unialign_jax/parallel/rules.py")
    axes = LOGICAL_AXIS_RULES[name]
    return () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))


def logical_to_mesh(logical: P | Sequence[str | None], shape: tuple[int, ...], mesh) -> P:
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


def named_sharding(mesh: Mesh, logical: Sequence[str | None], shape: tuple[int, ...]
                   ) -> NamedSharding:
    return NamedSharding(mesh, logical_to_mesh(logical, shape, mesh))


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings (same structure as `state`) from the variables' `out_sharding`."""
    specs = nnx.get_partition_spec(state)
    return jax.tree.map(lambda spec, x: named_sharding(mesh, spec, x.shape), specs, state,
                        is_leaf=lambda s: isinstance(s, P))


def module_shardings(mesh: Mesh):
    """`shardings=` argument of the checkpoint loaders: abstract module → State of shardings."""
    return lambda module: state_shardings(nnx.state(module), mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data × fsdp; everything else whole."""
    return NamedSharding(mesh, P(_mesh_axes("activation_batch")))


def batch_ways(mesh) -> int:
    """Number of pieces a batch is split into: the product of the batch axes' sizes."""
    ways = 1
    for axis in _mesh_axes("activation_batch"):
        ways *= mesh.shape.get(axis, 1)
    return ways


@dataclasses.dataclass(frozen=True)
class ActivationSharding:
    """Constrains a model's activations by their logical names, with the parameters' rules.

    Models hold one (a static, hashable attribute) and call it on what they carry between
    layers: `shard(x, ("activation_batch", "activation_length", "activation_embed"))`.
    Without it, parameters split over fsdp along 'embed' would let XLA's propagation split
    activations along the width too and replicate the batch. On one device it does nothing.
    It is the models' `layers.Shard`: kernels that must run under `shard_map` (splash
    attention) read the mesh and the specs from it instead of recomputing them.
    """

    mesh: Mesh

    def __call__(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        if self.mesh.size == 1:
            return x
        return jax.lax.with_sharding_constraint(x, named_sharding(self.mesh, names, x.shape))

    def spec(self, names: Sequence[str | None], shape: tuple[int, ...]) -> P:
        """The mesh PartitionSpec of an activation of `shape` named `names`."""
        return logical_to_mesh(names, shape, self.mesh)


def placed_on(mesh: Mesh, runtime: Runtime = Runtime()) -> Runtime:
    """`runtime` with its models' variables and activations placed on `mesh` by the rules."""
    return dataclasses.replace(runtime, activation_sharding=ActivationSharding(mesh),
                               shardings=module_shardings(mesh))
