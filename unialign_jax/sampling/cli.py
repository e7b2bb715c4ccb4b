"""`unialign-sample`: the five tasks from the command line, resumable, one PNG + JSON each.

Every output `NNNNN.png` gets a sidecar `NNNNN.json` with everything needed to redo it
(task, prompt, source images, seed, steps, guidance, shift, resolution, checkpoint); a
rerun skips items whose sidecar already holds the same settings. Captions are printed,
stored in the sidecars and gathered in `captions.jsonl`. A bad item (unreadable image,
too many condition images, ...) is reported and skipped; the others are still written.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from unialign_jax.checkpoints.io import CheckpointError
from unialign_jax.checkpoints.pipeline_folder import TrainedWith
from unialign_jax.files import (jsonl, read_json_or_none, remove_stale_partials, save_png,
                                write_json, write_text_if_changed)
from unialign_jax.images import RESIZE_MODES
from unialign_jax.runs import work_dir
from unialign_jax.sampling.jobs import (Item, add_model_args, at_run_shape,
                                        load_pipeline_from_args, read_prompts_file,
                                        run_until_disk_full)
from unialign_jax.sampling.unialign_pipeline import DEFAULT_GUIDANCE, DEFAULT_STEPS, MAX_CONDITION_IMAGES
from unialign_jax.sampling.preprocess import InputError, check_resolution, load_image

TASKS = {
    "t2i": "text-to-image from prompts",
    "edit": "edit images by instructions",
    "perceive": "perception maps (depth, segmentation, ...) through the editing path",
    "compose": "compose 1-3 condition images into one, following an instruction",
    "caption": "caption images, or answer a question about them (--prompt)",
}
EXAMPLES = """examples:
  unialign-sample t2i --ckpt ckpt/ua --prompt "a red cube on a table" --out out/
  unialign-sample t2i --ckpt runs/qs/train --prompt "a red circle" --out out/  # a work dir
  unialign-sample t2i --ckpt ckpt/ua --prompts-file prompts.txt --steps 50 --out out/
  unialign-sample edit --ckpt ckpt/ua --image cat.png --prompt "make it a tiger" --out out/
  unialign-sample perceive --ckpt ckpt/ua --image room.jpg --prompt "depth map" --out out/
  unialign-sample compose --ckpt ckpt/ua --image a.png --image b.png --prompt "..." --out out/
  unialign-sample caption --ckpt ckpt/ua --image photo.jpg --out out/
  unialign-sample t2i --ckpt ckpt/ua --lora style.safetensors --lora-scale 0.8 --prompt "a cat" \
      --out out/

--prompts-file: a text file (one prompt per line), or a .jsonl file with one object per
line: {"prompt": ..., "image": path} or {"prompt": ..., "images": [paths]}, optional
"seed". Relative image paths are looked up beside the .jsonl file.
Pairing of --image and prompts (edit, perceive, caption): one image with many prompts,
many images with one prompt, or as many of each (in order).
"""


def lora_record(args) -> dict | None:
    """The LoRA a sidecar records ({'path', 'scale', 'file': [bytes, mtime_ns]}), so that
    another LoRA, scale or a rewritten file redoes the items; None without --lora."""
    if not args.lora:
        return None
    try:
        stat = os.stat(args.lora)
    except OSError as e:
        raise InputError(f"cannot read the LoRA file {args.lora}: {e.strerror or e}") from None
    return {"path": os.path.abspath(args.lora), "scale": args.lora_scale,
            "file": [stat.st_size, stat.st_mtime_ns]}


def trained_with_of(args) -> TrainedWith:
    """What --ckpt's model was trained with: the defaults of the prompt length, the sizes and
    the negative prompt (each recorded in every sidecar). The release's when --ckpt cannot
    be read, which loading then reports."""
    try:
        return work_dir.trained_with(args.ckpt)
    except (OSError, CheckpointError, ValueError, KeyError):
        return TrainedWith()


def _or(value, default):
    return default if value is None else value


def job_settings(args, trained: TrainedWith) -> dict:
    """Everything of the command line that determines every output (each sidecar holds it),
    an option left unset taking what the model was trained with."""
    s = {"task": args.task, "steps": args.steps, "checkpoint": os.path.abspath(args.ckpt),
         "dtype": args.dtype, "attention": args.attention, "text_length": trained.text_length}
    if args.task == "t2i":
        s.update(height=_or(args.height, trained.resolution),
                 width=_or(args.width, trained.resolution))
    else:
        s.update(resolution=_or(args.resolution, trained.resolution), resize=args.resize)
    if args.task == "caption":
        s.update(length=_or(args.length, trained.text_length))
    else:
        s.update(guidance=args.guidance,
                 negative_prompt=_or(args.negative_prompt, trained.negative_prompt))
    return s


def checkpoint_of(args) -> dict | None:
    """Which weights --ckpt stands for when it is a training work dir ({'run', 'step',
    'weights'}, recorded in every sidecar so that a rerun after more training redoes the
    items); None for a pipeline folder."""
    if not work_dir.is_training_run(args.ckpt):
        if args.step is not None or args.weights is not None:
            raise InputError(f"--step / --weights need a training work dir; {args.ckpt} is "
                             "not one")
        return None
    try:
        return work_dir.describe(args.ckpt, args.step, args.weights)
    except (CheckpointError, ValueError) as e:
        raise InputError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unialign-sample", epilog=EXAMPLES,
        description="Text-to-image, editing, perception, composition and captioning with a "
                    "converted UniAlignment checkpoint. Writes NNNNN.png + NNNNN.json "
                    "(settings) per item; reruns skip finished items.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    for task, text in TASKS.items():
        p = sub.add_parser(task, help=text, description=text, epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        add_model_args(p)
        p.add_argument("--out", required=True, help="output folder (created)")
        p.add_argument("--prompt", action="append", default=[],
                       help="a prompt / instruction / question (repeatable)")
        p.add_argument("--prompts-file",
                       help="prompts: .txt, one a line, or .jsonl items (see below)")
        p.add_argument("--overwrite", action="store_true",
                       help="redo items whose outputs already exist")
        if task == "t2i":
            p.add_argument("--height", type=int, default=None,
                           help="pixels, a multiple of 16 (default: the resolution the model "
                                "was trained at, 512 for the release)")
            p.add_argument("--width", type=int, default=None,
                           help="pixels, a multiple of 16 (default: as --height)")
        else:
            p.add_argument("--image", action="append", default=[],
                           help="input image (repeatable; compose: the condition images)")
            p.add_argument("--resolution", type=int, default=None,
                           help="side in pixels, a multiple of 16 (default: the resolution "
                                "the model was trained at, 512 for the release)")
            p.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                           help="crop: square inputs, short side resized (bicubic) and "
                                "centre-cropped, as the release (default); fit / pad: keep the "
                                "input's aspect — resized into the nearest aspect bucket of "
                                "about resolution² pixels, or fitted inside it on grey; "
                                "outputs then have the bucket's size")
        if task == "caption":
            p.add_argument("--steps", type=int, default=DEFAULT_STEPS[task],
                           help="unmasking steps, 32-64 (default %(default)s)")
            p.add_argument("--length", type=int, default=None,
                           help="token positions (default: the prompt length the model was "
                                "trained with, 256 for the release)")
        else:
            p.add_argument("--steps", type=int, default=DEFAULT_STEPS[task],
                           help="Euler steps, 28-50 (default %(default)s, the release's for "
                                "this task)")
            p.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE,
                           help="classifier-free guidance scale (default %(default)s)")
            p.add_argument("--negative-prompt", default=None,
                           help="negative prompt (default: the one the model's folder "
                                "records: infer.py's for the release, the null prompt \" \" "
                                "its instructions were dropped to for a model trained here)")
    return parser


def collect_items(args) -> list[dict]:
    """One dict per output (prompt, image paths, seed), from the flags and the prompts file."""
    prompts, file_items = list(args.prompt), []
    if args.prompts_file:
        more, file_items = read_prompts_file(args.prompts_file)
        prompts += more
    images = getattr(args, "image", [])
    if args.task == "t2i":
        if images or any(it["images"] for it in file_items):
            raise InputError("t2i takes no images")
        items = [{"prompt": p, "images": []} for p in prompts]
    elif args.task == "compose":
        if prompts and not images:
            raise InputError("compose needs --image (the condition images)")
        items = [{"prompt": p, "images": list(images)} for p in prompts]
    elif args.task == "caption" and not prompts:
        items = [{"prompt": None, "images": [im]} for im in images]
    else:
        items = [{"prompt": p, "images": [im]} for im, p in _pair(images, prompts)]
    items += file_items
    if not items and args.prompts_file and not (args.prompt or images):
        raise InputError(f"the prompts file {args.prompts_file} holds no prompts")
    if not items:
        raise InputError("nothing to do: give --prompt/--image or --prompts-file")
    return [{**item, "seed": args.seed + i if item.get("seed") is None else item["seed"]}
            for i, item in enumerate(items)]


def _pair(images: Sequence[str], prompts: Sequence[str]) -> list[tuple[str, str]]:
    if not images and not prompts:
        return []
    if not images or not prompts:
        raise InputError("this task needs both --image and --prompt (or a .jsonl file)")
    if len(images) == 1:
        return [(images[0], p) for p in prompts]
    if len(prompts) == 1:
        return [(im, prompts[0]) for im in images]
    if len(images) != len(prompts):
        raise InputError(f"{len(images)} images and {len(prompts)} prompts cannot be paired")
    return list(zip(images, prompts))


def item_problem(task: str, item: dict) -> str | None:
    """Why an item cannot run, found without the model (None when it looks fine)."""
    if task != "caption" and not isinstance(item["prompt"], str):
        return "no prompt"
    if task != "t2i" and not item["images"]:
        return "no image"
    if task in ("edit", "perceive", "caption") and len(item["images"]) != 1:
        return f"{len(item['images'])} images; this task takes one"
    if len(item["images"]) > MAX_CONDITION_IMAGES:
        return (f"{len(item['images'])} condition images; the model takes at most "
                f"{MAX_CONDITION_IMAGES}")
    return None


def run_task(pipe, settings: dict, items: list[Item]) -> None:
    """Runs `items` in one pipeline call; each result goes to its item's writer at once."""
    s = settings
    common = dict(num_steps=s["steps"], seed=[it.seed for it in items],
                  on_result=lambda i, result: items[i].write(result))
    if s["task"] == "t2i":
        pipe.generate([it.prompt for it in items], negative_prompt=s["negative_prompt"],
                      height=s["height"], width=s["width"], guidance_scale=s["guidance"],
                      **common)
    elif s["task"] == "caption":
        pipe.caption([it.images[0] for it in items], prompt=[it.prompt or "" for it in items],
                     resolution=s["resolution"], resize=s["resize"], length=s["length"],
                     **common)
    else:
        pipe.compose([list(it.images) for it in items], [it.prompt for it in items],
                     negative_prompt=s["negative_prompt"], resolution=s["resolution"],
                     resize=s["resize"], guidance_scale=s["guidance"], **common)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = job_settings(args, trained_with_of(args))
        if args.task == "t2i":
            check_resolution(settings["height"], settings["width"])
        else:
            check_resolution(settings["resolution"], settings["resolution"])
        if args.steps < 1:
            raise InputError(f"--steps must be at least 1, got {args.steps}")
        requests = collect_items(args)
        recorded = {"training_run": checkpoint_of(args) if os.path.isdir(args.ckpt) else None,
                    "lora": lora_record(args)}
        settings.update({k: v for k, v in recorded.items() if v is not None})
    except InputError as e:
        parser.error(str(e))

    os.makedirs(args.out, exist_ok=True)
    remove_stale_partials(args.out)  # PNGs / sidecars a killed run was writing
    written, failed, todo = [], [], []
    already_done = 0

    def report(item: Item, message: str) -> None:
        failed.append(item.index)
        print(f"skipping item {item.index}: {message}", file=sys.stderr)

    position = 0  # in the batches of a run that does every good item
    for index, request in enumerate(requests):
        item_settings = {**settings, "index": index, "prompt": request["prompt"],
                         "seed": request["seed"],
                         "images": [os.path.abspath(p) for p in request["images"]]}
        stem = os.path.join(args.out, f"{index:05d}")
        if not args.overwrite and _is_done(item_settings, stem):
            already_done += 1
            position += 1
            continue
        item = Item(index, request["prompt"], request["seed"])
        problem, loaded = item_problem(args.task, request), ()
        if problem is None:
            try:
                loaded = tuple(load_image(p) for p in request["images"])
            except InputError as e:
                problem = str(e)
        if problem is not None:
            report(item, problem)
            continue
        todo.append(dataclasses.replace(item, images=loaded, position=position,
                                        write=_writer(item_settings, stem, written)))
        position += 1

    if todo:
        try:
            pipe = load_pipeline_from_args(args)
        except (InputError, OSError, ValueError) as e:
            print(f"error: cannot load {args.ckpt}: {e}", file=sys.stderr)
            return 1
        if not run_until_disk_full(
                lambda chunk: run_task(pipe, settings, at_run_shape(pipe, chunk,
                                                                    len(requests))),
                todo, report, args.out, written):
            return 2
    if args.task == "caption":
        _gather_captions(args.out, len(requests))
    print(f"{len(written)} written, {already_done} already done, {len(failed)} skipped as "
          f"bad -> {args.out}")
    return 1 if failed else 0


def _is_done(settings: dict, stem: str) -> bool:
    """A sidecar with the same settings exists (written last, so the PNG is complete)."""
    old = read_json_or_none(stem + ".json")
    same = old is not None and all(old.get(k) == v for k, v in settings.items())
    return same and (settings["task"] == "caption" or os.path.exists(stem + ".png"))


def _writer(settings: dict, stem: str, written: list) -> Callable[[Any], None]:
    """Saves one result: the PNG first, then the sidecar that marks the item done."""
    def write(result):
        if settings["task"] == "caption":
            tqdm.write(f"[{settings['index']}] {result}")
            write_json(stem + ".json", {**settings, "caption": str(result),
                                        "answer": result.answer})
        else:
            save_png(result, stem + ".png")
            write_json(stem + ".json", settings)
        written.append(settings["index"])

    return write


def _gather_captions(out: str, count: int) -> None:
    """captions.jsonl: every finished caption of the `count` items, in item order
    (rewritten whole when it changed)."""
    records = []
    for index in range(count):
        side = read_json_or_none(os.path.join(out, f"{index:05d}.json"))
        if side is not None and "caption" in side:
            records.append({"index": side["index"], "image": side["images"][0],
                            "prompt": side["prompt"], "caption": side["caption"],
                            "answer": side.get("answer")})
    write_text_if_changed(os.path.join(out, "captions.jsonl"), jsonl(records))


if __name__ == "__main__":
    sys.exit(main())
