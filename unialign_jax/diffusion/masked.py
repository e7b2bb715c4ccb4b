"""Masked discrete diffusion on caption tokens: MDLM with the SUBS parameterisation and the
log-linear schedule (a token is masked with probability (1 − ε)·t at time t).

Training draws antithetic times and masks tokens; sampling unmasks from t = 1 to
t = `SAMPLER_FINAL_TIME` by ancestral steps and ends with one argmax pass. Two different
small numbers live here and keep different names: the schedule's ε of training, and the
sampler's last time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# ε of the log-linear schedule in training: times lie in [ε, 1), masking probability (1 − ε)·t.
SCHEDULE_EPS = 1e-3
# The sampler's grid runs linspace(1, SAMPLER_FINAL_TIME, N + 1) (the release's `eps=1e-5`).
SAMPLER_FINAL_TIME = 1e-5
# The release's stand-in for −∞ in the SUBS log-probabilities.
NEG_INF = -1e6


# -- training ---------------------------------------------------------------------------
def antithetic_times(uniform: jax.Array, eps: float = SCHEDULE_EPS, groups: int = 1
                     ) -> jax.Array:
    """t_j = (1 − ε)·((U_j / n + j / n) mod 1) + ε: one time per stratum of [ε, 1), within
    each of `groups` consecutive groups of n rows (the release stratifies each GPU's
    micro-batch on its own)."""
    b = uniform.shape[0]
    if b % groups:
        raise ValueError(f"{b} rows cannot be split into {groups} antithetic groups")
    n = b // groups
    j = jnp.tile(jnp.arange(n, dtype=jnp.float32), groups)
    strata = (uniform / n + j / n) % 1.0
    return (1.0 - eps) * strata + eps


def total_noise(times: jax.Array, eps: float = SCHEDULE_EPS) -> tuple[jax.Array, jax.Array]:
    """(σ(t), dσ/dt) of the log-linear schedule: σ = −log(1 − (1 − ε)·t)."""
    return (-jnp.log1p(-(1.0 - eps) * times), (1.0 - eps) / (1.0 - (1.0 - eps) * times))


def mask_tokens(ids: jax.Array, times: jax.Array, uniform: jax.Array, mask_id: int,
                eps: float = SCHEDULE_EPS) -> jax.Array:
    """Each token becomes `mask_id` with probability 1 − exp(−σ(t)) = (1 − ε)·t, computed
    the release's way (uniform: (B, L) in [0, 1))."""
    sigma, _ = total_noise(times, eps)
    move = uniform < 1.0 - jnp.exp(-sigma[:, None])
    return jnp.where(move, mask_id, ids)


def subs_log_probs(logits: jax.Array, ids: jax.Array, mask_id: int) -> jax.Array:
    """SUBS: the mask id is never predicted, unmasked ids are kept.

    Adds −1e6 at the mask id and log-softmaxes; at positions that are not masked the
    result is −1e6 everywhere except 0 at the observed id.
    """
    logits = logits.astype(jnp.float32).at[..., mask_id].add(NEG_INF)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    observed = jax.nn.one_hot(ids, logits.shape[-1], dtype=jnp.bool_)
    keep = jnp.where(observed, 0.0, NEG_INF)
    return jnp.where((ids != mask_id)[..., None], keep, log_probs)


def loss(logits: jax.Array, clean_ids: jax.Array, noisy_ids: jax.Array, times: jax.Array,
         mask_id: int, eps: float = SCHEDULE_EPS) -> jax.Array:
    """Σ over all tokens of −log p(x₀)·dσ/expm1(σ) under SUBS, divided by B·L.

    Unmasked positions contribute exactly 0 (SUBS copies them); dσ/expm1(σ) = 1/t for the
    log-linear schedule, computed the release's way.
    """
    log_probs = subs_log_probs(logits, noisy_ids, mask_id)
    log_p_clean = jnp.take_along_axis(log_probs, clean_ids[..., None], axis=-1)[..., 0]
    sigma, dsigma = total_noise(times, eps)
    weighted = -log_p_clean * (dsigma / jnp.expm1(sigma))[:, None]
    return weighted.sum() / clean_ids.size


# -- sampling ---------------------------------------------------------------------------
def sampler_times(num_steps: int, final_time: float = SAMPLER_FINAL_TIME) -> np.ndarray:
    """(num_steps + 1,) float32 times linspace(1, final_time, N + 1)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return np.linspace(1.0, final_time, num_steps + 1).astype(np.float32)


def unmask_step(keys: jax.Array, ids: jax.Array, probs: jax.Array, t, s,
                mask_id: int) -> jax.Array:
    """One reverse step from time t to s < t for (B, L) `ids`, with (B,) `keys`.

    Each masked position draws from weights p·(t − s) on the real ids and s on the mask id
    (an exponential race: argmax_k w_k / E_k with E_k ~ Exp(1)), so it stays masked with
    probability s / t; unmasked positions never change.
    """
    weights = (probs * (t - s)).at[..., mask_id].set(s)
    race = jax.vmap(lambda k: jax.random.exponential(k, weights.shape[1:], jnp.float32))(keys)
    drawn = jnp.argmax(weights / race, axis=-1).astype(ids.dtype)
    return jnp.where(ids == mask_id, drawn, ids)
