"""`unialign-semgen`: generates the SemGen-Bench outputs exactly as the release does, resumably.

Reads `semgen_bench.jsonl` (one row per source image: image_id, image_path, t2i_long,
t2i_complex, edit_multi, edit_complex) and writes `fullset/<task>/<index>.png`, plus
`<index>_SRCIMG.png` (the source as the model saw it) for the editing tasks. As the
release's `SemGen-Bench/generate_bench_img.py`, whose names `test_bench_score.py` reads:
outputs are named by the 0-based line index of the row; 512 px, 50 steps, the release's
negative prompt; text-to-image at guidance 7.0, edits at guidance 9.0 with the source
squashed to 512×512 by a plain (bicubic) resize, no crop, and that squashed source saved
as `_SRCIMG`. Finished images are skipped, so an interrupted run (SIGKILL, full disk) just
restarts and a finished one reruns without changing anything; bad rows are reported,
skipped and listed in `fullset/failures.jsonl`; every setting of the run is in
`fullset/settings.json`, and a run with other settings into the same folder is refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

from PIL import Image

from unialign_jax.checkpoints.pipeline_folder import RELEASE_NEGATIVE_PROMPT
from unialign_jax.files import (dumps, jsonl, read_json_or_none, remove_stale_partials,
                                save_png, write_text_if_changed)
from unialign_jax.sampling.jobs import (Item, add_model_args, at_run_shape,
                                        load_pipeline_from_args, run_until_disk_full)
from unialign_jax.sampling.preprocess import InputError, check_resolution, load_image

BENCH_FILE = "semgen_bench.jsonl"
T2I_TASKS = ("t2i_long", "t2i_complex")
EDIT_TASKS = ("edit_multi", "edit_complex")
SOURCE_SUFFIX = "_SRCIMG"
RELEASE_SCRIPT = "SemGen-Bench/generate_bench_img.py"
# The release's settings, each from RELEASE_SCRIPT.
RELEASE = {"resolution": 512, "steps": 50, "t2i_guidance": 7.0, "edit_guidance": 9.0,
           "negative_prompt": RELEASE_NEGATIVE_PROMPT}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="unialign-semgen", description=__doc__.split("\n\n")[1].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True,
                   help=f"SemGen-Bench folder holding {BENCH_FILE} (and images/)")
    add_model_args(p)
    p.add_argument("--out", required=True, help="output folder; results go to OUT/fullset/")
    p.add_argument("--tasks", nargs="+", choices=T2I_TASKS + EDIT_TASKS,
                   default=list(T2I_TASKS + EDIT_TASKS), help="tasks to run (default: all)")
    p.add_argument("--resolution", type=int, default=RELEASE["resolution"],
                   help="square side in pixels; edit sources are squashed to it "
                        "(default %(default)s, the release's)")
    p.add_argument("--steps", type=int, default=RELEASE["steps"],
                   help="Euler steps (default %(default)s, the release's)")
    p.add_argument("--t2i-guidance", type=float, default=RELEASE["t2i_guidance"],
                   help="guidance of t2i_long / t2i_complex (default %(default)s, the release's)")
    p.add_argument("--edit-guidance", type=float, default=RELEASE["edit_guidance"],
                   help="guidance of edit_multi / edit_complex (default %(default)s, the "
                        "release's)")
    p.add_argument("--negative-prompt", default=RELEASE["negative_prompt"],
                   help="negative prompt (default, the release's: \"%(default)s\")")
    p.add_argument("--exif-orientation", choices=("keep", "apply"), default="keep",
                   help="keep: read sources in their stored orientation, as the release does "
                        "(default); apply: rotate them by their EXIF orientation")
    p.add_argument("--limit", type=int, default=None,
                   help="only the first N lines (a trial run)")
    return p


def read_bench(bench: str, report, limit: int | None = None) -> list[dict]:
    """The rows of semgen_bench.jsonl, each with its 0-based line index (the release's output
    name); bad lines are reported and keep their index unused."""
    path = os.path.join(bench, BENCH_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    rows = []
    for index, line in enumerate(lines[:limit]):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            report(f"line {index}", f"not JSON ({e.msg})")
            continue
        if not isinstance(row, dict):
            report(f"line {index}", "not a JSON object")
            continue
        rows.append({**row, "index": index})
    return rows


def resolve_image(stored: str, bench: str) -> str:
    """The stored path if it exists, else the same path under the benchmark folder, else its
    file name in `bench/images/` (the released file holds the authors' absolute paths)."""
    for candidate in (stored, os.path.join(bench, stored.lstrip("/")),
                      os.path.join(bench, "images", os.path.basename(stored))):
        if os.path.exists(candidate):
            return candidate
    return stored


def squash(image: Image.Image, side: int) -> Image.Image:
    """The release's `Image.resize((side, side))`: bicubic, aspect not kept, no crop."""
    return image.resize((side, side), Image.BICUBIC)


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
        rows = read_bench(args.bench, report, args.limit)
    except InputError as e:
        parser.error(str(e))
    fullset = os.path.join(args.out, "fullset")
    settings = {
        "bench": os.path.abspath(args.bench), "checkpoint": os.path.abspath(args.ckpt),
        "resolution": args.resolution, "steps": args.steps, "dtype": args.dtype,
        "guidance": {**{t: args.t2i_guidance for t in T2I_TASKS},
                     **{t: args.edit_guidance for t in EDIT_TASKS}},
        "negative_prompt": args.negative_prompt, "tasks": args.tasks,
        "edit_source": f"squashed to {args.resolution}x{args.resolution} (bicubic, no crop)",
        "exif_orientation": args.exif_orientation,
        "file_names": f"0-based line index in {BENCH_FILE}",
        "seed": f"{args.seed} + line index", "release_settings": RELEASE,
        "release_script": RELEASE_SCRIPT}
    problem = settings_problem(os.path.join(fullset, "settings.json"), settings)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    remove_stale_partials(fullset)  # PNGs a killed run was writing

    written: list[str] = []
    work = {task: pending_items(task, rows, args, fullset, report, written)
            for task in args.tasks}
    if any(work.values()):
        try:
            pipe = load_pipeline_from_args(args)
        except (InputError, OSError, ValueError) as e:
            print(f"error: cannot load {args.ckpt}: {e}", file=sys.stderr)
            return 1
        for task, items in work.items():
            if not items:  # the pipeline refuses an empty batch
                continue
            if not run_until_disk_full(
                    lambda chunk, task=task: run_chunk(
                        pipe, task, at_run_shape(pipe, chunk, len(rows)), args), items,
                    lambda it, why, task=task: report(f"line {it.index}", why, task),
                    fullset, written, "images"):
                return 2
    write_text_if_changed(os.path.join(fullset, "failures.jsonl"), jsonl(failures))
    print(f"{len(written)} images written, {len(failures)} skipped as bad -> {fullset}")
    return 1 if failures else 0


def settings_problem(path: str, settings: dict) -> str | None:
    """Why OUT cannot take this run: its outputs were made with other settings (the tasks
    run may differ). Writes `settings` when the folder is new or they only add tasks."""
    old = read_json_or_none(path)
    if old is not None:
        differs = sorted(k for k in set(settings) | set(old)
                         if k != "tasks" and old.get(k) != settings.get(k))
        if differs:
            return (f"{os.path.dirname(path)} holds outputs made with other settings "
                    f"(differs in: {', '.join(differs)}); use another --out")
    write_text_if_changed(path, dumps(settings))
    return None


def pending_items(task: str, rows: list[dict], args, fullset: str, report,
                  written: list) -> list[Item]:
    """Rows of `task` whose output is missing, with their squashed source (edits); each
    writes its outputs and adds them to `written`."""
    items = []
    for row in rows:
        index = row["index"]
        out = os.path.join(fullset, task, f"{index}.png")
        source_out = os.path.join(fullset, task, f"{index}{SOURCE_SUFFIX}.png")
        if os.path.exists(out) and (task in T2I_TASKS or os.path.exists(source_out)):
            continue
        prompt = row.get(task)
        if not isinstance(prompt, str) or not prompt.strip():
            report(f"line {index}", f"no {task} prompt", task)
            continue
        sources = ()
        if task in EDIT_TASKS:
            try:
                if not isinstance(row.get("image_path"), str):
                    raise InputError("no image_path")
                source = load_image(resolve_image(row["image_path"], args.bench),
                                    exif_orientation=args.exif_orientation == "apply")
            except InputError as e:
                report(f"line {index}", str(e), task)
                continue
            sources = (squash(source, args.resolution),)
        items.append(Item(index, prompt, args.seed + index, sources,
                          writer(out, written, sources, source_out)))
    return items


def run_chunk(pipe, task: str, items: list[Item], args) -> None:
    edit = task in EDIT_TASKS
    common = dict(negative_prompt=args.negative_prompt, num_steps=args.steps,
                  guidance_scale=args.edit_guidance if edit else args.t2i_guidance,
                  seed=[it.seed for it in items],
                  on_result=lambda i, image: items[i].write(image))
    prompts = [it.prompt for it in items]
    if edit:
        pipe.edit([it.images[0] for it in items], prompts, resolution=args.resolution,
                  **common)
    else:
        pipe.generate(prompts, height=args.resolution, width=args.resolution, **common)


def writer(out: str, written: list, sources: tuple, source_out: str):
    """Source image first (edits), then the output, whose existence marks the row done."""
    def write(image):
        for source in sources:
            save_png(source, source_out)
        save_png(image, out)
        written.append(out)

    return write


if __name__ == "__main__":
    sys.exit(main())
