"""SD3's VAE (diffusers `AutoencoderKL` without quant convs), channels-last.

Module and parameter names follow diffusers' so that the converter is a mechanical rename.
`encode` draws from the posterior and maps to the transformer's latent space
(`(sample − shift) × scale`); `decode` undoes that. Large batches are processed a few images
at a time so that 1024 px images decode within accelerator memory.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from unialign_jax.models import attention, layers
from unialign_jax.configlib import JsonConfig

# Pixels processed at once by `encode`/`decode`: one 1024² image, four 512² ones. Decoding
# one 1024² image with SD3's VAE needs about 3.5 GiB of float32 temporaries (XLA's estimate),
# growing linearly with the chunk, so a 16 GB chip holds it next to the transformer.
PIXELS_PER_CHUNK = 1024 * 1024


@dataclasses.dataclass(frozen=True)
class VAEConfig(JsonConfig):
    """Sizes of the autoencoder (defaults: SD3-medium's VAE)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 1.5305
    shift_factor: float = 0.0609

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


def conv(cin: int, cout: int, kernel: int, *, rngs, dtype, param_dtype, stride: int = 1,
         padding=None) -> nnx.Conv:
    """HWIO convolution; `padding` defaults to torch's `kernel // 2` on every side."""
    pad = kernel // 2
    return nnx.Conv(
        cin, cout, (kernel, kernel), strides=stride,
        padding=padding if padding is not None else ((pad, pad), (pad, pad)),
        dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(),
                                          (None, None, "conv_in", "conv_out")),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), ("conv_out",)))


class GroupNorm(nnx.Module):
    """torch `GroupNorm` on channels-last input; statistics in float32, centred variance."""

    def __init__(self, channels: int, groups: int, *, rngs, param_dtype, eps: float = 1e-6):
        self.groups, self.eps = groups, eps
        self.scale = layers.param(rngs, nnx.initializers.ones_init(), (channels,), ("conv_in",),
                                  param_dtype)
        self.bias = layers.param(rngs, nnx.initializers.zeros_init(), (channels,), ("conv_in",),
                                 param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        grouped = x.astype(jnp.float32).reshape(*x.shape[:-1], self.groups, -1)
        axes = tuple(range(1, x.ndim - 1)) + (x.ndim,)
        mean = grouped.mean(axes, keepdims=True)
        var = jnp.square(grouped - mean).mean(axes, keepdims=True)
        y = ((grouped - mean) * jax.lax.rsqrt(var + self.eps)).reshape(x.shape)
        return (y * self.scale[...].astype(jnp.float32)
                + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class ResnetBlock(nnx.Module):
    """norm–SiLU–conv twice, plus the input (through a 1×1 conv when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = GroupNorm(cin, groups, rngs=rngs, param_dtype=param_dtype)
        self.conv1 = conv(cin, cout, 3, **kw)
        self.norm2 = GroupNorm(cout, groups, rngs=rngs, param_dtype=param_dtype)
        self.conv2 = conv(cout, cout, 3, **kw)
        self.conv_shortcut = conv(cin, cout, 1, **kw) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)))
        h = self.conv2(jax.nn.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Attention(nnx.Module):
    """Single-head self-attention over all pixels, with group norm and a residual."""

    def __init__(self, channels: int, groups: int, *, rngs, dtype, param_dtype,
                 attention: str = "auto"):
        self.attention = attention
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group_norm = GroupNorm(channels, groups, rngs=rngs, param_dtype=param_dtype)
        self.to_q = layers.dense(channels, channels, ("conv_in", "conv_out"), **kw)
        self.to_k = layers.dense(channels, channels, ("conv_in", "conv_out"), **kw)
        self.to_v = layers.dense(channels, channels, ("conv_in", "conv_out"), **kw)
        self.to_out = layers.dense(channels, channels, ("conv_in", "conv_out"), **kw)

    def __call__(self, x: jax.Array, shard: layers.Shard = layers.unsharded) -> jax.Array:
        b, h, w, c = x.shape
        tokens = self.group_norm(x).reshape(b, h * w, 1, c)
        out = attention.dot_product_attention(self.to_q(tokens), self.to_k(tokens),
                                              self.to_v(tokens),
                                              attention=self.attention, shard=shard)
        return x + self.to_out(out.reshape(b, h, w, c))


class MidBlock(nnx.Module):
    """resnet – attention – resnet at the lowest resolution."""

    def __init__(self, channels: int, groups: int, *, attention: str = "auto", **kw):
        self.resnets = nnx.List([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])
        self.attention = Attention(channels, groups, attention=attention, **kw)

    def __call__(self, x: jax.Array, shard: layers.Shard = layers.unsharded) -> jax.Array:
        return self.resnets[1](self.attention(self.resnets[0](x), shard))


class DownBlock(nnx.Module):
    """Resnets, then a stride-2 conv padded only at the bottom/right (as diffusers)."""

    def __init__(self, cin: int, cout: int, num_resnets: int, groups: int, downsample: bool,
                 **kw):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw)
                                 for i in range(num_resnets)])
        self.downsampler = (conv(cout, cout, 3, stride=2, padding=((0, 1), (0, 1)), **kw)
                            if downsample else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsampler is None else self.downsampler(x)


class UpBlock(nnx.Module):
    """Resnets, then nearest-neighbour 2× upsampling followed by a conv."""

    def __init__(self, cin: int, cout: int, num_resnets: int, groups: int, upsample: bool, **kw):
        self.resnets = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, groups, **kw)
                                 for i in range(num_resnets)])
        self.upsampler = conv(cout, cout, 3, **kw) if upsample else None

    def __call__(self, x: jax.Array) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsampler is None:
            return x
        return self.upsampler(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Encoder(nnx.Module):
    """Images (B, H, W, 3) → posterior moments (B, H/f, W/f, 2·latent): [mean | logvar]."""

    def __init__(self, cfg: VAEConfig, *, attention: str = "auto", **kw):
        ch, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = conv(cfg.in_channels, ch[0], 3, **kw)
        self.down_blocks = nnx.List([
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, groups,
                      downsample=i < len(ch) - 1, **kw) for i in range(len(ch))])
        self.mid_block = MidBlock(ch[-1], groups, attention=attention, **kw)
        self.conv_norm_out = GroupNorm(ch[-1], groups, rngs=kw["rngs"],
                                       param_dtype=kw["param_dtype"])
        self.conv_out = conv(ch[-1], 2 * cfg.latent_channels, 3, **kw)

    def __call__(self, x: jax.Array, shard: layers.Shard = layers.unsharded) -> jax.Array:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(self.mid_block(x, shard))))


class Decoder(nnx.Module):
    """Unscaled latents (B, h, w, latent) → images (B, f·h, f·w, 3)."""

    def __init__(self, cfg: VAEConfig, *, attention: str = "auto", **kw):
        ch, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = conv(cfg.latent_channels, ch[0], 3, **kw)
        self.mid_block = MidBlock(ch[0], groups, attention=attention, **kw)
        self.up_blocks = nnx.List([
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block + 1, groups,
                    upsample=i < len(ch) - 1, **kw) for i in range(len(ch))])
        self.conv_norm_out = GroupNorm(ch[-1], groups, rngs=kw["rngs"],
                                       param_dtype=kw["param_dtype"])
        self.conv_out = conv(ch[-1], cfg.out_channels, 3, **kw)

    def __call__(self, z: jax.Array, shard: layers.Shard = layers.unsharded) -> jax.Array:
        x = self.mid_block(self.conv_in(z), shard)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(jax.nn.silu(self.conv_norm_out(x)))


def _in_chunks(fn: Callable[[jax.Array], jax.Array], x: jax.Array, pixels: int,
               images_per_chunk: int | None) -> jax.Array:
    """`fn` over the batch a few images at a time: the same result in bounded memory.

    `pixels` is the output size of one image; by default a chunk holds PIXELS_PER_CHUNK.
    """
    per_chunk = images_per_chunk or max(1, PIXELS_PER_CHUNK // pixels)
    if x.shape[0] <= per_chunk:
        return fn(x)
    return jax.lax.map(lambda one: fn(one[None])[0], x, batch_size=per_chunk)


class AutoencoderKL(nnx.Module):
    """`encode(images, key)` → latents for the transformer; `decode(latents)` → images.

    Images are channels-last RGB in [−1, 1]; latents are (B, H/8, W/8, 16) for SD3.
    `attention`: the mid blocks' kernel (`models.attention`; its single 512-wide head keeps
    XLA's on GPUs, too wide for cuDNN). `activation_sharding`: the mesh the attention kernel
    is chosen for and split over (as for `MMDiT`).
    """

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention: str = "auto",
                 activation_sharding: layers.Shard | None = None):
        self.config, self.dtype = cfg, dtype
        self.activation_sharding = activation_sharding
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, attention=attention)
        self.encoder = Encoder(cfg, **kw)
        self.decoder = Decoder(cfg, **kw)

    def posterior(self, images: jax.Array, *, images_per_chunk: int | None = None
                  ) -> tuple[jax.Array, jax.Array]:
        """Mean and log-variance (clipped to [−30, 20], as diffusers) of the posterior, float32."""
        moments = _in_chunks(functools.partial(self.encoder, shard=self._shard),
                             images.astype(self.dtype),
                             images.shape[1] * images.shape[2], images_per_chunk)
        moments = moments.astype(jnp.float32)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    @property
    def _shard(self) -> layers.Shard:
        return self.activation_sharding or layers.unsharded

    def to_latents(self, sample: jax.Array) -> jax.Array:
        return (sample - self.config.shift_factor) * self.config.scaling_factor

    def from_latents(self, latents: jax.Array) -> jax.Array:
        return latents / self.config.scaling_factor + self.config.shift_factor

    def sample_latents(self, mean: jax.Array, logvar: jax.Array, key: jax.Array) -> jax.Array:
        """A posterior sample in the transformer's latent space (several samples of one
        image share the encoder pass)."""
        sample = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, jnp.float32)
        return self.to_latents(sample)

    def encode(self, images: jax.Array, key: jax.Array, *,
               images_per_chunk: int | None = None) -> jax.Array:
        """A posterior sample (not its mean, spec 2), shifted and scaled; float32."""
        mean, logvar = self.posterior(images, images_per_chunk=images_per_chunk)
        return self.sample_latents(mean, logvar, key)

    def decode(self, latents: jax.Array, *, images_per_chunk: int | None = None) -> jax.Array:
        """Images in about [−1, 1] (not clipped), float32."""
        f = self.config.downsample_factor
        z = self.from_latents(latents.astype(jnp.float32)).astype(self.dtype)
        images = _in_chunks(functools.partial(self.decoder, shard=self._shard), z,
                            latents.shape[1] * latents.shape[2] * f * f, images_per_chunk)
        return images.astype(jnp.float32)
