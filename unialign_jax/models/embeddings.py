"""Input embeddings of the MMDiT: patches, 2D sin-cos positions, timesteps."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from unialign_jax.models import layers


def sincos_1d(dim: int, positions: jax.Array) -> jax.Array:
    """[sin | cos] of positions at frequencies 1/10000^(2i/dim)."""
    omega = 1.0 / 10000 ** (jnp.arange(dim // 2, dtype=jnp.float32) / (dim / 2.0))
    out = positions.reshape(-1, 1).astype(jnp.float32) * omega[None]
    return jnp.concatenate([jnp.sin(out), jnp.cos(out)], axis=1)


def sincos_2d_table(dim: int, grid_size: int, base_size: int) -> jax.Array:
    """SD3's fixed (grid², dim) position table: first half encodes the column, second the row.

    Positions are scaled by base_size / grid_size as diffusers' `get_2d_sincos_pos_embed`.
    Built with jnp so that an abstract model (`nnx.eval_shape`) never materialises it.
    """
    coords = jnp.arange(grid_size, dtype=jnp.float32) / (grid_size / base_size)
    rows, cols = jnp.meshgrid(coords, coords, indexing="ij")
    return jnp.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)


def crop_positions(table: jax.Array, max_size: int, h: int, w: int) -> jax.Array:
    """The centred h×w crop of the (1, max², W) table (spec 3.7), flattened row-major."""
    if h > max_size or w > max_size:
        raise ValueError(f"patch grid {h}x{w} exceeds the position table ({max_size}x{max_size})")
    top, left = (max_size - h) // 2, (max_size - w) // 2
    grid = table.reshape(max_size, max_size, -1)[top:top + h, left:left + w]
    return grid.reshape(1, h * w, -1)


def timestep_sinusoid(t: jax.Array, channels: int) -> jax.Array:
    """diffusers `Timesteps(channels, flip_sin_to_cos=True, downscale_freq_shift=0)`: [cos | sin]."""
    half = channels // 2
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class PatchEmbed(nnx.Module):
    """p×p patches → width, as SD3's stride-p convolution, on channels-last latents.

    The kernel is stored HWIO (p, p, C, W) like a JAX convolution; applying it as one matmul
    over flattened patches is the same computation and maps well onto the MXU.
    """

    def __init__(self, patch: int, channels: int, width: int, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        self.patch, self.dtype = patch, dtype
        init = nnx.initializers.lecun_normal(in_axis=(0, 1, 2), out_axis=3)
        self.kernel = layers.param(rngs, init, (patch, patch, channels, width),
                                   (None, None, None, "embed"), param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros_init(), (width,), ("embed",),
                                 param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        p = self.patch
        if hh % p or ww % p:
            raise ValueError(f"latent size {hh}x{ww} is not a multiple of the patch size {p}")
        x = x.reshape(b, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
        x = x.reshape(b, (hh // p) * (ww // p), p * p * c).astype(self.dtype)
        kernel = self.kernel[...].reshape(p * p * c, -1).astype(self.dtype)
        return x @ kernel + self.bias[...].astype(self.dtype)


def unpatchify(x: jax.Array, h: int, w: int, patch: int) -> jax.Array:
    """(B, h·w, p·p·C) tokens → (B, h·p, w·p, C) image, the inverse of `PatchEmbed`'s layout."""
    b = x.shape[0]
    x = x.reshape(b, h, w, patch, patch, -1).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * patch, w * patch, -1)


class MLPEmbedder(nnx.Module):
    """Linear–SiLU–Linear: diffusers' TimestepEmbedding / PixArtAlphaTextProjection."""

    def __init__(self, in_features: int, width: int, in_axis: str | None, *, rngs: nnx.Rngs,
                 dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = layers.dense(in_features, width, (in_axis, "embed"), **kw)
        self.linear_2 = layers.dense(width, width, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(jax.nn.silu(self.linear_1(x)))
