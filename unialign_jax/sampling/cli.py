"""`unialign-sample`: the five tasks from the command line, resumable, one PNG + JSON each.

Every output `NNNNN.png` gets a sidecar `NNNNN.json` with everything needed to redo it
(task, prompt, source images, seed, steps, guidance, shift, resolution, checkpoint); a
rerun skips items whose sidecar already holds the same settings. Captions are printed,
stored in the sidecars and gathered in `captions.jsonl`. A bad item (unreadable image,
too many condition images, ...) is reported and skipped; the others are still written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

from tqdm.auto import tqdm

from unialign_jax import compilation_cache
from unialign_jax.runs import work_dir
from unialign_jax.checkpoints.io import CheckpointError
from unialign_jax.checkpoints.pipeline import TrainedWith
from unialign_jax.runs.work_dir import WEIGHTS
from unialign_jax.files import (disk_full_message, is_disk_full, jsonl, read_json_or_none,
                                remove_stale_partials, save_png, write_json,
                                write_text_if_changed)
from unialign_jax.images import RESIZE_MODES
from unialign_jax.models.attention import IMPLEMENTATIONS
from unialign_jax.parallel import batch_ways
from unialign_jax.sampling.pipeline import (DEFAULT_GUIDANCE, DEFAULT_STEPS,
                                            MAX_CONDITION_IMAGES, chunk_size)
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


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Options shared with `unialign-semgen`: the checkpoint and how to run it."""
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
    from unialign_jax.sampling.pipeline import UniAlignPipeline

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


def lora_of(args) -> dict | None:
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


def fill_recorded_defaults(args) -> None:
    """Options left unset take what the model was trained with."""
    trained = trained_with_of(args)
    args.text_length = trained.text_length
    for name in ("height", "width", "resolution"):
        if getattr(args, name, False) is None:
            setattr(args, name, trained.resolution)
    if getattr(args, "negative_prompt", False) is None:
        args.negative_prompt = trained.negative_prompt
    if args.task == "caption" and args.length is None:
        args.length = args.text_length


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


def _resolve(path: str, base: str) -> str:
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
                      "images": [_resolve(str(p), base) for p in images]})
    return [], items


def collect_items(args) -> list[dict]:
    """One dict per output (prompt, images, seed), from the flags and the prompts file."""
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
    for i, item in enumerate(items):
        if item.get("seed") is None:
            item["seed"] = args.seed + i
    return items


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


def settings_of(args, item: dict, index: int) -> dict:
    """Everything that determines an output; its sidecar holds exactly these (+ results)."""
    s = {"task": args.task, "index": index, "prompt": item["prompt"], "seed": item["seed"],
         "images": [os.path.abspath(p) for p in item["images"]], "steps": args.steps,
         "checkpoint": os.path.abspath(args.ckpt), "dtype": args.dtype,
         "attention": args.attention, "text_length": args.text_length}
    if args.training_run is not None:
        s["training_run"] = args.training_run
    if args.lora_record is not None:
        s["lora"] = args.lora_record
    if args.task == "t2i":
        s.update(height=args.height, width=args.width)
    else:
        s.update(resolution=args.resolution, resize=args.resize)
    if args.task == "caption":
        s.update(length=args.length)
    else:
        s.update(guidance=args.guidance, negative_prompt=args.negative_prompt)
    return s


def item_problem(args, item: dict) -> str | None:
    """Why an item cannot run, found without the model (None when it looks fine)."""
    if args.task != "caption" and not isinstance(item["prompt"], str):
        return "no prompt"
    if args.task != "t2i" and not item["images"]:
        return "no image"
    if args.task in ("edit", "perceive", "caption") and len(item["images"]) != 1:
        return f"{len(item['images'])} images; this task takes one"
    if len(item["images"]) > MAX_CONDITION_IMAGES:
        return (f"{len(item['images'])} condition images; the model takes at most "
                f"{MAX_CONDITION_IMAGES}")
    return None


def run_task(pipe, args, items: list[dict]) -> None:
    """Runs `items` in one pipeline call; each result goes to its item's writer at once."""
    seeds = [it["seed"] for it in items]
    common = dict(num_steps=args.steps, seed=seeds,
                  on_result=lambda i, result: items[i]["write"](result))
    if args.task == "t2i":
        pipe.generate([it["prompt"] for it in items], negative_prompt=args.negative_prompt,
                      height=args.height, width=args.width, guidance_scale=args.guidance,
                      **common)
    elif args.task == "caption":
        pipe.caption([it["loaded"][0] for it in items],
                     prompt=[it["prompt"] or "" for it in items], resolution=args.resolution,
                     resize=args.resize, length=args.length, **common)
    else:
        pipe.compose([it["loaded"] for it in items], [it["prompt"] for it in items],
                      negative_prompt=args.negative_prompt, resolution=args.resolution,
                      resize=args.resize,
                      guidance_scale=args.guidance, **common)


def at_run_shape(pipe, items: list[dict], total: int) -> list[dict]:
    """`items` laid out as a run of all `total` items batches them: XLA's results depend on
    the batch shape and, on some CPUs, on an item's row in the batch, so the items a resumed
    run redoes come out byte-identical to an uninterrupted run's only at its shape and row.
    Items that carry their `position` in the uninterrupted run are put back at its row of
    its chunk; every other slot, and the padding of a short chunk, holds a copy of an item
    of the chunk that writes nothing."""
    size = chunk_size(total, pipe.batch_size, batch_ways(pipe.mesh))
    if any("position" not in item for item in items):
        return items + [{**items[-1], "write": lambda result: None}] * (size - len(items))
    chunks: dict[int, list] = {}
    for item in items:
        row, slot = divmod(item["position"], size)
        chunks.setdefault(row, [None] * size)[slot] = item
    laid_out = []
    for chunk in chunks.values():
        filler = {**next(it for it in chunk if it is not None), "write": lambda result: None}
        laid_out += [filler if it is None else it for it in chunk]
    return laid_out


def run_skipping_bad_items(run: Callable[[list[dict]], None], items: list[dict],
                           report: Callable[[dict, str], None]) -> None:
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


def run_until_disk_full(run: Callable[[list[dict]], None], items: list[dict],
                        report: Callable[[dict, str], None], folder: str, written: list,
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        fill_recorded_defaults(args)
        if args.task == "t2i":
            check_resolution(args.height, args.width)
        else:
            check_resolution(args.resolution, args.resolution)
        if args.steps < 1:
            raise InputError(f"--steps must be at least 1, got {args.steps}")
        items = collect_items(args)
        args.training_run = checkpoint_of(args) if os.path.isdir(args.ckpt) else None
        args.lora_record = lora_of(args)
    except InputError as e:
        parser.error(str(e))

    os.makedirs(args.out, exist_ok=True)
    remove_stale_partials(args.out)  # PNGs / sidecars a killed run was writing
    written, failed, todo = [], [], []
    already_done = 0

    def report(item, message):
        failed.append(item["settings"]["index"])
        print(f"skipping item {item['settings']['index']}: {message}", file=sys.stderr)

    position = 0  # in the batches of a run that does every good item
    for index, item in enumerate(items):
        item["settings"] = settings_of(args, item, index)
        stem = os.path.join(args.out, f"{index:05d}")
        item["sidecar"] = stem + ".json"
        if not args.overwrite and _is_done(args, item, stem):
            already_done += 1
            position += 1
            continue
        problem = item_problem(args, item)
        if problem is None:
            try:
                item["loaded"] = [load_image(p) for p in item["images"]]
            except InputError as e:
                problem = str(e)
        if problem is not None:
            report(item, problem)
            continue
        item["write"] = _writer(args, item, stem, written)
        item["position"], position = position, position + 1
        todo.append(item)

    if todo:
        try:
            pipe = load_pipeline_from_args(args)
        except (InputError, OSError, ValueError) as e:
            print(f"error: cannot load {args.ckpt}: {e}", file=sys.stderr)
            return 1
        if not run_until_disk_full(
                lambda chunk: run_task(pipe, args, at_run_shape(pipe, chunk, len(items))),
                todo, report, args.out, written):
            return 2
    if args.task == "caption":
        _gather_captions(args.out, items)
    print(f"{len(written)} written, {already_done} already done, {len(failed)} skipped as "
          f"bad -> {args.out}")
    return 1 if failed else 0


def _is_done(args, item: dict, stem: str) -> bool:
    """A sidecar with the same settings exists (written last, so the PNG is complete)."""
    old = read_json_or_none(item["sidecar"])
    same = old is not None and all(old.get(k) == v for k, v in item["settings"].items())
    return same and (args.task == "caption" or os.path.exists(stem + ".png"))


def _writer(args, item: dict, stem: str, written: list) -> Callable[[Any], None]:
    """Saves one result: the PNG first, then the sidecar that marks the item done."""
    def write(result):
        if args.task == "caption":
            tqdm.write(f"[{item['settings']['index']}] {result}")
            write_json(item["sidecar"], {**item["settings"], "caption": str(result),
                                         "answer": result.answer})
        else:
            save_png(result, stem + ".png")
            write_json(item["sidecar"], item["settings"])
        written.append(item["settings"]["index"])

    return write


def _gather_captions(out: str, items: list[dict]) -> None:
    """captions.jsonl: every finished caption in item order (rewritten whole when it
    changed)."""
    records = []
    for item in items:
        side = read_json_or_none(item["sidecar"])
        if side is not None and "caption" in side:
            records.append({"index": side["index"], "image": side["images"][0],
                            "prompt": side["prompt"], "caption": side["caption"],
                            "answer": side.get("answer")})
    write_text_if_changed(os.path.join(out, "captions.jsonl"), jsonl(records))


if __name__ == "__main__":
    sys.exit(main())
