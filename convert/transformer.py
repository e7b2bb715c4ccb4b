"""`unialign-convert transformer`: diffusers SD3 / UniAlignment transformer → our checkpoint.

Strict by default (every key present, nothing extra, every shape right). `--to unialignment`
ports an SD3 model into the UniAlignment layout: same-name, same-shape weights are kept,
the rest is initialised fresh, and the initialised and dropped keys are written to DST.
"""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert.safetensors_io import ConversionError, TensorSource, read_config
from convert.transformer_keys import empty_tree, fresh_value, tensor_specs
from unialign_jax.checkpoints import io
from unialign_jax.checkpoints.transformer import write_config
from unialign_jax.models.mmdit_config import MMDiTConfig

WEIGHTS_NAME = "diffusion_pytorch_model"
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}


def _listing(keys, limit: int = 20) -> str:
    keys = sorted(keys)
    more = f" … and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def write_transformer(src: str, out_dir: str, *, dtype: str = "float32",
                      to_unialignment: bool = False, vocab_size: int | None = None,
                      seed: int = 0, progress: bool = True) -> dict:
    """Converts the diffusers folder `src` into the existing folder `out_dir`; returns a report.

    Tensors are read one at a time straight into the single output tree, so peak host memory
    is about one copy of the output.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if not os.path.isdir(src):
        raise ConversionError(f"{src}: no such transformer folder")
    try:
        source_config = MMDiTConfig.from_diffusers(read_config(src))
    except (KeyError, ValueError) as e:
        raise ConversionError(f"{src}/config.json: {e}") from None
    config = source_config
    if to_unialignment:
        if not vocab_size:
            raise ConversionError("--to unialignment needs --vocab-size (the tokenizer's length)")
        config = source_config.as_unialignment(vocab_size)
    elif vocab_size and vocab_size != config.vocab_size:
        raise ConversionError(f"--vocab-size {vocab_size} given but the source model has "
                              f"vocab_size {config.vocab_size}; use --to unialignment to port")

    source = TensorSource.from_folder(src, WEIGHTS_NAME)
    specs = tensor_specs(config)
    expected = {s.torch_key: s.torch_shape for s in specs}
    found = set(source.keys())
    missing = set(expected) - found
    unexpected = found - set(expected)
    mismatched = {k for k in set(expected) & found if tuple(source.shape(k)) != expected[k]}
    if not to_unialignment and (missing or unexpected or mismatched):
        problems = []
        if missing:
            problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        for k in sorted(mismatched)[:20]:
            problems.append(f"shape mismatch for {k}: expected {expected[k]}, "
                            f"found {tuple(source.shape(k))}")
        raise ConversionError(f"{src} does not match a {config.variant} transformer of its "
                              "config:\n  " + "\n  ".join(problems))

    initialised = sorted(missing | mismatched)
    dropped = sorted(unexpected | mismatched)
    tree = empty_tree(config, DTYPES[dtype])
    rng = np.random.default_rng(seed)
    for spec in tqdm(specs, desc="converting transformer", unit="tensor", disable=not progress):
        if spec.torch_key in missing or spec.torch_key in mismatched:
            value = fresh_value(spec, config, rng)
        else:
            value = spec.to_ours(source.get(spec.torch_key))
        target = tree
        for name in spec.path[:-1]:
            target = target[name]
        if spec.layer is None:
            target[spec.path[-1]][...] = value
        else:
            target[spec.path[-1]][spec.layer] = value
        del value

    io.save_params(out_dir, tree)
    report = {"source": os.path.abspath(src), "source_variant": source_config.variant,
              "variant": config.variant, "dtype": dtype, "num_tensors": len(specs),
              "initialised": initialised, "dropped": dropped}
    write_config(out_dir, config, dtype)
    io.write_json(os.path.join(out_dir, "conversion.json"), report)
    return report


def convert_transformer(src: str, dst: str, *, dtype: str = "float32",
                        to_unialignment: bool = False, vocab_size: int | None = None,
                        force: bool = False, progress: bool = True) -> dict:
    """Converts `src` into `dst` atomically (nothing appears at `dst` if anything fails)."""
    with io.atomic_output_dir(dst, force=force) as tmp:
        return write_transformer(src, tmp, dtype=dtype, to_unialignment=to_unialignment,
                                 vocab_size=vocab_size, progress=progress)


def _run(args) -> None:
    report = convert_transformer(args.src, args.dst, dtype=args.dtype,
                                 to_unialignment=args.to == "unialignment",
                                 vocab_size=args.vocab_size, force=args.force)
    print(f"converted {report['num_tensors']} tensors ({report['source_variant']} → "
          f"{report['variant']}, {report['dtype']}) into {args.dst}")
    if report["initialised"] or report["dropped"]:
        print(f"  initialised fresh: {len(report['initialised'])} tensors; dropped from the "
              f"source: {len(report['dropped'])} (lists in {args.dst}/conversion.json)")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "transformer", help="an SD3Transformer2DModel or SD3JointModelFlexible folder",
        description="Convert a diffusers transformer folder (config.json + safetensors, sharded "
                    "or not) into an Orbax checkpoint folder loadable by "
                    "unialign_jax.load_transformer.")
    p.add_argument("src", help="diffusers transformer folder")
    p.add_argument("dst", help="output folder (must be empty or absent unless --force)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="storage dtype of the converted parameters (default float32)")
    p.add_argument("--to", choices=["unialignment"], default=None,
                   help="port an SD3 model into the UniAlignment layout: keep same-name, "
                        "same-shape weights, initialise the rest, drop the pooled-text "
                        "embedder and the old output head")
    p.add_argument("--vocab-size", type=int, default=None,
                   help="text-head vocabulary (the tokenizer's length, 32100 for T5)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty DST")
    p.set_defaults(func=_run)
