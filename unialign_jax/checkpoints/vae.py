"""Loading a converted VAE checkpoint (written by `unialign-convert vae`)."""

from __future__ import annotations

import jax.numpy as jnp

from unialign_jax.checkpoints import module_io
from unialign_jax.models.vae import AutoencoderKL, VAEConfig

FORMAT = "unialign_jax.vae"


def load_vae(path: str, dtype=jnp.float32, *, param_dtype=None, shardings=None) -> AutoencoderKL:
    """The VAE in `path`, with `encode(images, key)` and `decode(latents)`.

    `dtype` is the compute dtype; parameters keep their stored dtype unless `param_dtype` is
    given. `shardings` places arrays as they are read (see `module_io.restore_module`).
    """
    return module_io.load_module(path, FORMAT, VAEConfig.from_dict, AutoencoderKL, dtype,
                                 param_dtype=param_dtype, shardings=shardings)
