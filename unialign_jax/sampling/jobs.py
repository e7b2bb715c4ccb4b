"""Resumable sampling jobs, shared by `unialign-sample` and `unialign-semgen`: the model
options of their command lines, prompts files, and running a job's items so that a bad
item or a full disk costs only itself and a rerun redoes exactly what is missing.

A job is a list of `Item`s; each one saves its own result (`Item.write`), and what it
writes last marks it done, so the command lines know which items to redo.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Callable

from unialign_jax import compilation_cache
from unialign_jax.files import disk_full_message, is_disk_full
from unialign_jax.models.attention import IMPLEMENTATIONS
from unialign_jax.parallel import batch_ways
from unialign_jax.runs.work_dir import WEIGHTS
from unialign_jax.sampling.unialign_pipeline import chunk_size
from unialign_jax.sampling.preprocess import InputError


def _discard(result) -> None:
    """The writer of an item that only fills a batch."""


@dataclasses.dataclass(frozen=True)
class Item:
    """One output of a job: its inputs and seed, and what saves its result."""

    index: int                     # its number in the job (reports name it)
    prompt: str | None
    seed: int
    images: tuple = ()             # its condition images, loaded
    write: Callable[[Any], None] = _discard
    # Its place in the batches of a run that does every good item of the job (None: the
    # job does not lay its items out as such a run would).
    position: int | None = None


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """The checkpoint and how to run it."""
    parser.add_argument("--ckpt", required=True,
                        help="converted pipeline folder (unialign-convert pipeline), or a "
                             "training work dir (unialign-train --workdir)")
    parser.add_argument("--step", type=int, default=None,
                        help="with a training work dir: the checkpoint step (default: the "
                             "latest)")
    parser.add_argument("--weights", choices=WEIGHTS, default=None,
                        help="with a training work dir: its EMA or raw transformer weights "
                             "(default: EMA when the run keeps one)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype of the transformer and T5; the VAE stays float32 "
                             "(default %(default)s)")
    parser.add_argument("--attention", default="auto", choices=IMPLEMENTATIONS,
                        help="attention kernel; auto: the fastest for this backend "
                             "(default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=4,
                        help="items per compiled call, split over the devices "
                             "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0,
                        help="base seed: item i uses seed + i (default %(default)s)")
    parser.add_argument("--lora", metavar="FILE", default=None,
                        help="a LoRA .safetensors file to apply: ours (unialign-convert "
                             "export-lora) or a diffusers / PEFT SD3 LoRA; merged into the "
                             "weights")
    parser.add_argument("--lora-scale", type=float, default=1.0,
                        help="multiplier of the LoRA's update (default %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    compilation_cache.add_arguments(parser)


def load_pipeline_from_args(args):
    """The pipeline of --ckpt, weights placed on all local devices as they are read."""
    import jax.numpy as jnp

    from unialign_jax.models.runtime import Runtime
    from unialign_jax.sampling.unialign_pipeline import UniAlignPipeline

    if not os.path.isdir(args.ckpt):
        raise InputError(f"checkpoint folder not found: {args.ckpt}")
    compilation_cache.setup_from_args(args)
    # Weights are stored in the compute dtype too: bf16 inference needs half the memory.
    dtype = jnp.dtype(args.dtype)
    pipe = UniAlignPipeline.from_pretrained(
        args.ckpt, Runtime(dtype, param_dtype=dtype, attention=args.attention),
        batch_size=args.batch_size, progress=not args.no_progress, step=args.step,
        weights=args.weights)
    if args.lora:
        pipe.load_lora(args.lora, scale=args.lora_scale)
    return pipe


def _beside(path: str, base: str) -> str:
    """`path` as given if it exists, else relative to `base` (the .jsonl's folder)."""
    return path if os.path.exists(path) or os.path.isabs(path) else os.path.join(base, path)


def read_prompts_file(path: str) -> tuple[list[str], list[dict]]:
    """(prompts, items): text lines, or .jsonl objects with their image paths resolved."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\n") for line in f]
    except OSError as e:
        raise InputError(f"cannot read prompts file {path}: {e.strerror or e}") from None
    if not path.endswith(".jsonl"):
        return [line for line in lines if line.strip()], []
    base = os.path.dirname(os.path.abspath(path))
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise InputError(f"{path}:{n}: expected a JSON object")
        images = rec.get("images", [rec["image"]] if "image" in rec else [])
        items.append({"prompt": rec.get("prompt"), "seed": rec.get("seed"),
                      "images": [_beside(str(p), base) for p in images]})
    return [], items


def at_run_shape(pipe, items: list[Item], total: int) -> list[Item]:
    """`items` laid out as a run of all `total` items batches them: XLA's results depend on
    the batch shape and, on some CPUs, on an item's row in the batch, so the items a resumed
    run redoes come out byte-identical to an uninterrupted run's only at its shape and row.
    Items that carry their `position` in the uninterrupted run are put back at its row of
    its chunk; every other slot, and the padding of a short chunk, holds a copy of an item
    of the chunk that writes nothing."""
    size = chunk_size(total, pipe.batch_size, batch_ways(pipe.mesh))
    if any(item.position is None for item in items):
        filler = dataclasses.replace(items[-1], write=_discard)
        return items + [filler] * (size - len(items))
    chunks: dict[int, list] = {}
    for item in items:
        row, slot = divmod(item.position, size)
        chunks.setdefault(row, [None] * size)[slot] = item
    laid_out = []
    for chunk in chunks.values():
        filler = dataclasses.replace(next(it for it in chunk if it is not None), write=_discard)
        laid_out += [filler if it is None else it for it in chunk]
    return laid_out


def run_skipping_bad_items(run: Callable[[list[Item]], None], items: list[Item],
                           report: Callable[[Item, str], None]) -> None:
    """`run(items)`; if the pipeline rejects the batch (it checks everything before
    compiling), the items are retried one by one so that only the bad ones are skipped."""
    try:
        run(items)
    except InputError as e:
        if len(items) == 1:
            report(items[0], str(e))
            return
        for item in items:
            run_skipping_bad_items(run, [item], report)


def run_until_disk_full(run: Callable[[list[Item]], None], items: list[Item],
                        report: Callable[[Item, str], None], folder: str, written: list,
                        what: str = "items") -> bool:
    """`run_skipping_bad_items`; a full disk is reported instead of raised (what was written
    stays whole, a rerun after freeing space goes on) and gives False: exit code 2."""
    try:
        run_skipping_bad_items(run, items, report)
    except (OSError, RuntimeError, ValueError) as e:
        if not is_disk_full(e):
            raise
        print(f"error: {disk_full_message(folder)} ({len(written)} {what} were written "
              "whole)", file=sys.stderr)
        return False
    return True
