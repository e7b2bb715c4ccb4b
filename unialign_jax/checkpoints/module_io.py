"""Converted model folders: `config.json` ({"format", "param_dtype", "config"}, as for the
transformer) plus the Orbax parameters of an NNX module, restored without ever computing a
random initialisation."""

from __future__ import annotations

import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from unialign_jax.checkpoints import io

CONFIG_FILE = "config.json"


def write_config(folder: str, fmt: str, config: dict[str, Any], param_dtype: str) -> None:
    io.write_json(os.path.join(folder, CONFIG_FILE),
                  {"format": fmt, "param_dtype": param_dtype, "config": config})


def read_config(folder: str, fmt: str) -> tuple[dict[str, Any], str]:
    """(config fields, stored parameter dtype) of a folder written with the same `fmt`."""
    if not os.path.isdir(folder):
        raise io.CheckpointError(f"checkpoint folder not found: {folder}")
    meta = io.read_json(os.path.join(folder, CONFIG_FILE))
    if meta.get("format") != fmt:
        raise io.CheckpointError(
            f"{folder} is not a {fmt} checkpoint (format {meta.get('format')!r}); convert the "
            "PyTorch folder first with unialign-convert")
    return meta["config"], meta["param_dtype"]


def restore_module(folder: str, build: Callable[[], nnx.Module], param_dtype,
                   shardings: Callable[[nnx.Module], Any] | None = None) -> nnx.Module:
    """`build()`'s module with its parameters read from `folder` as `param_dtype`.

    The module is only traced (`nnx.eval_shape`). `shardings` (abstract module → tree of
    shardings) places each array as it is read, so no host holds the whole model.
    """
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    placement = nnx.to_pure_dict(shardings(abstract)) if shardings is not None else None
    restored = io.load_params(folder, io.abstract_like(pure, param_dtype, placement))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, restored))
    return nnx.merge(graphdef, state)


def load_module(path: str, fmt: str, config_from_dict: Callable[[dict], Any],
                module_cls: Callable[..., nnx.Module], dtype=jnp.float32, *, param_dtype=None,
                shardings=None, **module_kwargs) -> nnx.Module:
    """The model of a converted folder, built from its config and filled from its weights.

    `dtype` is the compute dtype; parameters keep their stored dtype unless `param_dtype` is
    given; `module_kwargs` go to the module's constructor (e.g. `remat_policy`).
    """
    fields, stored_dtype = read_config(path, fmt)
    config, param_dtype = config_from_dict(fields), jnp.dtype(param_dtype or stored_dtype)
    return restore_module(
        path, lambda: module_cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype,
                                 **module_kwargs),
        param_dtype, shardings)
