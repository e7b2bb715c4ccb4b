"""Loading a converted T5 encoder checkpoint (written by `unialign-convert t5`)."""

from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from unialign_jax.checkpoints import module_io
from unialign_jax.models.t5 import T5Config, T5Encoder

FORMAT = "unialign_jax.t5"


def load_t5(path: str, dtype=jnp.float32, *, param_dtype=None, shardings=None) -> T5Encoder:
    """The encoder in `path`: `t5(input_ids)` → (B, L, d_model).

    `dtype` is the compute dtype; parameters keep their stored dtype unless `param_dtype` is
    given. `shardings` places arrays as they are read (see `module_io.restore_module`).
    """
    config, stored_dtype = module_io.read_config(path, FORMAT)
    cfg, param_dtype = T5Config.from_dict(config), jnp.dtype(param_dtype or stored_dtype)
    return module_io.restore_module(
        path, lambda: T5Encoder(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype),
        param_dtype, shardings)
