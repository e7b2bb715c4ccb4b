"""Small building blocks shared by the models: annotated linear layers and norms.

Every parameter gets logical axis names (see `unialign_jax.parallel.rules`) so that the
sharding of a model is decided by rules in one place, not by the model code.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

Dtype = jnp.dtype

# Logical names of the activations a model carries (resolved to mesh axes by
# `unialign_jax.parallel.rules`, like the parameters' names).
TOKENS = ("activation_batch", "activation_length", "activation_embed")
HEADS = ("activation_batch", "activation_length", "activation_heads", None)
HIDDEN = ("activation_batch", "activation_length", "activation_mlp")


class Shard(Protocol):
    """Where a model's activations live: `shard(x, names)` constrains an activation's
    placement by logical names; `mesh` (None: no mesh) and `spec(names, shape)` tell kernels
    that the partitioner cannot split (splash attention) how to run per shard. Models take
    one (`unialign_jax.parallel.ActivationSharding(mesh)`) and default to `unsharded`."""

    mesh: Mesh | None

    def __call__(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array: ...

    def spec(self, names: Sequence[str | None], shape: tuple[int, ...]) -> PartitionSpec: ...


class Unsharded:
    """No mesh: placement is left to XLA and kernels run as they are."""

    mesh = None

    def __call__(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
        return x

    def spec(self, names: Sequence[str | None], shape: tuple[int, ...]) -> PartitionSpec:
        return PartitionSpec()


unsharded = Unsharded()


def dense(in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
          rngs: nnx.Rngs, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          use_bias: bool = True) -> nnx.Linear:
    """`nnx.Linear` whose kernel is annotated `axes` = (input axis, output axis)."""
    return nnx.Linear(
        in_features, out_features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), axes),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (axes[1],)),
        rngs=rngs)


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """LayerNorm without affine parameters; statistics in float32 whatever the compute dtype."""
    x32 = x.astype(jnp.float32)
    mean = x32.mean(-1, keepdims=True)
    var = jnp.square(x32 - mean).mean(-1, keepdims=True)
    return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float = 1e-6) -> jax.Array:
    """T5-style RMS norm: no mean subtraction, statistics in float32."""
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.square(x32).mean(-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(x.dtype)


def param(rngs: nnx.Rngs, init, shape: Sequence[int], axes: tuple[str | None, ...],
          param_dtype: Dtype = jnp.float32) -> nnx.Param:
    """A free-standing annotated parameter (position tables, null tokens, norm weights)."""
    return nnx.Param(init(rngs.params(), tuple(shape), param_dtype), out_sharding=axes)


class Buffer(nnx.Variable):
    """A stored, non-trainable array (e.g. SD3's fixed position table): optimizers filter on
    `nnx.Param`, so buffers travel with checkpoints but never receive updates."""
