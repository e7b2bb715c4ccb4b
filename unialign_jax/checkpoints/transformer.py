"""Converted transformer folders: `config.json` (our MMDiTConfig) + Orbax parameters."""

from __future__ import annotations

import jax.numpy as jnp

from unialign_jax.checkpoints import module_io
from unialign_jax.models.mmdit import MMDiT, MMDiTConfig

FORMAT = "unialign_jax.transformer"


def write_config(folder: str, config: MMDiTConfig, param_dtype: str) -> None:
    module_io.write_config(folder, FORMAT, config.to_dict(), param_dtype)


def read_config(path: str) -> tuple[MMDiTConfig, str]:
    fields, param_dtype = module_io.read_config(path, FORMAT)
    return MMDiTConfig.from_dict(fields), param_dtype


def load_transformer(path: str, dtype=jnp.float32, *, param_dtype=None,
                     remat_policy=None, attention_impl=None, shardings=None) -> MMDiT:
    """Builds the model of a converted folder and reads its weights into it.

    `dtype` is the compute dtype; parameters stay in their stored dtype unless `param_dtype`
    is given. `remat_policy` and `attention_impl` are `MMDiT`'s options. `shardings` (a
    function from the abstract model to a tree of shardings, see `unialign_jax.parallel`)
    places each array as it is read, so no host holds it all.
    """
    return module_io.load_module(path, FORMAT, MMDiTConfig.from_dict, MMDiT, dtype,
                                 param_dtype=param_dtype, shardings=shardings,
                                 remat_policy=remat_policy, attention_impl=attention_impl)
