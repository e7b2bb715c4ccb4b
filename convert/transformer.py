"""`unialign-convert transformer`: diffusers SD3 / UniAlignment transformer → our checkpoint.

Strict by default (every key present, nothing extra, every shape right). `--to unialignment`
ports an SD3 model into the UniAlignment layout: same-name, same-shape weights are kept,
the rest is initialised fresh, and the initialised and dropped keys are written to DST.
With `--config FILE` the source is a training checkpoint of the release's `train.py`
(`release_checkpoint`), whose state dict is the UniAlignment layout and carries no config.
"""

from __future__ import annotations

import os

from flax import traverse_util

from unialign_convert import param_mapping, release_checkpoint
from unialign_convert.safetensors_io import (ConversionError, SafetensorsFile, TensorSource,
                                             read_config)
from unialign_convert.transformer_keys import abstract_params, fresh_initialiser, tensor_moves
from unialign_jax import files
from unialign_jax.checkpoints import io, registry
from unialign_jax.models.mmdit_config import MMDiTConfig

WEIGHTS_NAME = "diffusion_pytorch_model"


def _parse_config(config: dict, where: str) -> MMDiTConfig:
    try:
        return MMDiTConfig.from_diffusers(config)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{where}: {e}") from None


def _output_config(source_config: MMDiTConfig, to_unialignment: bool, vocab_size: int | None,
                   adapter_widths: tuple[int, int] | None) -> MMDiTConfig:
    """The converted model's config: the source's, or its UniAlignment port."""
    if to_unialignment:
        if not vocab_size:
            raise ConversionError("--to unialignment needs --vocab-size (the tokenizer's length)")
        return source_config.as_unialignment(vocab_size, adapter_widths)
    if adapter_widths:
        raise ConversionError("--adapter-widths only applies with --to unialignment or an SD3 "
                              "--config")
    if vocab_size and vocab_size != source_config.vocab_size:
        raise ConversionError(f"--vocab-size {vocab_size} given but the source model has "
                              f"vocab_size {source_config.vocab_size}; use --to unialignment")
    return source_config


def _folder_source(src: str, to_unialignment: bool, vocab_size: int | None,
                   adapter_widths: tuple[int, int] | None):
    """(tensors, source config, output config, report fields) of a diffusers folder."""
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: no such transformer folder")
    if release_checkpoint.is_release_checkpoint(src) and not os.path.exists(
            os.path.join(src, "config.json")):
        raise ConversionError(
            f"{src} is a training checkpoint of the release's train.py, which stores no "
            "configuration: pass --config FILE, the transformer's config.json (UniAlignment's, "
            "or SD3-medium's with --vocab-size)")
    source_config = _parse_config(read_config(src), f"{src}/config.json")
    config = _output_config(source_config, to_unialignment, vocab_size, adapter_widths)
    return TensorSource.from_folder(src, WEIGHTS_NAME), source_config, config, {}


def _checkpoint_source(src: str, config_file: str, step: int | None, to_unialignment: bool,
                       vocab_size: int | None, adapter_widths: tuple[int, int] | None):
    """(tensors, source config, output config, report fields) of a release training
    checkpoint: the model `train.py` builds, `SD3JointModelFlexible(len(tokenizer),
    **config)`, from a UniAlignment config or SD3-medium's plus --vocab-size."""
    if to_unialignment:
        raise ConversionError("--to unialignment ports a diffusers SD3 folder; a --config "
                              "checkpoint of train.py is in the UniAlignment layout already")
    if not os.path.isfile(config_file):
        raise ConversionError(f"--config {config_file}: no such file (the transformer's "
                              "config.json)")
    try:
        raw = files.read_json(config_file)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    if not isinstance(raw, dict):
        raise ConversionError(f"{config_file}: not a config.json (a JSON object)")
    config = _parse_config(raw, config_file)
    if config.is_sd3 and not vocab_size:
        raise ConversionError(f"{config_file} is an SD3Transformer2DModel config: pass "
                              "--vocab-size (the tokenizer's length, which train.py gives "
                              "SD3JointModelFlexible)")
    config = _output_config(config, config.is_sd3, vocab_size, adapter_widths)
    found = release_checkpoint.locate(src, step)
    source = TensorSource([SafetensorsFile(found.weights)])
    report = {"checkpoint": os.path.abspath(found.folder), "step": found.step,
              "config": os.path.abspath(config_file)}
    return source, config, config, report


def write_transformer(src: str, out_dir: str, *, dtype: str = "float32",
                      to_unialignment: bool = False, vocab_size: int | None = None,
                      adapter_widths: tuple[int, int] | None = None, seed: int = 0,
                      config_file: str | None = None, step: int | None = None) -> dict:
    """Converts the diffusers folder `src` (or, with `config_file`, the release training
    checkpoint `src`: a step folder or a run, `step` or the newest) into the existing
    folder `out_dir`; returns a report.

    Tensors are read one at a time straight into the single output tree, so peak host memory
    is about one copy of the output.
    """
    out_dtype = param_mapping.output_dtype(dtype)
    if config_file is not None:
        source, source_config, config, found = _checkpoint_source(
            src, config_file, step, to_unialignment, vocab_size, adapter_widths)
    elif step is not None:
        raise ConversionError("--step chooses a checkpoint of a release training run; it "
                              "needs --config")
    else:
        source, source_config, config, found = _folder_source(src, to_unialignment,
                                                              vocab_size, adapter_widths)
    abstract = abstract_params(config)
    moves = tensor_moves(config)
    initialised, dropped = [], []
    fresh = None
    if to_unialignment:
        shapes = {path: tuple(leaf.shape)
                  for path, leaf in traverse_util.flatten_dict(abstract).items()}
        kept = {m.source for m in moves if param_mapping.fits(source, m, shapes[m.target])}
        initialised = sorted(m.source for m in moves if m.source not in kept)
        dropped = sorted(k for k in source.keys() if k not in kept)
        fresh = fresh_initialiser(config, shapes, seed)
    tree = param_mapping.assemble(source, moves, abstract, out_dtype, fresh=fresh,
                                  desc="transformer tensors")
    io.save_params(out_dir, tree)
    report = {"source": os.path.abspath(src), "source_variant": source_config.variant,
              "variant": config.variant, "dtype": dtype, "num_tensors": len(moves),
              "initialised": initialised, "dropped": dropped, **found}
    registry.write_config(out_dir, "transformer", config, dtype)
    registry.write_conversion(out_dir, report)
    return report


convert_transformer = files.into_new_folder(write_transformer)


def run(args) -> None:
    report = convert_transformer(args.src, args.dst, dtype=args.dtype,
                                 to_unialignment=args.to == "unialignment",
                                 vocab_size=args.vocab_size,
                                 adapter_widths=tuple(args.adapter_widths or ()) or None,
                                 config_file=args.config, step=args.step, force=args.force)
    print(f"converted {report['num_tensors']} tensors ({report['source_variant']} → "
          f"{report['variant']}, {report['dtype']}) into {args.dst}")
    if "step" in report:
        print(f"  release checkpoint of step {report['step']}: {report['checkpoint']}")
    if report["initialised"] or report["dropped"]:
        print(f"  initialised fresh: {len(report['initialised'])} tensors; dropped from the "
              f"source: {len(report['dropped'])} "
              f"(lists in {args.dst}/{registry.CONVERSION_FILE})")
