"""Aspect-ratio buckets against the model (`data.buckets`): every bucket of the resolution
must fit the transformer's position table, checked before anything is built."""

from __future__ import annotations

from unialign_jax.images import bucket_table
from unialign_jax.runs.config import TrainConfig
from unialign_jax.runs.builder import frozen_configs, transformer_config


def check_bucket_sizes(cfg: TrainConfig) -> None:
    """A clear error naming the buckets whose side, in patches, exceeds the transformer's
    `pos_embed_max_size` (its position table crops no further)."""
    if not cfg.data.buckets:
        return
    transformer = transformer_config(cfg.models, None)
    _, vae = frozen_configs(cfg.models)
    per_patch = vae.downsample_factor * transformer.patch_size
    limit = transformer.pos_embed_max_size
    too_large = [f"{w}x{h}" for w, h in bucket_table(cfg.data.resolution)
                 if max(w, h) // per_patch > limit]
    if too_large:
        raise ValueError(
            f"invalid config: data.buckets at data.resolution {cfg.data.resolution}: buckets "
            f"{', '.join(too_large)} are more than {limit} patches of {per_patch} px on a side, "
            f"beyond the transformer's position table (pos_embed_max_size {limit}); lower "
            "data.resolution or set data.buckets=False")
