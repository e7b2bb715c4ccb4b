"""Masked discrete diffusion sampler for captions and VQA (MDLM, SUBS; spec section 5).

The sampler only needs a *denoiser*: a static, hashable function `denoise(params, ids)` →
(B, L, V) logits. Synthetic denoisers test it; the real one (T5 of the masked ids → the
transformer's caption pass on the clean image latent at timestep 0) is built by the
pipeline. The whole loop, the final argmax pass included, is one jitted `fori_loop`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unialign_jax.diffusion import masked

Denoiser = Callable[[object, jax.Array], jax.Array]


class CaptionSample(NamedTuple):
    ids: jax.Array           # (B, L) int32, no mask id left
    num_forwards: jax.Array  # denoiser calls made, the final argmax pass included


@dataclasses.dataclass(frozen=True)
class ModelDenoiser:
    """The real denoiser: T5 of the masked ids (the mask id's row holds the learned mask
    embedding) → the transformer's caption pass on the clean image latent at timestep 0.

    Holds only the graph definitions (hashable, so the jitted loop caches on them); the
    params are (t5 state, transformer state, clean latents (B, h, w, C)).
    """

    t5: nnx.GraphDef
    transformer: nnx.GraphDef

    def __call__(self, params, ids: jax.Array) -> jax.Array:
        t5_state, transformer_state, latents = params
        context = nnx.merge(self.t5, t5_state)(ids)
        transformer = nnx.merge(self.transformer, transformer_state)
        timestep = jnp.zeros((ids.shape[0],), jnp.float32)
        return transformer(latents, timestep, context).text_logits


def sample_caption(denoise: Denoiser, params, init_ids, key: jax.Array, *, mask_id: int,
                   num_steps: int = 32, reuse_probs: bool = True,
                   final_time: float = masked.SAMPLER_FINAL_TIME) -> CaptionSample:
    """Unmasks `init_ids` by ancestral sampling from t = 1 to `final_time`, then one argmax
    pass (`diffusion.masked`).

    Args:
      denoise: static function (params, ids) → logits; hashed as the jit cache key, so
        pass the same object each time (a module-level function or a frozen dataclass).
      params: pytree the denoiser reads (weights, the image latent, ...).
      init_ids: (B, L) ids; positions equal to `mask_id` are generated, the others (a
        VQA prompt) stay fixed.
      key: one PRNG key, or (B,) keys, one per sequence; the result is a deterministic
        function of them (with per-sequence keys, each result is independent of the batch).
      reuse_probs: reuse the last probabilities when a step changed nothing instead of
        calling the denoiser again (identical samples, fewer forwards).
    """
    init_ids = jnp.asarray(init_ids, jnp.int32)
    if init_ids.ndim != 2:
        raise ValueError(f"init_ids must be (B, L), got shape {init_ids.shape}")
    keys = key if key.shape == init_ids.shape[:1] else jax.random.split(key, init_ids.shape[0])
    times = masked.sampler_times(num_steps, final_time)
    step = np.float32((1.0 - final_time) / num_steps)
    return _caption_loop(denoise, params, init_ids, keys, jnp.asarray(times), step,
                         mask_id=mask_id, reuse_probs=reuse_probs)


@functools.partial(jax.jit, static_argnums=0, static_argnames=("mask_id", "reuse_probs"))
def _caption_loop(denoise, params, ids, keys, times, dt, *, mask_id, reuse_probs):
    def probs_of(x):
        return jnp.exp(masked.subs_log_probs(denoise(params, x), x, mask_id))

    def refresh(x, probs, stale, count):
        """New probabilities if the sequence changed since `probs` (always, without reuse)."""
        if not reuse_probs:
            return probs_of(x), count + 1
        return jax.lax.cond(stale, lambda: (probs_of(x), count + 1), lambda: (probs, count))

    def body(i, carry):
        x, probs, stale, count = carry
        probs, count = refresh(x, probs, stale, count)
        step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, i)
        new = masked.unmask_step(step_keys, x, probs, times[i], times[i] - dt, mask_id)
        return new, probs, jnp.any(new != x), count

    batch, length = ids.shape
    vocab = jax.eval_shape(denoise, params, ids).shape[-1]
    carry = (ids, jnp.zeros((batch, length, vocab), jnp.float32), jnp.bool_(True),
             jnp.int32(0))
    ids, probs, stale, count = jax.lax.fori_loop(0, times.shape[0] - 1, body, carry)
    probs, count = refresh(ids, probs, stale, count)
    return CaptionSample(jnp.argmax(probs, axis=-1).astype(jnp.int32), count)
