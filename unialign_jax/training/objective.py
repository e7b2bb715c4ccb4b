"""The UniAlignment objective on one micro-batch: two transformer passes and five losses.

Image pass: the noisy target latent (plus the clean latent of every source image: one for
editing, K for composition, as the release's `img_edit` / `img_compose` branches) with the
instruction's T5 states, some replaced by the null prompt's. Caption pass: a clean latent
of the target at timestep 0 with the T5 states of the partly masked caption. Then the
contrastive loss between the two passes and the alignment of their mid-layer projections
with the teacher's features (spec section 4).

`objective` is a deterministic function of the latents and of every random draw (`Draws`),
so it can be replayed against the release's recorded values; `micro_batch_loss` — what the
train step calls — encodes the images with the frozen VAE (or takes their cached posterior
moments), draws from a key and calls it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct

from unialign_jax.data.read.batch_spec import MOMENT_KEYS, TEACHER_KEYS
from unialign_jax.diffusion import flow, masked
from unialign_jax.diffusion import alignment_losses as losses
from unialign_jax.runs.config import LossConfig


@struct.dataclass
class Draws:
    """Every random number of one micro-batch's objective (the fixture's names)."""

    flow_logit_normal: jax.Array      # (B,) standard normals → σ of the image pass
    flow_noise: jax.Array             # (B, h, w, C) ε of the image pass
    null_prompt_uniform: jax.Array    # (B,) instruction replaced by the null prompt if < p
    caption_time_uniform: jax.Array   # (B,) → antithetic caption times
    caption_mask_uniform: jax.Array   # (B, L) a token is masked if < (1 − ε)·t

    @classmethod
    def sample(cls, key: jax.Array, latent_shape: tuple[int, ...], length: int) -> "Draws":
        b = latent_shape[0]
        k = jax.random.split(key, 5)
        return cls(flow_logit_normal=jax.random.normal(k[0], (b,)),
                   flow_noise=jax.random.normal(k[1], latent_shape, jnp.float32),
                   null_prompt_uniform=jax.random.uniform(k[2], (b,)),
                   caption_time_uniform=jax.random.uniform(k[3], (b,)),
                   caption_mask_uniform=jax.random.uniform(k[4], (b, length)))


@dataclasses.dataclass(frozen=True)
class Groups:
    """Row groups of a micro-batch for the terms the release computes per GPU."""

    contrastive: int = 1
    antithetic: int = 1

    @classmethod
    def for_mesh(cls, cfg: LossConfig, batch_ways: int) -> "Groups":
        """One group per device for the "device" scopes, one for "global"."""
        def ways(scope):
            return batch_ways if scope == "device" else 1

        return cls(ways(cfg.contrastive_scope), ways(cfg.antithetic_scope))


@struct.dataclass
class Inputs:
    """What the two passes read, as latents and ids."""

    latents: jax.Array                # (B, h, w, C) clean target latents of the image pass
    caption_latents: jax.Array        # the caption pass's latents of the same target
    conditions: tuple                 # clean source latents (edit: 1, compose: 3)
    instruction_ids: jax.Array        # (B, L)
    caption_ids: jax.Array            # (B, L)
    teacher_image: jax.Array | None = None   # (B, D)
    teacher_text: jax.Array | None = None


def objective(transformer: nnx.Module, encode_text: Callable[[jax.Array], jax.Array],
              inputs: Inputs, draws: Draws, null_context: jax.Array, cfg: LossConfig,
              mask_id: int, groups: Groups | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Weighted total and each term. `encode_text` is the frozen T5 (ids → states);
    `groups` splits the rows for the contrastive loss and the antithetic times (one group
    per device reproduces the release's per-GPU computation). Without teacher rows the
    alignment terms are 0 and left out of the total."""
    groups = groups or Groups()
    latents = inputs.latents
    b = latents.shape[0]

    # Image pass: flow matching with null-prompt dropout.
    context = jax.lax.stop_gradient(encode_text(inputs.instruction_ids))
    drop = draws.null_prompt_uniform < cfg.null_prompt_prob
    context = jnp.where(drop[:, None, None], null_context.astype(context.dtype), context)
    sigma, timesteps = flow.training_timesteps(cfg.logit_mean
                                               + cfg.logit_std * draws.flow_logit_normal)
    noisy = flow.add_noise(latents, draws.flow_noise, sigma)
    image_out = transformer(noisy, timesteps, context, conditions=inputs.conditions,
                            block_depth=cfg.block_depth)
    image_loss = flow.loss(latents, noisy, sigma, image_out.sample)

    # Caption pass: masked diffusion on the caption, clean latent at timestep 0.
    caption_ids = inputs.caption_ids
    times = masked.antithetic_times(draws.caption_time_uniform, cfg.caption_eps,
                                    groups.antithetic)
    noisy_ids = masked.mask_tokens(caption_ids, times, draws.caption_mask_uniform, mask_id,
                                   cfg.caption_eps)
    text_out = transformer(inputs.caption_latents, jnp.zeros((b,), jnp.float32),
                           jax.lax.stop_gradient(encode_text(noisy_ids)),
                           block_depth=cfg.block_depth)
    caption_loss = masked.loss(text_out.text_logits, caption_ids, noisy_ids, times, mask_id,
                               cfg.caption_eps)

    contrastive = losses.contrastive_loss(image_out.image_hidden, text_out.text_hidden,
                                          cfg.contrastive_temperature, groups.contrastive)
    terms = {"loss_image": image_loss, "loss_caption": caption_loss,
             "loss_contrastive": contrastive}
    total = (cfg.image_weight * image_loss + cfg.caption_weight * caption_loss
             + cfg.contrastive_weight * contrastive)
    if inputs.teacher_text is not None and inputs.teacher_image is not None:
        terms["loss_align_text"] = losses.cosine_alignment_loss(text_out.mid_text_proj,
                                                                inputs.teacher_text)
        terms["loss_align_image"] = losses.cosine_alignment_loss(image_out.mid_image_proj,
                                                                 inputs.teacher_image)
        total = total + cfg.align_weight * (terms["loss_align_text"] + terms["loss_align_image"])
    else:
        terms["loss_align_text"] = terms["loss_align_image"] = jnp.zeros((), jnp.float32)
    terms["loss"] = total
    terms["masked_fraction"] = (noisy_ids == mask_id).mean()
    return total, terms


def image_moments(vae: nnx.Module, batch: dict) -> tuple[tuple, tuple | None]:
    """(mean, log-variance) of the target's VAE posterior, and of each source's (None for
    text-to-image): the batch's cached moments (`data.cached_latents`) or the frozen VAE's
    encoder on its pixels — the whole micro-batch at once (micro-batches are already sized
    for memory), each source slot on its own."""
    target_moments, source_moments = MOMENT_KEYS
    if target_moments in batch:
        def split(moments):
            return tuple(jnp.split(moments.astype(jnp.float32), 2, axis=-1))

        target, sources = split(batch[target_moments]), batch.get(source_moments)
    else:
        whole = batch["target"].shape[0]

        def split(pixels):
            return vae.posterior(pixels, images_per_chunk=whole)

        target, sources = split(batch["target"]), batch.get("sources")
    if sources is None:
        return target, None
    return target, tuple(split(sources[:, k]) for k in range(sources.shape[1]))


def encode_images(vae: nnx.Module, batch: dict, key: jax.Array
                  ) -> tuple[jax.Array, jax.Array, tuple]:
    """(image-pass latents, caption-pass latents, source latents), VAE posterior samples.

    As the release: a text-to-image sample's two passes each draw their own posterior
    sample of the target (one encoder pass, two draws); an edit or composition sample's
    share one, and each of its sources is drawn with its own key. The draws are the same
    whether the moments were cached or encoded here (`image_moments`).
    """
    (mean, logvar), sources = image_moments(vae, batch)
    latents = vae.sample_latents(mean, logvar, jax.random.fold_in(key, 0))
    if sources is None:
        caption_latents = vae.sample_latents(mean, logvar, jax.random.fold_in(key, 1))
        conditions = ()
    else:
        caption_latents = latents
        conditions = tuple(vae.sample_latents(m, lv, jax.random.fold_in(key, 2 + k))
                           for k, (m, lv) in enumerate(sources))
    stop = jax.lax.stop_gradient
    return stop(latents), stop(caption_latents), tuple(stop(c) for c in conditions)


def batch_inputs(vae: nnx.Module, batch: dict, key: jax.Array) -> Inputs:
    """The `Inputs` of a batch of pixels and ids (see `data/read/batch_spec.py`): its images
    encoded by the frozen VAE with posterior draws from `key`."""
    latents, caption_latents, conditions = encode_images(vae, batch, key)
    return Inputs(latents=latents, caption_latents=caption_latents, conditions=conditions,
                  instruction_ids=batch["instruction_ids"], caption_ids=batch["caption_ids"],
                  **{k: batch.get(k) for k in TEACHER_KEYS})


def micro_batch_loss(transformer: nnx.Module, t5: nnx.Module, vae: nnx.Module, batch: dict,
                     null_context: jax.Array, key: jax.Array, cfg: LossConfig, mask_id: int,
                     groups: Groups | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """`objective` on a batch of pixels and ids (see `data/read/batch_spec.py`), with draws
    from `key`."""
    k_vae, k_draws = jax.random.split(key)
    inputs = batch_inputs(vae, batch, k_vae)
    draws = Draws.sample(k_draws, inputs.latents.shape, batch["caption_ids"].shape[1])
    return objective(transformer, t5, inputs, draws, null_context, cfg, mask_id, groups)
