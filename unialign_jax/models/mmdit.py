"""The SD3 / UniAlignment MMDiT (spec section 3) in Flax NNX, channels-last.

Blocks are stacked along a leading 'layers' axis and run with `jax.lax.scan`, so compile time
does not grow with depth; an optional `jax.checkpoint` policy rematerialises each block.
"""

from __future__ import annotations

from typing import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from unialign_jax.models import embeddings, layers
from unialign_jax.models.mmdit_block import JointBlock, modulate
from unialign_jax.models.mmdit_config import MMDiTConfig
from unialign_jax.models.remat import remat_policy as resolve_remat_policy

__all__ = ["MMDiT", "MMDiTConfig", "MMDiTOutput"]


@struct.dataclass
class MMDiTOutput:
    """Outputs named as in the spec's section 3.9 (and the fixtures).

    `sample`: velocity, channels-last like the latents (for a text-only forward: the null
    tokens' final states). `image_hidden`: after `image_norm_out` (text-only: un-normed null
    token states). `text_hidden`: after `text_norm_out`. `mid_*_proj`: adapter outputs after
    block `block_depth` (None when it is not asked for). SD3 has only `sample`.
    """

    sample: jax.Array
    text_logits: jax.Array | None = None
    image_hidden: jax.Array | None = None
    text_hidden: jax.Array | None = None
    mid_image_proj: jax.Array | None = None
    mid_text_proj: jax.Array | None = None


class Adapter(nnx.Module):
    """Linear(W→A)–SiLU–Linear(A→T)–SiLU: projects mid-layer features to the teacher's space."""

    def __init__(self, width: int, hidden: int, out: int, *, rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc_1 = layers.dense(width, hidden, ("embed", "adapter"), **kw)
        self.fc_2 = layers.dense(hidden, out, ("adapter", "teacher"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.silu(self.fc_2(jax.nn.silu(self.fc_1(x))))


class AdaNormOut(nnx.Module):
    """diffusers' AdaLayerNormContinuous: LayerNorm, then x·(1+scale)+shift from SiLU(temb)."""

    def __init__(self, width: int, *, rngs, dtype, param_dtype):
        self.linear = layers.dense(width, 2 * width, ("embed", "mlp"), rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype)

    def __call__(self, x: jax.Array, temb_act: jax.Array) -> jax.Array:
        scale, shift = jnp.split(self.linear(temb_act), 2, -1)
        return modulate(layers.layer_norm(x), shift, scale)


class MMDiT(nnx.Module):
    """SD3-medium or UniAlignment transformer; see `MMDiTConfig` for the two layouts.

    `dtype` is the compute dtype (bf16 on TPU), `param_dtype` the storage dtype (fp32 for
    training). `remat_policy`: rematerialisation of every block, by name (see
    `models.remat`; None: none). `attention`: the attention kernel (`models.attention`;
    "auto" picks the fastest for the platform of the mesh's devices). `activation_sharding`:
    places the activations carried between blocks and splits the attention kernel over the
    mesh (`unialign_jax.parallel.ActivationSharding`).
    """

    def __init__(self, config: MMDiTConfig, *, rngs: nnx.Rngs, dtype=jnp.float32,
                 param_dtype=jnp.float32, remat_policy: str | Callable | None = None,
                 attention: str = "auto", activation_sharding: layers.Shard | None = None):
        if config.variant == "unialignment" and not config.vocab_size:
            raise ValueError("the UniAlignment layout needs vocab_size (the tokenizer's length)")
        self.config, self.dtype = config, dtype
        self.remat_policy = resolve_remat_policy(remat_policy)
        self.remat = remat_policy not in (None, "none")
        self.activation_sharding = activation_sharding
        cfg, w = config, config.width
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)

        table = embeddings.sincos_2d_table(w, cfg.pos_embed_max_size,
                                           cfg.sample_size // cfg.patch_size)
        self.pos_embed = layers.Buffer(table[None].astype(param_dtype),
                                       out_sharding=(None, None, "embed"))
        self.patch_embed = embeddings.PatchEmbed(cfg.patch_size, cfg.in_channels, w, **kw)
        self.time_embed = embeddings.MLPEmbedder(cfg.timestep_channels, w, None, **kw)
        self.context_embedder = layers.dense(cfg.joint_attention_dim, w,
                                             ("context_embed", "embed"), **kw)

        @nnx.split_rngs(splits=cfg.num_scanned_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def stacked_blocks(rngs):
            return JointBlock(w, cfg.num_heads, rngs=rngs, dtype=dtype, param_dtype=param_dtype,
                              attention=attention)

        self.blocks = stacked_blocks(rngs)

        if cfg.is_sd3:
            self.pooled_embed = embeddings.MLPEmbedder(cfg.pooled_projection_dim, w, None, **kw)
            self.final_block = JointBlock(w, cfg.num_heads, context_pre_only=True,
                                          attention=attention, **kw)
            self.norm_out = AdaNormOut(w, **kw)
            self.proj_out = layers.dense(w, cfg.patch_size ** 2 * cfg.out_channels,
                                         ("embed", None), **kw)
        else:
            self.null_image_embd = layers.param(
                rngs, nnx.initializers.normal(0.02), (1, cfg.num_null_tokens, w),
                (None, None, "embed"), param_dtype)
            self.image_norm_out = AdaNormOut(w, **kw)
            self.image_proj_out = layers.dense(w, cfg.patch_size ** 2 * cfg.out_channels,
                                               ("embed", None), **kw)
            self.text_proj_out = layers.dense(w, cfg.vocab_size, ("embed", "vocab"), **kw)
            adapter = (w, cfg.adapter_hidden_dim, cfg.teacher_dim)
            self.adapter_img = Adapter(*adapter, **kw)
            self.adapter_text = Adapter(*adapter, **kw)

    # -- conditioning -------------------------------------------------------------------
    def _temb(self, timestep: jax.Array, pooled: jax.Array | None) -> jax.Array:
        proj = embeddings.timestep_sinusoid(timestep, self.config.timestep_channels)
        if not self.config.is_sd3:
            proj = proj.astype(jnp.float16)  # the release rounds the projection to fp16
        temb = self.time_embed(proj.astype(self.dtype))
        if self.config.is_sd3:
            if pooled is None:
                raise ValueError("the SD3 layout needs `pooled` (the pooled CLIP projection)")
            temb = temb + self.pooled_embed(pooled.astype(self.dtype))
        return temb

    def _embed_image(self, latents: jax.Array) -> jax.Array:
        _, hh, ww, _ = latents.shape
        p, m = self.config.patch_size, self.config.pos_embed_max_size
        pos = embeddings.crop_positions(self.pos_embed[...], m, hh // p, ww // p)
        return self.patch_embed(latents) + pos.astype(self.dtype)

    # -- blocks -------------------------------------------------------------------------
    @property
    def _shard(self) -> layers.Shard:
        return self.activation_sharding or layers.unsharded

    def _run_blocks(self, x, c, temb_act, n_target: int, collect_means: bool):
        """Scans the stacked blocks; optionally returns each block's token means, (L, B, W)."""
        graphdef, state = nnx.split(self.blocks)

        def body(carry, block_state):
            x, c = carry
            x, c = nnx.merge(graphdef, block_state)(x, c, temb_act, self._shard)
            x, c = self._shard(x, layers.TOKENS), self._shard(c, layers.TOKENS)
            means = ((x[:, :n_target].mean(1), c.mean(1)) if collect_means else None)
            return (x, c), means

        if self.remat:
            body = jax.checkpoint(body, policy=self.remat_policy, prevent_cse=False)
        (x, c), means = jax.lax.scan(body, (x, c), state)
        return x, c, means

    # -- forward ------------------------------------------------------------------------
    def __call__(self, latents: jax.Array | None, timestep: jax.Array, context: jax.Array, *,
                 conditions: Sequence[jax.Array] = (), block_depth: int | None = None,
                 pooled: jax.Array | None = None) -> MMDiTOutput:
        """latents (B,H,W,C) or None (text-only), timestep (B,) = σ·1000, context (B,L,D_t5).

        `conditions`: clean condition latents of the target's size, appended after the target
        tokens with the same patch and position embedding (spec 3.6). `block_depth`: 1-based
        block after which the mid-layer alignment features are taken. `pooled`: SD3 only.
        """
        cfg = self.config
        if cfg.is_sd3 and (latents is None or conditions or block_depth is not None):
            raise ValueError("the SD3 layout has no text-only, condition or mid-layer path")
        if block_depth is not None and not 1 <= block_depth <= cfg.num_layers:
            raise ValueError(f"block_depth must be in [1, {cfg.num_layers}], got {block_depth}")
        batch = context.shape[0]
        temb = self._temb(jnp.broadcast_to(timestep, (batch,)), pooled)
        temb_act = jax.nn.silu(temb)
        c = self.context_embedder(context.astype(self.dtype))

        if latents is None:
            x = jnp.broadcast_to(self.null_image_embd[...].astype(self.dtype),
                                 (batch,) + self.null_image_embd.shape[1:])
        else:
            for cond in conditions:
                if cond.shape != latents.shape:
                    raise ValueError(f"condition latents {cond.shape} must match the target "
                                     f"{latents.shape}")
            x = jnp.concatenate([self._embed_image(l) for l in (latents, *conditions)], axis=1)
        n_target = (cfg.num_null_tokens if latents is None
                    else x.shape[1] // (1 + len(conditions)))

        x, c = self._shard(x, layers.TOKENS), self._shard(c, layers.TOKENS)
        x, c, means = self._run_blocks(x, c, temb_act, n_target, block_depth is not None)
        x = x[:, :n_target]

        if cfg.is_sd3:
            x, _ = self.final_block(x, c, temb_act, self._shard)
            return MMDiTOutput(sample=self._to_image(self.proj_out(self.norm_out(x, temb_act)),
                                                     latents))

        text_hidden = layers.layer_norm(c)
        text_logits = self.text_proj_out(text_hidden).astype(jnp.float32)
        if latents is None:
            image_hidden = sample = x
        else:
            image_hidden = self.image_norm_out(x, temb_act)
            sample = self._to_image(self.image_proj_out(image_hidden), latents)
        mid_img = mid_txt = None
        if block_depth is not None:
            mid_img = self.adapter_img(means[0][block_depth - 1]).astype(jnp.float32)
            mid_txt = self.adapter_text(means[1][block_depth - 1]).astype(jnp.float32)
        return MMDiTOutput(sample=sample, text_logits=text_logits, image_hidden=image_hidden,
                           text_hidden=text_hidden, mid_image_proj=mid_img,
                           mid_text_proj=mid_txt)

    def _to_image(self, tokens: jax.Array, latents: jax.Array) -> jax.Array:
        p = self.config.patch_size
        _, hh, ww, _ = latents.shape
        return embeddings.unpatchify(tokens, hh // p, ww // p, p).astype(jnp.float32)
