"""The loss terms of UniAlignment training (spec section 4), as pure functions.

Random draws are arguments (uniforms / normals), so each term is a deterministic function
that tests compare with an independent NumPy computation; `objective.py` draws them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from unialign_jax.sampling.caption import subs_log_probs

NUM_TRAIN_TIMESTEPS = 1000
CAPTION_EPS = 1e-3


# -- image flow matching ----------------------------------------------------------------
def logit_normal_sigmas(normal: jax.Array, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
                        ) -> jax.Array:
    """σ for u ~ N(0, 1): index = ⌊T·sigmoid(u)⌋, σ = (T − index) / T (diffusers' discrete
    training timesteps with shift 1; the model sees timestep = T·σ)."""
    index = jnp.floor(num_train_timesteps * jax.nn.sigmoid(normal.astype(jnp.float32)))
    return (num_train_timesteps - index) / num_train_timesteps


def _per_sample(sigma: jax.Array, like: jax.Array) -> jax.Array:
    return sigma.reshape((-1,) + (1,) * (like.ndim - 1))


def noise_latents(latents: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_σ = (1 − σ)·x + σ·ε."""
    s = _per_sample(sigma, latents)
    return (1.0 - s) * latents + s * noise


def flow_matching_loss(latents: jax.Array, noisy: jax.Array, sigma: jax.Array,
                       velocity: jax.Array) -> jax.Array:
    """mean((x̂ − x)²) with x̂ = x_σ − σ·v: per sample, then over the batch."""
    predicted = noisy - _per_sample(sigma, latents) * velocity.astype(jnp.float32)
    per_sample = jnp.square(predicted - latents).reshape(latents.shape[0], -1).mean(-1)
    return per_sample.mean()


# -- caption masked diffusion (MDLM, SUBS, log-linear schedule) ---------------------------
def antithetic_times(uniform: jax.Array, eps: float = CAPTION_EPS) -> jax.Array:
    """t_j = (1 − ε)·((U_j / B + j / B) mod 1) + ε: one time per stratum of [ε, 1)."""
    b = uniform.shape[0]
    strata = (uniform / b + jnp.arange(b, dtype=jnp.float32) / b) % 1.0
    return (1.0 - eps) * strata + eps


def mask_tokens(ids: jax.Array, times: jax.Array, uniform: jax.Array, mask_id: int,
                eps: float = CAPTION_EPS) -> jax.Array:
    """Each token becomes `mask_id` with probability (1 − ε)·t (uniform: (B, L) in [0, 1))."""
    move = uniform < (1.0 - eps) * times[:, None]
    return jnp.where(move, mask_id, ids)


def caption_loss(logits: jax.Array, clean_ids: jax.Array, noisy_ids: jax.Array,
                 times: jax.Array, mask_id: int) -> jax.Array:
    """Σ over all tokens of −log p(x₀)·(1/t) under SUBS, divided by B·L.

    Unmasked positions contribute exactly 0 (SUBS copies them); 1/t is dσ/expm1(σ) of the
    log-linear schedule.
    """
    log_probs = subs_log_probs(logits, noisy_ids, mask_id)
    log_p_clean = jnp.take_along_axis(log_probs, clean_ids[..., None], axis=-1)[..., 0]
    weighted = -log_p_clean / times[:, None]
    return weighted.sum() / clean_ids.size


# -- contrastive and alignment ----------------------------------------------------------
def _l2_normalise(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize: x / max(‖x‖, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def contrastive_loss(image_hidden: jax.Array, text_hidden: jax.Array,
                     temperature: float = 0.07) -> jax.Array:
    """Symmetric InfoNCE between token-averaged image and text states (diagonal = pairs)."""
    img = _l2_normalise(image_hidden.astype(jnp.float32).mean(1))
    txt = _l2_normalise(text_hidden.astype(jnp.float32).mean(1))
    logits = img @ txt.T / temperature
    labels = jnp.arange(logits.shape[0])

    def cross_entropy(lg):
        return -jnp.take_along_axis(jax.nn.log_softmax(lg, -1), labels[:, None], -1).mean()

    return 0.5 * (cross_entropy(logits) + cross_entropy(logits.T))


def cosine_alignment_loss(projected: jax.Array, teacher: jax.Array,
                          eps: float = 1e-8) -> jax.Array:
    """1 − mean cosine similarity (torch `F.cosine_similarity`, norms clamped at eps)."""
    a, b = projected.astype(jnp.float32), teacher.astype(jnp.float32)
    norms = (jnp.maximum(jnp.linalg.norm(a, axis=-1), eps)
             * jnp.maximum(jnp.linalg.norm(b, axis=-1), eps))
    return 1.0 - ((a * b).sum(-1) / norms).mean()
