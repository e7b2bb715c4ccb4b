"""The three kinds of converted model folder — transformer, T5 encoder, VAE — in one table.

A folder holds `config.json` ({"format", "param_dtype", "config"}) and the module's Orbax
parameters (`io.py`). Each kind names its format tag, its config class and its module
class; reading, writing and loading are the same code for all three, and a model is
restored without ever computing a random initialisation.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

from unialign_jax import files
from unialign_jax.checkpoints import io
from unialign_jax.models.mmdit import MMDiT, MMDiTConfig
from unialign_jax.models.runtime import Runtime
from unialign_jax.models.t5 import T5Config, T5Encoder
from unialign_jax.models.vae import AutoencoderKL, VAEConfig

CONFIG_FILE = "config.json"
# What a folder was converted from (`unialign-convert`): source, dtype and what each kind
# adds (initialised and dropped keys, the mask embedding, a release step).
CONVERSION_FILE = "conversion.json"


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """How one kind of model is stored and built."""

    name: str
    format: str          # the "format" tag of its config.json
    config_class: type   # a `configlib.JsonConfig` dataclass
    module_class: type   # built as module_class(config, rngs=, dtype=, param_dtype=, **options)
    convert_with: str    # the unialign-convert subcommand that writes it


KINDS = {k.name: k for k in (
    ModelKind("transformer", "unialign_jax.transformer", MMDiTConfig, MMDiT, "transformer"),
    ModelKind("t5", "unialign_jax.t5", T5Config, T5Encoder, "t5"),
    ModelKind("vae", "unialign_jax.vae", VAEConfig, AutoencoderKL, "vae"),
)}


def write_config(folder: str, kind: str, config, param_dtype: str) -> None:
    files.write_json(os.path.join(folder, CONFIG_FILE),
                     {"format": KINDS[kind].format, "param_dtype": str(param_dtype),
                      "config": config.to_dict()})


def write_conversion(folder: str, report: dict) -> None:
    files.write_json(os.path.join(folder, CONVERSION_FILE), report)


def read_config(folder: str, kind: str) -> tuple[Any, str]:
    """(config, stored parameter dtype) of a converted folder of `kind`."""
    spec = KINDS[kind]
    if not os.path.isdir(folder):
        raise io.CheckpointError(f"checkpoint folder not found: {folder}")
    try:
        meta = files.read_json(os.path.join(folder, CONFIG_FILE))
    except (FileNotFoundError, ValueError) as e:
        raise io.CheckpointError(str(e)) from None
    if not isinstance(meta, dict) or meta.get("format") != spec.format:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise io.CheckpointError(
            f"{folder} is not a {spec.format} checkpoint (format {found!r}); convert the "
            f"PyTorch folder first with `unialign-convert {spec.convert_with}`")
    try:
        return spec.config_class.from_dict(meta["config"]), meta["param_dtype"]
    except (KeyError, TypeError, ValueError) as e:
        raise io.CheckpointError(f"{folder}/{CONFIG_FILE}: bad configuration ({e})") from None


def restore_module(folder: str, build: Callable[[], nnx.Module], param_dtype,
                   shardings: Callable[[nnx.Module], Any] | None = None) -> nnx.Module:
    """`build()`'s module with its parameters read from `folder` as `param_dtype`.

    The module is only traced (`nnx.eval_shape`). `shardings` (abstract module → tree of
    shardings, e.g. `parallel.module_shardings(mesh)`) places each array as it is read, so
    no host holds the whole model.
    """
    abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    pure = nnx.to_pure_dict(state)
    placement = nnx.to_pure_dict(shardings(abstract)) if shardings is not None else None
    restored = io.load_params(folder, io.abstract_like(pure, param_dtype, placement))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, restored))
    return nnx.merge(graphdef, state)


def load_model(kind: str, path: str, runtime: Runtime = Runtime()) -> nnx.Module:
    """The model of a converted folder, built from its config and filled from its weights,
    run as `runtime` says (its weights keep their stored dtype unless it sets one)."""
    config, stored_dtype = read_config(path, kind)
    runtime = runtime.storing(stored_dtype)
    return restore_module(
        path, lambda: runtime.build(KINDS[kind].module_class, config, nnx.Rngs(0)),
        runtime.param_dtype, runtime.shardings)


def save_model(kind: str, module: nnx.Module, folder: str, param_dtype: str = "float32", *,
               force: bool = False) -> None:
    """Writes `module` (its config and every variable) as a converted folder, atomically."""
    with files.atomic_output_dir(folder, force=force) as tmp:
        state = jax.tree.map(lambda x: jnp.asarray(x, param_dtype)
                             if jnp.issubdtype(x.dtype, jnp.floating) else x,
                             nnx.to_pure_dict(nnx.state(module)))
        io.save_params(tmp, state)
        write_config(tmp, kind, module.config, param_dtype)


def load_transformer(path: str, dtype=jnp.float32, **runtime) -> MMDiT:
    """The MMDiT of a converted transformer folder (`unialign-convert transformer`);
    `runtime`: the other `Runtime` fields (`param_dtype`, `attention`, ...).

    `model(latents, timestep, context, ...)`; see `MMDiT` for the options.
    """
    return load_model("transformer", path, Runtime(dtype, **runtime))


def load_t5(path: str, dtype=jnp.float32, **runtime) -> T5Encoder:
    """The T5 encoder of a converted folder (`unialign-convert t5`): `t5(ids)` → (B, L, D)."""
    return load_model("t5", path, Runtime(dtype, **runtime))


def load_vae(path: str, dtype=jnp.float32, **runtime) -> AutoencoderKL:
    """The VAE of a converted folder (`unialign-convert vae`): `encode(images, key)`,
    `decode(latents)`, channels-last, images in [-1, 1]."""
    return load_model("vae", path, Runtime(dtype, **runtime))
