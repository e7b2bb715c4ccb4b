"""`unialign-convert transformer`: diffusers SD3 / UniAlignment transformer → our checkpoint.

Strict by default (every key present, nothing extra, every shape right). `--to unialignment`
ports an SD3 model into the UniAlignment layout: same-name, same-shape weights are kept,
the rest is initialised fresh, and the initialised and dropped keys are written to DST.
"""

from __future__ import annotations

import os

from flax import traverse_util

from unialign_convert import param_mapping
from unialign_convert.safetensors_io import ConversionError, TensorSource, read_config
from unialign_convert.transformer_keys import abstract_params, fresh_initialiser, tensor_moves
from unialign_jax import files
from unialign_jax.checkpoints import io, registry
from unialign_jax.models.mmdit_config import MMDiTConfig

WEIGHTS_NAME = "diffusion_pytorch_model"


def _configs(src: str, to_unialignment: bool, vocab_size: int | None,
             adapter_widths: tuple[int, int] | None):
    """(source config, output config) from the folder's config.json and the port options."""
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: no such transformer folder")
    try:
        source_config = MMDiTConfig.from_diffusers(read_config(src))
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{src}/config.json: {e}") from None
    if to_unialignment:
        if not vocab_size:
            raise ConversionError("--to unialignment needs --vocab-size (the tokenizer's length)")
        return source_config, source_config.as_unialignment(vocab_size, adapter_widths)
    if adapter_widths:
        raise ConversionError("--adapter-widths only applies with --to unialignment")
    if vocab_size and vocab_size != source_config.vocab_size:
        raise ConversionError(f"--vocab-size {vocab_size} given but the source model has "
                              f"vocab_size {source_config.vocab_size}; use --to unialignment")
    return source_config, source_config


def write_transformer(src: str, out_dir: str, *, dtype: str = "float32",
                      to_unialignment: bool = False, vocab_size: int | None = None,
                      adapter_widths: tuple[int, int] | None = None, seed: int = 0) -> dict:
    """Converts the diffusers folder `src` into the existing folder `out_dir`; returns a report.

    Tensors are read one at a time straight into the single output tree, so peak host memory
    is about one copy of the output.
    """
    out_dtype = param_mapping.output_dtype(dtype)
    source_config, config = _configs(src, to_unialignment, vocab_size, adapter_widths)
    source = TensorSource.from_folder(src, WEIGHTS_NAME)
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
        fresh = fresh_initialiser(config, seed)
    tree = param_mapping.assemble(source, moves, abstract, out_dtype, fresh=fresh,
                                  desc="transformer tensors")
    io.save_params(out_dir, tree)
    report = {"source": os.path.abspath(src), "source_variant": source_config.variant,
              "variant": config.variant, "dtype": dtype, "num_tensors": len(moves),
              "initialised": initialised, "dropped": dropped}
    registry.write_config(out_dir, "transformer", config, dtype)
    files.write_json(os.path.join(out_dir, "conversion.json"), report)
    return report


convert_transformer = files.into_new_folder(write_transformer)


def run(args) -> None:
    report = convert_transformer(args.src, args.dst, dtype=args.dtype,
                                 to_unialignment=args.to == "unialignment",
                                 vocab_size=args.vocab_size,
                                 adapter_widths=tuple(args.adapter_widths or ()) or None,
                                 force=args.force)
    print(f"converted {report['num_tensors']} tensors ({report['source_variant']} → "
          f"{report['variant']}, {report['dtype']}) into {args.dst}")
    if report["initialised"] or report["dropped"]:
        print(f"  initialised fresh: {len(report['initialised'])} tensors; dropped from the "
              f"source: {len(report['dropped'])} (lists in {args.dst}/conversion.json)")
