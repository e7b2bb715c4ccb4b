"""Which cached VAE moments a run reads (`data.cached_latents`, off by default: the release
encodes every image in every step; the cached path gives the same steps, faster)."""

from __future__ import annotations

import logging

from unialign_jax.data.format.latent_cache import has_latents, vae_identity
from unialign_jax.runs.config import TrainConfig

log = logging.getLogger(__name__)


def expected_latents(cfg: TrainConfig) -> dict | None:
    """The identity a shard folder's cache must carry to be read by this run (its VAE
    folder's digest and dtypes: `data.format.latent_cache.vae_identity`); None when the run encodes.
    `cfg` is resolved (`TrainConfig.resolved`: a pipeline folder gives models.vae_path)."""
    if not cfg.data.cached_latents:
        return None
    return vae_identity(cfg.models.vae_path, cfg.compute.dtype, cfg.compute.frozen_param_dtype)


def note_unused_caches(cfg: TrainConfig) -> None:
    """Logs the trained folders whose cached latents this run leaves unread."""
    unused = [folder for folders in cfg.data.tasks.values() for folder in folders
              if has_latents(folder)]
    if unused and not cfg.data.cached_latents:
        log.info("%s hold cached latents; data.cached_latents=True would use them and skip "
                 "the VAE encoder in every step", ", ".join(unused))
