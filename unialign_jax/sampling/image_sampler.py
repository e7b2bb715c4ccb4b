"""Flow-matching Euler sampler with classifier-free guidance, one jitted loop per shape.

The whole denoising loop is a `lax.scan` inside a single `jax.jit`: no per-step host round
trip. The model is split into (graphdef, state); the graphdef is a static argument, so the
compiled loop is cached per (model structure, batch, resolution, steps, task) by jit itself
and a second call with the same shapes compiles nothing.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unialign_jax.diffusion import flow


def sample_images(model: nnx.Module, init_latents, context, negative_context=None, *,
                  num_steps: int, guidance_scale: float = 7.0,
                  shift: float = flow.INFERENCE_SHIFT, conditions: Sequence = (),
                  num_train_timesteps: int = flow.NUM_TRAIN_TIMESTEPS) -> jax.Array:
    """Integrates the flow ODE from `init_latents` (pure noise, σ = 1) to σ = 0.

    Args:
      model: the MMDiT, called as `model(latents, timestep, context, conditions=...)`.
      init_latents: (B, H, W, C) starting noise, channels-last.
      context: (B, L, D) T5 states of the prompts.
      negative_context: (B or 1, L, D) T5 states of the negative prompt; `None` runs
        without guidance (one forward per step).
      num_steps, shift: the schedule (`diffusion.flow.inference_sigmas`).
      guidance_scale: v = v_neg + g·(v_pos − v_neg), computed on a [negative, positive]
        batch so each step is a single forward.
      conditions: clean (B, H, W, C) condition latents (editing / perception: one,
        composition: several); the same ones go with both halves of the guidance batch.

    Returns:
      (B, H, W, C) float32 final latents.
    """
    init_latents = jnp.asarray(init_latents)
    context = jnp.asarray(context)
    conditions = tuple(jnp.asarray(c) for c in conditions)
    if negative_context is not None:
        negative_context = jnp.asarray(negative_context)
    _check_shapes(init_latents, context, negative_context, conditions)
    if negative_context is not None and negative_context.shape[0] != context.shape[0]:
        negative_context = jnp.broadcast_to(negative_context, context.shape)
    sigmas = flow.inference_sigmas(num_steps, shift, num_train_timesteps)
    graphdef, state = nnx.split(model)
    return _euler_loop(graphdef, state, init_latents, context, negative_context, conditions,
                       jnp.asarray(sigmas), jnp.float32(guidance_scale),
                       num_train_timesteps=num_train_timesteps)


def _check_shapes(latents, context, negative_context, conditions) -> None:
    """Shape errors here, in plain words, instead of deep inside a trace."""
    if latents.ndim != 4:
        raise ValueError(f"init_latents must be (B, H, W, C), got shape {latents.shape}")
    if context.ndim != 3 or context.shape[0] != latents.shape[0]:
        raise ValueError(f"context must be (B, L, D) with B = {latents.shape[0]}, "
                         f"got shape {context.shape}")
    if negative_context is not None and (
            negative_context.shape[1:] != context.shape[1:]
            or negative_context.shape[0] not in (1, context.shape[0])):
        raise ValueError(f"negative_context shape {negative_context.shape} does not match "
                         f"context shape {context.shape} (batch may be 1)")
    for i, c in enumerate(conditions):
        if c.shape != latents.shape:
            raise ValueError(f"condition {i} has shape {c.shape}; condition latents must have "
                             f"the target's shape {latents.shape}")


@functools.partial(jax.jit, static_argnums=0, static_argnames="num_train_timesteps")
def _euler_loop(graphdef, state, latents, context, negative_context, conditions, sigmas,
                guidance_scale, *, num_train_timesteps):
    model = nnx.merge(graphdef, state)
    guided = negative_context is not None
    if guided:
        context = jnp.concatenate([negative_context, context])
        conditions = tuple(jnp.concatenate([c, c]) for c in conditions)

    def velocity(x, sigma):
        x_in = jnp.concatenate([x, x]) if guided else x
        timestep = jnp.full((x_in.shape[0],), flow.timestep(sigma, num_train_timesteps),
                            jnp.float32)
        v = model(x_in, timestep, context, conditions=conditions).sample.astype(jnp.float32)
        return flow.guide(*jnp.split(v, 2), guidance_scale) if guided else v

    def euler_step(x, sigma_pair):
        sigma, sigma_next = sigma_pair
        return flow.euler_step(x, velocity(x, sigma), sigma, sigma_next), None

    x, _ = jax.lax.scan(euler_step, latents.astype(jnp.float32), (sigmas[:-1], sigmas[1:]))
    return x
