"""The UniAlignment objective on one micro-batch: the two transformer passes and the loss.

Image pass: noisy target latent (plus clean source latents for editing) with the
instruction's T5 states, 10% of them replaced by the null prompt's. Caption pass: the
clean target latent at timestep 0 with the T5 states of the partly masked caption. The
frozen VAE and T5 run here, on device, inside the jitted step.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from unialign_jax.training import losses

TEACHER_KEYS = ("teacher_image", "teacher_text")


@dataclasses.dataclass(frozen=True)
class LossWeights:
    """Weights and constants of spec section 4 (from the TrainConfig)."""

    image: float = 1.0
    caption: float = 0.2
    contrastive: float = 0.05
    align: float = 0.1
    block_depth: int = 8
    null_prompt_prob: float = 0.1
    temperature: float = 0.07
    caption_eps: float = losses.CAPTION_EPS

    @classmethod
    def from_config(cls, cfg) -> "LossWeights":
        return cls(image=cfg.image_weight, caption=cfg.caption_weight,
                   contrastive=cfg.contrastive_weight, align=cfg.align_weight,
                   block_depth=cfg.block_depth, null_prompt_prob=cfg.null_prompt_prob,
                   temperature=cfg.contrastive_temperature, caption_eps=cfg.caption_eps)


def encode_images(vae: nnx.Module, batch: dict, key: jax.Array):
    """Posterior-sample latents of the target and of each source image (float32).

    The whole micro-batch is encoded at once (no VAE chunking): micro-batches are already
    sized for device memory, and chunking would loop over the sharded batch axis.
    """
    whole = batch["target"].shape[0]
    target = vae.encode(batch["target"], jax.random.fold_in(key, 0), images_per_chunk=whole)
    sources = batch.get("sources")
    conditions = () if sources is None else tuple(
        vae.encode(sources[:, k], jax.random.fold_in(key, 1 + k), images_per_chunk=whole)
        for k in range(sources.shape[1]))
    return jax.lax.stop_gradient(target), tuple(jax.lax.stop_gradient(c) for c in conditions)


def unialign_loss(transformer: nnx.Module, t5: nnx.Module, vae: nnx.Module, batch: dict,
                  null_context: jax.Array, key: jax.Array, weights: LossWeights,
                  mask_id: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Total loss and its terms for one micro-batch. Without teacher features in the batch
    the alignment terms are left out (and reported as 0)."""
    k_vae, k_sigma, k_noise, k_drop, k_time, k_mask = jax.random.split(key, 6)
    latents, conditions = encode_images(vae, batch, k_vae)
    b = latents.shape[0]

    def encode_text(ids):
        return jax.lax.stop_gradient(t5(ids))

    # Image pass: flow matching with null-prompt dropout.
    context = encode_text(batch["instruction_ids"])
    drop = jax.random.uniform(k_drop, (b,)) < weights.null_prompt_prob
    context = jnp.where(drop[:, None, None], null_context.astype(context.dtype), context)
    sigma = losses.logit_normal_sigmas(jax.random.normal(k_sigma, (b,)))
    noise = jax.random.normal(k_noise, latents.shape, jnp.float32)
    noisy = losses.noise_latents(latents, noise, sigma)
    image_out = transformer(noisy, sigma * losses.NUM_TRAIN_TIMESTEPS, context,
                            conditions=conditions, block_depth=weights.block_depth)
    image_loss = losses.flow_matching_loss(latents, noisy, sigma, image_out.sample)

    # Caption pass: masked diffusion on the caption, clean latent at timestep 0.
    caption_ids = batch["caption_ids"]
    times = losses.antithetic_times(jax.random.uniform(k_time, (b,)), weights.caption_eps)
    masked = losses.mask_tokens(caption_ids, times, jax.random.uniform(k_mask, caption_ids.shape),
                                mask_id, weights.caption_eps)
    text_out = transformer(latents, jnp.zeros((b,), jnp.float32), encode_text(masked),
                           block_depth=weights.block_depth)
    caption_loss = losses.caption_loss(text_out.text_logits, caption_ids, masked, times, mask_id)

    contrastive = losses.contrastive_loss(image_out.image_hidden, text_out.text_hidden,
                                          weights.temperature)
    terms = {"loss_image": image_loss, "loss_caption": caption_loss,
             "loss_contrastive": contrastive}
    total = (weights.image * image_loss + weights.caption * caption_loss
             + weights.contrastive * contrastive)
    if all(k in batch for k in TEACHER_KEYS):
        terms["loss_align_text"] = losses.cosine_alignment_loss(text_out.mid_text_proj,
                                                                batch["teacher_text"])
        terms["loss_align_image"] = losses.cosine_alignment_loss(image_out.mid_image_proj,
                                                                 batch["teacher_image"])
        total = total + weights.align * (terms["loss_align_text"] + terms["loss_align_image"])
    else:
        terms["loss_align_text"] = terms["loss_align_image"] = jnp.zeros((), jnp.float32)
    terms["loss"] = total
    terms["masked_fraction"] = (masked == mask_id).mean()
    return total, terms


def batch_inputs(batch: dict[str, Any]) -> dict[str, Any]:
    """The fields of a data-pipeline batch that the objective reads (drops bookkeeping)."""
    keep = ("target", "sources", "caption_ids", "instruction_ids") + TEACHER_KEYS
    return {k: batch[k] for k in keep if k in batch}
