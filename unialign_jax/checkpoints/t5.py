"""Loading a converted T5 encoder checkpoint (written by `unialign-convert t5`)."""

from __future__ import annotations

import jax.numpy as jnp

from unialign_jax.checkpoints import module_io
from unialign_jax.models.t5 import T5Config, T5Encoder

FORMAT = "unialign_jax.t5"


def load_t5(path: str, dtype=jnp.float32, *, param_dtype=None, shardings=None) -> T5Encoder:
    """The encoder in `path`: `t5(input_ids)` → (B, L, d_model).

    `dtype` is the compute dtype; parameters keep their stored dtype unless `param_dtype` is
    given. `shardings` places arrays as they are read (see `module_io.restore_module`).
    """
    return module_io.load_module(path, FORMAT, T5Config.from_dict, T5Encoder, dtype,
                                 param_dtype=param_dtype, shardings=shardings)
