"""`unialign-convert export`: our transformer (a converted folder, or a training work dir's
EMA or raw weights) → a diffusers folder that PyTorch loads with no missing or unexpected key.

The UniAlignment layout loads into `unialign_convert.torch_unialignment.SD3JointModelFlexible`
(any size; the release's own class only at full size), the SD3 layout into diffusers'
`SD3Transformer2DModel`. The key mapping is the import's own
(`transformer_keys.tensor_moves`, `t5.tensor_moves`, `vae.tensor_moves`) read in reverse,
so the two directions cannot drift apart. Parameters are read once into host memory (numpy,
never onto an accelerator) and written tensor by tensor into safetensors shards of at most
`--max-shard-size` with diffusers' index file; DST appears only when everything was written.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import jax
import numpy as np
from flax import nnx, traverse_util

from unialign_convert import param_mapping, t5, transformer_keys, vae
from unialign_convert.param_mapping import TensorMove
from unialign_convert.safetensors_io import (ConversionError, TensorOut, parse_size,
                                             write_weights)
from unialign_jax import files
from unialign_jax.checkpoints import io, registry
from unialign_jax.runs import work_dir
from unialign_jax.models.mmdit_config import MMDiTConfig
from unialign_jax.models.t5 import T5Config
from unialign_jax.models.vae import VAEConfig

DEFAULT_MAX_SHARD_SIZE = "10GB"  # diffusers' save_pretrained default
_RELEASE = MMDiTConfig()  # what the released classes hard-code


def transformer_config(config: MMDiTConfig) -> dict:
    """diffusers' config.json of the model (the inverse of `MMDiTConfig.from_diffusers`)."""
    if config.timestep_channels != _RELEASE.timestep_channels:
        raise ConversionError(f"timestep_channels {config.timestep_channels}: the diffusers "
                              f"classes fix it at {_RELEASE.timestep_channels}")
    out = {"_class_name": "SD3Transformer2DModel" if config.is_sd3 else "SD3JointModelFlexible",
           "sample_size": config.sample_size, "patch_size": config.patch_size,
           "in_channels": config.in_channels, "out_channels": config.out_channels,
           "num_layers": config.num_layers, "attention_head_dim": config.head_dim,
           "num_attention_heads": config.num_heads,
           "joint_attention_dim": config.joint_attention_dim,
           "caption_projection_dim": config.width,
           "pooled_projection_dim": config.pooled_projection_dim,
           "pos_embed_max_size": config.pos_embed_max_size}
    if not config.is_sd3:
        out.update(vocab_size=config.vocab_size, adapter_hidden_dim=config.adapter_hidden_dim,
                   teacher_dim=config.teacher_dim)
        if config.num_null_tokens != _RELEASE.num_null_tokens:  # the release has 8
            out["num_null_tokens"] = config.num_null_tokens
    return out


def t5_config(cfg: T5Config) -> dict:
    """transformers' config.json of a T5 v1.1 encoder (the inverse of
    `t5.config_from_transformers`)."""
    return {"architectures": ["T5EncoderModel"], "model_type": "t5",
            "vocab_size": cfg.vocab_size, "d_model": cfg.d_model, "d_kv": cfg.head_dim,
            "d_ff": cfg.d_ff, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
            "relative_attention_num_buckets": cfg.relative_attention_num_buckets,
            "relative_attention_max_distance": cfg.relative_attention_max_distance,
            "layer_norm_epsilon": cfg.layer_norm_epsilon, "feed_forward_proj": "gated-gelu",
            "is_gated_act": True, "dense_act_fn": "gelu_new", "tie_word_embeddings": False,
            "dropout_rate": 0.1, "is_encoder_decoder": False, "use_cache": False}


def vae_config(cfg: VAEConfig) -> dict:
    """diffusers' config.json of SD3's AutoencoderKL (the inverse of
    `vae.config_from_diffusers`)."""
    levels = len(cfg.block_out_channels)
    return {"_class_name": "AutoencoderKL", "in_channels": cfg.in_channels,
            "out_channels": cfg.out_channels, "latent_channels": cfg.latent_channels,
            "block_out_channels": list(cfg.block_out_channels),
            "layers_per_block": cfg.layers_per_block, "norm_num_groups": cfg.norm_num_groups,
            "scaling_factor": cfg.scaling_factor, "shift_factor": cfg.shift_factor,
            "act_fn": "silu", "down_block_types": ["DownEncoderBlock2D"] * levels,
            "up_block_types": ["UpDecoderBlock2D"] * levels, "use_quant_conv": False,
            "use_post_quant_conv": False, "mid_block_add_attention": True}


@dataclasses.dataclass(frozen=True)
class ExportKind:
    weights_name: str
    config: Callable[[Any], dict]
    moves: Callable[[Any, dict], list[TensorMove]]  # (config, abstract tree) → moves


EXPORTS = {
    "transformer": ExportKind("diffusion_pytorch_model", transformer_config,
                              lambda cfg, _: transformer_keys.tensor_moves(cfg)),
    # transformers ties encoder.embed_tokens to shared: store `shared.weight` once.
    "t5": ExportKind("model", t5_config, lambda cfg, _: t5.tensor_moves(cfg, ())),
    "vae": ExportKind("diffusion_pytorch_model", vae_config, lambda _, tree: vae.tensor_moves(
        tree)),
}


def abstract_tree(kind: str, config, param_dtype) -> dict:
    """Shapes and dtypes of every variable of a `kind` model (pure dict)."""
    module_class = registry.KINDS[kind].module_class
    module = nnx.eval_shape(lambda: module_class(config, rngs=nnx.Rngs(0),
                                                 param_dtype=param_dtype))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                        nnx.to_pure_dict(nnx.state(module)))


def read_folder(kind: str, folder: str) -> tuple[Any, dict]:
    """(config, variables as host numpy arrays in their stored dtype) of a converted folder."""
    config, stored = registry.read_config(folder, kind)
    target = abstract_tree(kind, config, stored)
    return config, io.read_tree(os.path.join(os.path.abspath(folder), io.PARAMS_DIR), target,
                                where=folder)


def read_run(workdir: str, step: int | None, weights: str | None) -> tuple[MMDiTConfig, dict,
                                                                            dict]:
    """(config, variables as host numpy arrays, which weights) of a training run's
    transformer: the trained parameters of the chosen step plus the position table."""
    chosen = work_dir.describe(workdir, step, weights)
    run_config = work_dir.read_run_config(workdir)
    vocab = len(work_dir.run_tokenizer(workdir, run_config))
    config = work_dir.model_config(workdir, "transformer", vocab, run_config)
    module = work_dir.transformer_module(workdir, chosen["step"], chosen["weights"], config,
                                         config=run_config)
    tree = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(module)))
    return config, tree, chosen


def _torch_value(move: TensorMove, leaf: np.ndarray, dtype) -> np.ndarray:
    placed = leaf if move.layer is None else leaf[move.layer]
    return move.unplace(np.asarray(placed)).astype(dtype)


def export_tensors(kind: str, config, tree: dict, dtype: str = "float32") -> list[TensorOut]:
    """The PyTorch tensors of `tree` (our variables of a `kind` model, arrays or only
    shapes): key, torch shape and dtype now, values when written."""
    out_dtype = param_mapping.output_dtype(dtype)
    flat = traverse_util.flatten_dict(tree)
    tensors = []
    for m in EXPORTS[kind].moves(config, tree):
        leaf = flat[m.target]
        shape = tuple(leaf.shape) if m.layer is None else tuple(leaf.shape[1:])
        tensors.append(TensorOut(m.source, m.source_shape(shape), out_dtype,
                                 functools.partial(_torch_value, m, leaf, out_dtype)))
    return tensors


def write_export(kind: str, config, tree: dict, out_dir: str, *, dtype: str = "float32",
                 max_shard_size: str = DEFAULT_MAX_SHARD_SIZE) -> dict:
    """Writes `tree` (our variables of a `kind` model) into the existing folder `out_dir` in
    the PyTorch layout; returns a summary."""
    tensors = export_tensors(kind, config, tree, dtype)
    names = write_weights(out_dir, EXPORTS[kind].weights_name, tensors,
                          parse_size(max_shard_size))
    files.write_json(os.path.join(out_dir, "config.json"), EXPORTS[kind].config(config))
    return {"num_tensors": len(tensors), "files": names, "dtype": dtype,
            "bytes": sum(t.nbytes for t in tensors)}


def export_transformer(src: str, dst: str, *, dtype: str = "float32",
                       max_shard_size: str = DEFAULT_MAX_SHARD_SIZE, step: int | None = None,
                       weights: str | None = None, force: bool = False) -> dict:
    """A converted transformer folder or a training work dir → a diffusers folder `dst`,
    written atomically."""
    if work_dir.is_training_run(src):
        config, tree, chosen = read_run(src, step, weights)
    elif step is not None or weights is not None:
        raise ConversionError(f"{src} is not a training work dir: --step / --ema / --raw "
                              "choose among a run's checkpoints")
    else:
        (config, tree), chosen = read_folder("transformer", src), None
    parse_size(max_shard_size)  # a bad size fails before anything is written
    with files.atomic_output_dir(dst, force) as tmp:
        report = write_export("transformer", config, tree, tmp, dtype=dtype,
                              max_shard_size=max_shard_size)
    return {**report, "class": transformer_config(config)["_class_name"],
            "training_run": chosen}


def run(args) -> None:
    report = export_transformer(args.src, args.dst, dtype=args.dtype,
                                max_shard_size=args.max_shard_size, step=args.step,
                                weights=args.weights, force=args.force)
    chosen = report["training_run"]
    which = f" (step {chosen['step']}, {chosen['weights']} weights)" if chosen else ""
    print(f"exported {report['num_tensors']} tensors{which} as a {report['class']} in "
          f"{len(report['files'])} file(s), {report['dtype']}, into {args.dst}")
