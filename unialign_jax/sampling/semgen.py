"""`unialign-semgen`: generates the SemGen-Bench outputs, resumably.

Reads `semgen_bench.jsonl` (one row per source image: image_id, image_path, t2i_long,
t2i_complex, edit_multi, edit_complex) and writes `fullset/<task>/<image_id>.png`, plus
`<image_id>_SRCIMG.png` (the source as the model saw it) for the editing tasks, at the
release's settings: 512 px, its negative prompt, 50 steps, guidance 7. Images already
written are skipped, so an interrupted run just restarts; bad rows are reported and
skipped and listed in `fullset/failures.jsonl`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from unialign_jax.checkpoints.io import write_json
from unialign_jax.data.images import resize_and_center_crop
from unialign_jax.sampling.cli import (add_model_args, load_pipeline_from_args,
                                       run_skipping_bad_items)
from unialign_jax.sampling.outputs import save_jsonl, save_png
from unialign_jax.sampling.pipeline import DEFAULT_NEGATIVE_PROMPT
from unialign_jax.sampling.preprocess import InputError, check_resolution, load_image

BENCH_FILE = "semgen_bench.jsonl"
T2I_TASKS = ("t2i_long", "t2i_complex")
EDIT_TASKS = ("edit_multi", "edit_complex")
SOURCE_SUFFIX = "_SRCIMG"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unialign-semgen", description=__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True,
                   help=f"SemGen-Bench folder holding {BENCH_FILE} (and its images)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder; results go to OUT/fullset/")
    p.add_argument("--tasks", nargs="+", choices=T2I_TASKS + EDIT_TASKS,
                   default=list(T2I_TASKS + EDIT_TASKS), help="tasks to run (default: all)")
    p.add_argument("--resolution", type=int, default=512,
                   help="square side in pixels (default %(default)s)")
    p.add_argument("--steps", type=int, default=50, help="Euler steps (default %(default)s)")
    p.add_argument("--guidance", type=float, default=7.0,
                   help="guidance scale (default %(default)s)")
    p.add_argument("--negative-prompt", default=DEFAULT_NEGATIVE_PROMPT,
                   help="negative prompt (default: the release's)")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N rows (a trial run)")
    return p


def read_bench(bench: str, report) -> list[dict]:
    """The rows of semgen_bench.jsonl, each with its line number; bad lines are reported."""
    path = os.path.join(bench, BENCH_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report(f"line {n}", f"not JSON ({e.msg})")
            continue
        if not isinstance(row, dict) or row.get("image_id") in (None, ""):
            report(f"line {n}", "not an object with an image_id")
            continue
        rows.append({**row, "line": n})
    return rows


def resolve_image(stored: str, bench: str) -> str:
    """The stored path if it exists, else the same path relative to the benchmark folder."""
    return stored if os.path.exists(stored) else os.path.join(bench, stored)


def output_key(image_id) -> str:
    """File name stem of a row: its image_id, with path separators made harmless."""
    return str(image_id).replace("/", "_").replace(os.sep, "_")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    failures: list[dict] = []

    def report(where: str, why: str, task: str | None = None) -> None:
        failures.append({"where": where, "task": task, "error": why})
        print(f"skipping {where}{f' ({task})' if task else ''}: {why}", file=sys.stderr)

    try:
        check_resolution(args.resolution, args.resolution)
        if args.steps < 1:
            raise InputError(f"--steps must be at least 1, got {args.steps}")
        rows = read_bench(args.bench, report)[:args.limit]
    except InputError as e:
        parser.error(str(e))
    fullset = os.path.join(args.out, "fullset")
    write_json(os.path.join(fullset, "settings.json"),
               {"bench": os.path.abspath(args.bench), "checkpoint": os.path.abspath(args.ckpt),
                "resolution": args.resolution, "steps": args.steps, "guidance": args.guidance,
                "negative_prompt": args.negative_prompt, "dtype": args.dtype,
                "seed": f"{args.seed} + row index (0-based, order of {BENCH_FILE})"})

    work = {task: pending_items(task, rows, args, fullset, report) for task in args.tasks}
    written = []
    if any(work.values()):
        try:
            pipe = load_pipeline_from_args(args)
        except (InputError, OSError, ValueError) as e:
            print(f"error: cannot load {args.ckpt}: {e}", file=sys.stderr)
            return 1
        for task, items in work.items():
            for item in items:
                item["write"] = writer(item, written)
            run_skipping_bad_items(lambda chunk, task=task: run_chunk(pipe, task, chunk, args),
                                   items, lambda it, why, task=task: report(
                                       f"image_id {it['key']}", why, task))
    save_jsonl(failures, os.path.join(fullset, "failures.jsonl"))
    print(f"{len(written)} images written, {len(failures)} skipped as bad -> {fullset}")
    return 1 if failures else 0


def pending_items(task: str, rows: list[dict], args, fullset: str, report) -> list[dict]:
    """Rows of `task` whose output is missing, with their source image loaded (edits)."""
    items = []
    for index, row in enumerate(rows):
        key = output_key(row["image_id"])
        out = os.path.join(fullset, task, key + ".png")
        source_out = os.path.join(fullset, task, key + SOURCE_SUFFIX + ".png")
        if os.path.exists(out) and (task in T2I_TASKS or os.path.exists(source_out)):
            continue
        prompt = row.get(task)
        if not isinstance(prompt, str) or not prompt.strip():
            report(f"image_id {key}", f"no {task} prompt", task)
            continue
        item = {"key": key, "prompt": prompt, "seed": args.seed + index, "out": out}
        if task in EDIT_TASKS:
            try:
                if not isinstance(row.get("image_path"), str):
                    raise InputError("no image_path")
                source = load_image(resolve_image(row["image_path"], args.bench))
            except InputError as e:
                report(f"image_id {key}", str(e), task)
                continue
            item.update(source=source, source_out=source_out)
        items.append(item)
    return items


def run_chunk(pipe, task: str, items: list[dict], args) -> None:
    common = dict(negative_prompt=args.negative_prompt, num_steps=args.steps,
                  guidance_scale=args.guidance, seed=[it["seed"] for it in items],
                  on_result=lambda i, image: items[i]["write"](image))
    prompts = [it["prompt"] for it in items]
    if task in T2I_TASKS:
        pipe.generate(prompts, height=args.resolution, width=args.resolution, **common)
    else:
        pipe.edit([it["source"] for it in items], prompts, resolution=args.resolution,
                  **common)


def writer(item: dict, written: list):
    """Source image first (edits), then the output, whose existence marks the row done."""
    def write(image):
        if "source" in item:
            save_png(resize_and_center_crop(item["source"], image.size[0]), item["source_out"])
        save_png(image, item["out"])
        written.append(item["out"])

    return write


if __name__ == "__main__":
    sys.exit(main())
