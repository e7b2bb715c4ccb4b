"""The joint (dual-stream) transformer block of SD3: diffusers' `JointTransformerBlock`.

Image and text tokens keep separate weights but attend jointly over the concatenation of
both streams. Modulation (shift, scale, gate) comes from the conditioning vector `temb`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from unialign_jax.models import attention, layers


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale[:, None]) + shift[:, None]


class FeedForward(nnx.Module):
    """Linear(W→4W)–GELU(tanh)–Linear(4W→W) (diffusers `FeedForward`, "gelu-approximate")."""

    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj_in = layers.dense(width, 4 * width, ("embed", "mlp"), **kw)
        self.proj_out = layers.dense(4 * width, width, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array, shard: layers.Shard = layers.unsharded) -> jax.Array:
        hidden = shard(jax.nn.gelu(self.proj_in(x), approximate=True), layers.HIDDEN)
        return self.proj_out(checkpoint_name(hidden, "mlp_hidden"))


class JointAttention(nnx.Module):
    """Joint attention over [image tokens, text tokens]; no masks (the reference uses none).

    `context_pre_only` (SD3's last block) drops the text stream's output projection.
    `attention` is an `attention.IMPLEMENTATIONS` name ("auto": fastest for the platform
    of the mesh that `shard` places on).
    """

    def __init__(self, width: int, num_heads: int, *, context_pre_only: bool, rngs: nnx.Rngs,
                 dtype, param_dtype, attention: str = "auto"):
        self.num_heads, self.attention = num_heads, attention
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        qkv = lambda: layers.dense(width, width, ("embed", "heads"), **kw)  # noqa: E731
        self.to_q, self.to_k, self.to_v = qkv(), qkv(), qkv()
        self.add_q_proj, self.add_k_proj, self.add_v_proj = qkv(), qkv(), qkv()
        self.to_out = layers.dense(width, width, ("heads", "embed"), **kw)
        self.to_add_out = (None if context_pre_only
                           else layers.dense(width, width, ("heads", "embed"), **kw))

    def __call__(self, x: jax.Array, c: jax.Array, shard: layers.Shard = layers.unsharded
                 ) -> tuple[jax.Array, jax.Array | None]:
        b, n_img, _ = x.shape

        def joint(image_proj, text_proj, name):
            t = jnp.concatenate([image_proj(x), text_proj(c)], axis=1)
            return checkpoint_name(shard(t.reshape(b, t.shape[1], self.num_heads, -1),
                                         layers.HEADS), name)

        q = joint(self.to_q, self.add_q_proj, "query")
        k = joint(self.to_k, self.add_k_proj, "key")
        v = joint(self.to_v, self.add_v_proj, "value")
        out = attention.dot_product_attention(q, k, v, attention=self.attention,
                                              shard=shard)
        out = checkpoint_name(shard(out, layers.HEADS), "attention").reshape(b, q.shape[1], -1)
        img_out, txt_out = out[:, :n_img], out[:, n_img:]
        return self.to_out(img_out), (None if self.to_add_out is None else self.to_add_out(txt_out))


class JointBlock(nnx.Module):
    """One MMDiT block. Returns the updated (image, text) streams; text is None when
    `context_pre_only` (its text stream feeds attention but is not carried on)."""

    def __init__(self, width: int, num_heads: int, *, context_pre_only: bool = False,
                 rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32,
                 attention: str = "auto"):
        self.context_pre_only = context_pre_only
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = layers.dense(width, 6 * width, ("embed", "mlp"), **kw)
        self.norm1_context = layers.dense(width, (2 if context_pre_only else 6) * width,
                                          ("embed", "mlp"), **kw)
        self.attn = JointAttention(width, num_heads, context_pre_only=context_pre_only,
                                   attention=attention, **kw)
        self.ff = FeedForward(width, **kw)
        self.ff_context = None if context_pre_only else FeedForward(width, **kw)

    def __call__(self, x: jax.Array, c: jax.Array, temb_act: jax.Array,
                 shard: layers.Shard = layers.unsharded):
        """`temb_act` is SiLU(temb), shared by every modulation layer; `shard` places the
        activations (see `layers.Shard`)."""
        shift, scale, gate, shift_ff, scale_ff, gate_ff = jnp.split(self.norm1(temb_act), 6, -1)
        c_mod = jnp.split(self.norm1_context(temb_act), 2 if self.context_pre_only else 6, -1)
        if self.context_pre_only:
            c_scale, c_shift = c_mod  # AdaLayerNormContinuous: scale first
        else:
            c_shift, c_scale, c_gate, c_shift_ff, c_scale_ff, c_gate_ff = c_mod
        c_normed = modulate(layers.layer_norm(c), c_shift, c_scale)

        attn_img, attn_txt = self.attn(modulate(layers.layer_norm(x), shift, scale), c_normed,
                                       shard)
        x = x + gate[:, None] * attn_img
        x = x + gate_ff[:, None] * self.ff(modulate(layers.layer_norm(x), shift_ff, scale_ff),
                                           shard)
        if self.context_pre_only:
            return x, None
        c = c + c_gate[:, None] * attn_txt
        c = c + c_gate_ff[:, None] * self.ff_context(
            modulate(layers.layer_norm(c), c_shift_ff, c_scale_ff), shard)
        return x, c
