"""Loading a converted VAE checkpoint (written by `unialign-convert vae`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from unialign_jax.checkpoints import module_io
from unialign_jax.models.vae import AutoencoderKL, VAEConfig

FORMAT = "unialign_jax.vae"


def load_vae(path: str, dtype=jnp.float32, *, param_dtype=None, shardings=None) -> AutoencoderKL:
    """The VAE in `path`, with `encode(images, key)` and `decode(latents)`.

    `dtype` is the compute dtype; parameters keep their stored dtype unless `param_dtype` is
    given. `shardings` places arrays as they are read (see `module_io.restore_module`).
    """
    config, stored_dtype = module_io.read_config(path, FORMAT)
    cfg, param_dtype = VAEConfig.from_dict(config), jnp.dtype(param_dtype or stored_dtype)
    return module_io.restore_module(
        path, lambda: AutoencoderKL(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        param_dtype, shardings)
