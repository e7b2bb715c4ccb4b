"""Rectified flow on image latents: x_σ = (1 − σ)·x + σ·ε, the model predicts v = ε − x.

Training draws σ from a logit-normal over SD3's discrete grid of 1000 timesteps (shift 1);
sampling integrates with Euler steps on diffusers' shifted grid (shift 3). The model always
sees the timestep 1000·σ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
# SD3-medium's scheduler config: the inference grid is shifted by 3 (training uses 1).
INFERENCE_SHIFT = 3.0


def timestep(sigma: jax.Array, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> jax.Array:
    """What the transformer is conditioned on: 1000·σ."""
    return sigma * num_train_timesteps


# -- training ---------------------------------------------------------------------------
def training_timesteps(normal: jax.Array, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
                       ) -> tuple[jax.Array, jax.Array]:
    """(σ, timestep) for u ~ N(0, 1): index = ⌊T·sigmoid(u)⌋, timestep = T − index (an
    integer, as diffusers' discrete training grid with shift 1 feeds it), σ = timestep / T."""
    index = jnp.floor(num_train_timesteps * jax.nn.sigmoid(normal.astype(jnp.float32)))
    timesteps = num_train_timesteps - index
    return timesteps / num_train_timesteps, timesteps


def _per_sample(sigma: jax.Array, like: jax.Array) -> jax.Array:
    return sigma.reshape((-1,) + (1,) * (like.ndim - 1))


def add_noise(latents: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """x_σ = (1 − σ)·x + σ·ε."""
    s = _per_sample(sigma, latents)
    return (1.0 - s) * latents + s * noise


def loss(latents: jax.Array, noisy: jax.Array, sigma: jax.Array, velocity: jax.Array
         ) -> jax.Array:
    """mean((x̂ − x)²) with x̂ = x_σ − σ·v: per sample, then over the batch."""
    predicted = noisy - _per_sample(sigma, latents) * velocity.astype(jnp.float32)
    per_sample = jnp.square(predicted - latents).reshape(latents.shape[0], -1).mean(-1)
    return per_sample.mean()


# -- sampling ---------------------------------------------------------------------------
def shift_sigmas(sigmas, shift: float):
    """SD3's resolution-independent time shift: σ ↦ sσ / (1 + (s − 1)σ)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def inference_sigmas(num_steps: int, shift: float = INFERENCE_SHIFT,
                     num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """(num_steps + 1,) float32 sigmas of diffusers' FlowMatchEulerDiscreteScheduler.

    Computed on the host in float64 and rounded to float32 like the reference. As diffusers
    does, the end point is the *shifted* smallest training sigma and the shift is applied
    to the whole grid once more, so the end point is shifted twice; σ = 0 is appended.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    # The training grid is float32 in diffusers, so its smallest shifted sigma is too.
    sigma_min = float(shift_sigmas(np.float32(1.0 / num_train_timesteps), np.float32(shift)))
    grid = np.linspace(num_train_timesteps * 1.0, num_train_timesteps * sigma_min, num_steps)
    sigmas = shift_sigmas(grid / num_train_timesteps, shift).astype(np.float32)
    return np.concatenate([sigmas, np.zeros(1, np.float32)])


def guide(v_negative: jax.Array, v_positive: jax.Array, scale) -> jax.Array:
    """Classifier-free guidance: v = v_neg + g·(v_pos − v_neg)."""
    return v_negative + scale * (v_positive - v_negative)


def euler_step(x: jax.Array, velocity: jax.Array, sigma, sigma_next) -> jax.Array:
    """x ← x + (σ_next − σ)·v."""
    return x + (sigma_next - sigma) * velocity
