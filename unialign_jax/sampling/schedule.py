"""Noise schedules of the two samplers (spec section 5).

Both are computed once on the host per call, in float64 and rounded to float32 like the
reference; the jitted loops receive them as arrays, so changing the shift or the guidance
never recompiles, while the number of steps (an array length) does.
"""

from __future__ import annotations

import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
CAPTION_EPS = 1e-5


def shift_sigmas(sigmas: np.ndarray, shift: float) -> np.ndarray:
    """SD3's resolution-independent time shift: σ ↦ sσ / (1 + (s − 1)σ)."""
    return shift * sigmas / (1.0 + (shift - 1.0) * sigmas)


def flow_sigmas(num_steps: int, shift: float = 3.0,
                num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """(num_steps + 1,) float32 sigmas of diffusers' FlowMatchEulerDiscreteScheduler.

    As diffusers does, the end point is the *shifted* smallest training sigma, and the
    shift is applied to the whole grid once more, so the end point is shifted twice.
    The final σ = 0 is appended. Timesteps fed to the model are 1000·σ[:-1].
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


def caption_times(num_steps: int, eps: float = CAPTION_EPS) -> np.ndarray:
    """(num_steps + 1,) float32 times linspace(1, eps, N + 1) of the masked-diffusion sampler."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    return np.linspace(1.0, eps, num_steps + 1).astype(np.float32)
