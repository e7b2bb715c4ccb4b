"""Converted transformer folders: `config.json` (our MMDiTConfig) + Orbax parameters."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from flax import nnx

from unialign_jax.checkpoints import io
from unialign_jax.models.mmdit import MMDiT, MMDiTConfig

FORMAT = "unialign_jax.transformer"


def write_config(folder: str, config: MMDiTConfig, param_dtype: str, **extra) -> None:
    io.write_json(os.path.join(folder, "config.json"),
                  {"format": FORMAT, "param_dtype": param_dtype, "config": config.to_dict(),
                   **extra})


def read_config(path: str) -> tuple[MMDiTConfig, str]:
    meta = io.read_json(os.path.join(path, "config.json"))
    if meta.get("format") != FORMAT:
        raise io.CheckpointError(
            f"{path} is not a converted transformer (format {meta.get('format')!r}); "
            "convert a diffusers folder first with `unialign-convert transformer SRC DST`")
    return MMDiTConfig.from_dict(meta["config"]), meta["param_dtype"]


def load_transformer(path: str, dtype=jnp.float32, *, param_dtype=None,
                     remat_policy=None, attention_impl=None, shardings=None) -> MMDiT:
    """Builds the model of a converted folder and reads its weights into it.

    `dtype` is the compute dtype; parameters stay in their stored dtype unless `param_dtype`
    is given. `remat_policy` and `attention_impl` are `MMDiT`'s options. `shardings` (a function from the abstract model to a tree of shardings, see
    `unialign_jax.parallel`) places each array as it is read, so no host holds it all.
    """
    config, stored_dtype = read_config(path)
    param_dtype = jnp.dtype(param_dtype or stored_dtype)
    abstract = nnx.eval_shape(lambda: MMDiT(config, rngs=nnx.Rngs(0), dtype=dtype,
                                            param_dtype=param_dtype, remat_policy=remat_policy,
                                            attention_impl=attention_impl))
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    placement = nnx.to_pure_dict(shardings(abstract)) if shardings is not None else None
    try:
        restored = io.load_params(path, io.abstract_like(pure, param_dtype, placement))
    except ValueError as e:
        raise io.CheckpointError(f"{path}: parameters do not match config.json ({e})") from None
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, restored))
    return nnx.merge(graphdef, state)
