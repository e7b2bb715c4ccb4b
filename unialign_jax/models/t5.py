"""The T5 v1.1 encoder (transformers' `T5EncoderModel`), UniAlignment's frozen text encoder.

Pre-norm blocks with RMS norm and no biases; self-attention without the 1/sqrt(d) scaling
plus a bucketed relative-position bias that the first block computes and every block
shares; gated-GELU (tanh) feed-forward. The blocks are stacked on a 'layers' axis and run
with `scan`, so the compile time does not grow with depth.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unialign_jax.configlib import JsonConfig
from unialign_jax.models import attention, layers


@dataclasses.dataclass(frozen=True)
class T5Config(JsonConfig):
    """Sizes of the encoder (defaults: T5 v1.1 XXL, as in SD3 and UniAlignment)."""

    vocab_size: int = 32128
    d_model: int = 4096
    num_heads: int = 64
    head_dim: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """(length, length) bucket ids of key − query offsets, bidirectional (T5's encoder).

    Half the buckets are for keys after the query; in each half, offsets below a quarter of
    `num_buckets` get their own bucket and larger ones share log-spaced buckets up to
    `max_distance`. Computed in numpy at trace time: it depends only on the length.
    """
    pos = np.arange(length, dtype=np.int64)
    rel = pos[None, :] - pos[:, None]
    half = num_buckets // 2
    buckets = (rel > 0).astype(np.int64) * half
    dist = np.abs(rel)
    max_exact = half // 2
    # float32 as in transformers, so that offsets on a bucket boundary round the same way;
    # offsets below max_exact take the exact branch (the clamp only keeps log() finite).
    log_ratio = (np.log(np.maximum(dist, 1).astype(np.float32) / max_exact)
                 / math.log(max_distance / max_exact))
    large = max_exact + (log_ratio * (half - max_exact)).astype(np.int64)
    large = np.minimum(large, half - 1)
    return buckets + np.where(dist < max_exact, dist, large)


class T5Attention(nnx.Module):
    """Multi-head self-attention, unscaled logits plus the shared position bias."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype, param_dtype,
                 attention: str = "auto"):
        self.num_heads, self.attention = cfg.num_heads, attention
        inner = cfg.num_heads * cfg.head_dim
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        self.q = layers.dense(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.k = layers.dense(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.v = layers.dense(cfg.d_model, inner, ("embed", "heads"), **kw)
        self.o = layers.dense(inner, cfg.d_model, ("heads", "embed"), **kw)

    def __call__(self, x: jax.Array, position_bias: jax.Array,
                 shard: layers.Shard = layers.unsharded) -> jax.Array:
        b, n, _ = x.shape

        def heads(t):
            return t.reshape(b, n, self.num_heads, -1)

        out = attention.dot_product_attention(heads(self.q(x)), heads(self.k(x)),
                                              heads(self.v(x)), bias=position_bias, scale=1.0,
                                              attention=self.attention, shard=shard)
        return self.o(out.reshape(b, n, -1))


class T5GatedFeedForward(nnx.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x): T5 v1.1's 'gated-gelu'."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype, use_bias=False)
        self.wi_0 = layers.dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.wi_1 = layers.dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), **kw)
        self.wo = layers.dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.wo(jax.nn.gelu(self.wi_0(x), approximate=True) * self.wi_1(x))


class T5Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + ffn(norm(x))."""

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype, param_dtype,
                 attention: str = "auto"):
        self.eps = cfg.layer_norm_epsilon
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        ones = nnx.initializers.ones_init()
        self.attention_norm = layers.param(rngs, ones, (cfg.d_model,), ("embed",), param_dtype)
        self.attention = T5Attention(cfg, attention=attention, **kw)
        self.ffn_norm = layers.param(rngs, ones, (cfg.d_model,), ("embed",), param_dtype)
        self.ffn = T5GatedFeedForward(cfg, **kw)

    def __call__(self, x: jax.Array, position_bias: jax.Array,
                 shard: layers.Shard = layers.unsharded) -> jax.Array:
        x = x + self.attention(layers.rms_norm(x, self.attention_norm[...], self.eps),
                               position_bias, shard)
        return x + self.ffn(layers.rms_norm(x, self.ffn_norm[...], self.eps))


class T5Encoder(nnx.Module):
    """`t5(input_ids)` → (B, L, d_model) final hidden states; no attention mask (spec 2).

    `attention` and `activation_sharding` as for `MMDiT`.
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, attention: str = "auto",
                 activation_sharding: layers.Shard | None = None):
        self.config, self.dtype = cfg, dtype
        self.activation_sharding = activation_sharding
        normal = nnx.initializers.normal(1.0)
        self.embedding = layers.param(rngs, normal, (cfg.vocab_size, cfg.d_model),
                                      ("vocab", "embed"), param_dtype)
        self.relative_attention_bias = layers.param(
            rngs, normal, (cfg.relative_attention_num_buckets, cfg.num_heads),
            ("relpos_buckets", None), param_dtype)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return T5Block(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                           attention=attention)

        self.blocks = make_blocks(rngs)
        self.final_norm = layers.param(rngs, nnx.initializers.ones_init(), (cfg.d_model,),
                                       ("embed",), param_dtype)

    def position_bias(self, length: int) -> jax.Array:
        """(1, heads, L, L) float32 bias added to every block's attention logits."""
        buckets = relative_position_buckets(length, self.config.relative_attention_num_buckets,
                                            self.config.relative_attention_max_distance)
        table = self.relative_attention_bias[...].astype(jnp.float32)
        return jnp.transpose(table[buckets], (2, 0, 1))[None]

    def __call__(self, input_ids: jax.Array) -> jax.Array:
        shard = self.activation_sharding or layers.unsharded
        x = shard(jnp.take(self.embedding[...], input_ids, axis=0).astype(self.dtype),
                  layers.TOKENS)
        bias = self.position_bias(input_ids.shape[1])
        graphdef, stacked = nnx.split(self.blocks)

        def body(h, block_state):
            return shard(nnx.merge(graphdef, block_state)(h, bias, shard), layers.TOKENS), None

        x, _ = jax.lax.scan(body, x, stacked)
        return layers.rms_norm(x, self.final_norm[...], self.config.layer_norm_epsilon)
