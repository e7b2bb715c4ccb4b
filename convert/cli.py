"""`unialign-convert`: turn released PyTorch weights into unialign_jax checkpoints.

Each converter module contributes one subcommand through its `add_parser(subparsers)`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from convert.safetensors_io import ConversionError
from unialign_jax.checkpoints.io import CheckpointError

SUBCOMMANDS = ("transformer", "t5", "vae", "pipeline")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unialign-convert",
        description="Convert diffusers / transformers PyTorch folders (safetensors) into "
                    "unialign_jax checkpoint folders (Orbax parameters + JSON configuration). "
                    "Tensors are streamed one at a time; nothing is written at DST unless the "
                    "whole conversion succeeds.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"convert.{name}").add_parser(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ConversionError, CheckpointError, FileExistsError, FileNotFoundError) as e:
        print(f"unialign-convert {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
