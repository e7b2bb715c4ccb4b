"""Training configuration: one dataclass, `configs/NAME.py` files, `key=value` overrides.

A config file defines `get_config()` returning a `TrainConfig` (big_vision style: plain
Python). Command-line overrides are `key=value` with Python literals for values
(`lr=1e-4`, `t2i_shards=('/data/a','/data/b')`, `transformer={'num_layers':2}`); a
value that is not a literal is taken as a string (`workdir=gs://bucket/run`).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import typing
from typing import Any


@dataclasses.dataclass
class TrainConfig:
    # -- models -------------------------------------------------------------------------
    # A converted pipeline folder (`unialign-convert pipeline`): sets init_from, t5_path,
    # vae_path and tokenizer from its components.
    pipeline: str | None = None
    # Converted transformer folder in the UniAlignment layout (an SD3 checkpoint is ported
    # with `unialign-convert transformer --to unialignment`); None: random initialisation.
    init_from: str | None = None
    # MMDiTConfig fields of a freshly initialised transformer ({} = full size).
    transformer: dict = dataclasses.field(default_factory=dict)
    t5_path: str | None = None            # converted T5 folder; None: random T5 of `t5`
    t5: dict = dataclasses.field(default_factory=dict)    # T5Config fields when random
    vae_path: str | None = None           # converted VAE folder; None: random VAE of `vae`
    vae: dict = dataclasses.field(default_factory=dict)   # VAEConfig fields when random
    tokenizer: str | None = None          # local T5 tokenizer folder
    max_length: int = 256                 # caption / instruction tokens

    # -- data ---------------------------------------------------------------------------
    t2i_shards: tuple = ()                # shard folders of `unialign-data build --kind t2i`
    edit_shards: tuple = ()               # editing + perception shard folders
    resolution: int = 512
    data_seed: int = 0
    data_workers: int = 0                 # grain worker processes per host

    # -- batch and schedule -------------------------------------------------------------
    batch_size: int = 384                 # global, per optimizer step
    micro_batch_per_device: int = 4       # per accumulation step and device
    num_steps: int = 80_000

    # -- optimizer (torch AdamW defaults for betas / eps) -------------------------------
    lr: float = 3e-5
    warmup_steps: int = 2000
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    grad_clip_norm: float = 2.0
    ema_decay: float = 0.9995

    # -- objective (spec section 4) -----------------------------------------------------
    image_weight: float = 1.0
    caption_weight: float = 0.2
    contrastive_weight: float = 0.05
    align_weight: float = 0.1
    block_depth: int = 8                  # block after which alignment features are taken
    null_prompt_prob: float = 0.1
    contrastive_temperature: float = 0.07
    caption_eps: float = 1e-3

    # -- compute ------------------------------------------------------------------------
    dtype: str = "bfloat16"               # compute dtype of all models
    param_dtype: str = "float32"          # trained parameters, optimizer state, EMA
    frozen_param_dtype: str = "bfloat16"  # T5 and VAE weights
    remat_policy: str | None = "nothing_saveable"   # jax.checkpoint_policies name or None
    mesh_data: int = 1
    mesh_fsdp: int = -1                   # -1: all remaining devices
    mesh_tensor: int = 1
    distributed: bool | None = None       # jax.distributed.initialize(); None: from env

    # -- bookkeeping --------------------------------------------------------------------
    seed: int = 0
    log_every: int = 20
    ckpt_every: int = 5000
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    tensorboard: bool = True
    progress_bar: bool = True

    def __post_init__(self):
        self.t2i_shards, self.edit_shards = tuple(self.t2i_shards), tuple(self.edit_shards)

    def validate(self) -> None:
        """Errors that do not depend on devices or files, in the config's own words."""
        problems = []
        for name in ("batch_size", "micro_batch_per_device", "num_steps", "log_every",
                     "ckpt_every", "keep_checkpoints", "max_length", "resolution"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.null_prompt_prob <= 1.0:
            problems.append(f"null_prompt_prob must be in [0, 1], got {self.null_prompt_prob}")
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.warmup_steps < 0:
            problems.append(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.t2i_shards and not self.edit_shards:
            problems.append("no training data: set t2i_shards and/or edit_shards to folders "
                            "built by `unialign-data build`")
        if self.tokenizer is None and self.pipeline is None:
            problems.append("set tokenizer (a local T5 tokenizer folder) or pipeline")
        if problems:
            raise ValueError("invalid config:\n  " + "\n  ".join(problems))

    def resolved(self) -> "TrainConfig":
        """A copy with the pipeline folder expanded into its component paths."""
        if self.pipeline is None:
            return dataclasses.replace(self)
        from unialign_jax.checkpoints.pipeline import read_index

        where = {k: os.path.join(self.pipeline, v)
                 for k, v in read_index(self.pipeline)["components"].items()}
        return dataclasses.replace(
            self, init_from=self.init_from or where["transformer"],
            t5_path=self.t5_path or where["text_encoder"],
            vae_path=self.vae_path or where["vae"], tokenizer=self.tokenizer or where["tokenizer"])

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_config(path: str) -> TrainConfig:
    """`get_config()` of the Python file `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    spec = importlib.util.spec_from_file_location(f"_config_{os.path.basename(path)[:-3]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ValueError(f"{path} defines no get_config()")
    config = module.get_config()
    if not isinstance(config, TrainConfig):
        raise ValueError(f"{path}: get_config() returned {type(config).__name__}, not TrainConfig")
    return config


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _accepts(annotation, value) -> bool:
    """Whether `value` fits the field annotation (ints pass for floats)."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union,
                                                                     type(int | None)) else (hint,)
    for opt in options:
        if opt is type(None) and value is None:
            return True
        if opt is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return True
        if opt is tuple and isinstance(value, (tuple, list, str)):
            return True
        if isinstance(opt, type) and opt is not type(None) and isinstance(value, opt) \
                and not (opt is int and isinstance(value, bool)):
            return True
    return False


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """`key=value` overrides onto a copy of `config`; unknown keys and bad types fail."""
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    changes = {}
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r} is not key=value")
        if key not in fields:
            close = [n for n in fields if key.split("_")[0] in n]
            raise ValueError(f"unknown config key {key!r}" +
                             (f"; did you mean one of {close}?" if close else ""))
        value = _parse_value(text)
        if not _accepts(fields[key].type, value):
            raise ValueError(f"{key}={text!r}: expected {fields[key].type}, got "
                             f"{type(value).__name__}")
        if fields[key].type == "tuple" and isinstance(value, str):
            value = (value,)
        changes[key] = float(value) if fields[key].type == "float" else value
    return dataclasses.replace(config, **changes)
