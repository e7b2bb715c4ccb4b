"""`unialign-data`: build training shards from JSONL corpora, precompute their alignment-teacher
features or their VAE posterior moments (cached latents), or write a synthetic corpus."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from unialign_jax.data.build.faults import DEFAULT_MAX_SKIP_FRACTION, TooManySkipped
from unialign_jax.data.build.fetch import DEFAULT_DEADLINE, DEFAULT_MAX_BYTES, MIB, FetchOptions
from unialign_jax.data.build.jsonl import DEFAULT_COMPOSE_SOURCES
from unialign_jax.data.build.shards import RELEASE_MAX_PIXELS
from unialign_jax.data.build.teacher_precompute import POOLINGS, RELEASE_TEXT_BATCH
from unialign_jax.data.format.records import KINDS
from unialign_jax.files import disk_full_message, is_disk_full
from unialign_jax.images import DecodeOptions


def _add_build(sub) -> None:
    p = sub.add_parser(
        "build", help="JSONL corpus → ArrayRecord shards + summary.json",
        description="Reads JSONL corpora (image paths relative to the JSONL or --image-root, "
                    "absolute, or http(s) URLs; composition also in the release's layout: "
                    "original_images, generated_images, edit_prompt, caption), decodes every "
                    "image, converts it to RGB, resizes its short "
                    "side (bicubic) and center-crops it, and writes ArrayRecord shards with "
                    "the texts plus OUT/summary.json (records written, skipped samples by "
                    "reason). Faulty samples are skipped and counted; the build fails only if "
                    "more than --max-skip-fraction of them are skipped. An interrupted build "
                    "(SIGKILL, full disk) resumes when rerun with the same arguments; "
                    "rerunning a finished build changes nothing.")
    p.add_argument("--jsonl", nargs="+", required=True, metavar="FILE", help="input JSONL files")
    p.add_argument("--kind", choices=KINDS, required=True,
                   help="t2i: 1 image; edit (editing and perception): source, target; "
                        "compose: --compose-sources sources, target")
    p.add_argument("--out", required=True, metavar="DIR", help="output shard folder")
    p.add_argument("--resolution", type=int, default=512, help="square side in pixels (512)")
    p.add_argument("--image-format", choices=("png", "jpeg", "raw"), default="png",
                   help="png: lossless (default); jpeg: quality 95, ~4x smaller than png, "
                        "~2x faster to read, not exact; raw: uint8 arrays, ~1.7x larger than "
                        "png, ~7x faster to read")
    p.add_argument("--records-per-shard", type=int, default=1000)
    p.add_argument("--compose-sources", type=int, default=DEFAULT_COMPOSE_SOURCES,
                   help="source images per composition sample (3, the release's)")
    p.add_argument("--image-root", default=None, metavar="DIR",
                   help="folder relative image paths resolve against (default: each JSONL "
                        "file's folder; the release resolves them against its working "
                        "directory: --image-root .)")
    p.add_argument("--exact-images", action="store_true",
                   help="skip lines that list more images than their kind needs "
                        "(wrong_image_count); default: the first ones are taken, as the "
                        "release takes image[0] (and image[1])")
    p.add_argument("--skip-empty-text", action="store_true",
                   help="skip lines with an empty caption or instruction (missing_field); "
                        "default: kept, as the release trains on them")
    p.add_argument("--workers", type=int, default=1, help="worker processes (1)")
    p.add_argument("--threads", type=int, default=8,
                   help="threads per worker, overlapping downloads and decoding (8)")
    p.add_argument("--url-timeout", type=float, default=10.0, help="seconds per download try")
    p.add_argument("--url-retries", type=int, default=2, help="extra tries per download")
    p.add_argument("--url-deadline", type=float, default=DEFAULT_DEADLINE, metavar="S",
                   help="seconds per image download, all tries together (default %(default)g); "
                        "a slower one is counted as url_too_slow")
    p.add_argument("--max-download-mib", type=float, default=DEFAULT_MAX_BYTES / MIB,
                   metavar="MIB",
                   help="largest download accepted, checked against Content-Length and while "
                        "reading (default %(default)g MiB); a larger one is counted as "
                        "url_too_large")
    p.add_argument("--max-skip-fraction", type=float, default=DEFAULT_MAX_SKIP_FRACTION,
                   help="fail when a larger fraction of samples is skipped (0.05)")
    p.add_argument("--min-side", type=int, default=None, metavar="PX",
                   help="skip images whose short side is below PX, counted as "
                        "image_too_small (default: none, as the release, which upscales "
                        "them; e.g. half of --resolution)")
    p.add_argument("--max-aspect", type=float, default=None,
                   help="skip images whose long / short side exceeds this, counted as "
                        "bad_aspect_ratio (default: none, as the release; e.g. 4)")
    p.add_argument("--max-pixels", type=int, default=RELEASE_MAX_PIXELS,
                   help="decompression-bomb limit: skip images with more pixels, counted as "
                        "image_too_large (default %(default)s: where PIL refuses them, as in "
                        "the release; PIL warns from half of it)")
    p.add_argument("--exif-orientation", choices=("apply", "keep"), default="apply",
                   help="apply: turn photos upright by their EXIF orientation (default); keep: "
                        "the stored orientation, as the release reads them")
    p.add_argument("--background", type=int, nargs=3, default=list(DecodeOptions().background),
                   metavar=("R", "G", "B"),
                   help="colour transparent pixels are composited onto (default white)")
    p.add_argument("--buckets", action="store_true",
                   help="aspect-ratio buckets: keep each target's aspect, resized and "
                        "centre-cropped to the nearest bucket of about --resolution² pixels "
                        "(sides multiples of 16; its sources to the same size), for training "
                        "with data.buckets=True. Default: the release's square centre crop")
    p.add_argument("--force", action="store_true",
                   help="overwrite OUT and discard an unfinished build (without it, rerunning "
                        "a finished build changes nothing and exits 0)")
    p.set_defaults(func=_build)


def _build(args) -> dict:
    from unialign_jax.data.build.jsonl import LineRules
    from unialign_jax.data.build.shards import BuildOptions, build

    opts = BuildOptions(
        kind=args.kind, resolution=args.resolution, image_format=args.image_format,
        records_per_shard=args.records_per_shard, workers=args.workers, threads=args.threads,
        lines=LineRules(compose_sources=args.compose_sources, exact_images=args.exact_images,
                        keep_empty_text=not args.skip_empty_text, image_root=args.image_root),
        fetch=FetchOptions(timeout=args.url_timeout, retries=args.url_retries,
                           deadline=args.url_deadline,
                           max_bytes=int(args.max_download_mib * MIB)),
        max_skip_fraction=args.max_skip_fraction,
        decode=DecodeOptions(exif_orientation=args.exif_orientation == "apply",
                             background=tuple(args.background), max_pixels=args.max_pixels),
        min_side=args.min_side, max_aspect=args.max_aspect, buckets=args.buckets)
    summary = build(args.jsonl, args.out, opts, force=args.force)
    return {k: summary[k] for k in ("kind", "records", "skipped", "lines", "resolution",
                                    "bucket_counts") if k in summary}


def _add_synth(sub) -> None:
    p = sub.add_parser(
        "synth", help="write a synthetic shape corpus in the JSONL formats",
        description="Draws flat-coloured shape scenes with exact captions ('a red square'), "
                    "colour edits ('make the red square blue'), segmentation requests and "
                    "compositions (shapes from separate images combined into one scene), as "
                    "t2i_*.jsonl, edit_*.jsonl and compose_*.jsonl (the release's compose "
                    "layout) plus images/, readable by `build`.")
    p.add_argument("--out", required=True, metavar="DIR")
    p.add_argument("--n", type=int, required=True, help="samples per kind (t2i, edit, compose)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=64, help="image side in pixels (64)")
    p.add_argument("--max-shapes", type=int, default=1, help="shapes per scene, at most (1)")
    p.add_argument("--heldout", type=float, default=0.0,
                   help="fraction of each kind written to *_heldout.jsonl instead (0)")
    p.add_argument("--compose-sources", type=int, default=DEFAULT_COMPOSE_SOURCES,
                   help="source images (shapes) per composition sample (3)")
    p.add_argument("--force", action="store_true", help="overwrite DIR")
    p.set_defaults(func=_synth)


def _synth(args) -> dict:
    from unialign_jax.data.build.synth import generate

    info = generate(args.out, args.n, seed=args.seed, size=args.size,
                    max_shapes=args.max_shapes, heldout=args.heldout, force=args.force,
                    compose_sources=args.compose_sources)
    return {k: info[k] for k in ("n", "seed", "size", "heldout", "files")}


TEACHER_HELP = """\
For every record of built shard folders: the mean of Qwen2.5-VL's vision tower's merged
output tokens for the stored target image, and the pooled LLM input-embedding rows of the
caption (spec section 2), written to SHARDS/teacher/; training reads them as teacher_image
and teacher_text. Captions are pooled as the release pools them by default (--pooling
release: each batch of --batch-size captions padded together, pads averaged in; the
release pads its local batch of 48), or each on its own (--pooling clean). Interrupted
runs resume; needs PyTorch, transformers and a local model folder (nothing is downloaded).
"""


def _add_teacher(sub) -> None:
    p = sub.add_parser(
        "teacher", help="precompute alignment-teacher features (Qwen2.5-VL) into shard folders",
        description=TEACHER_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="local Qwen2.5-VL folder (weights, preprocessor, tokenizer)")
    p.add_argument("--shards", nargs="+", required=True, metavar="DIR",
                   help="shard folders built by `unialign-data build`")
    p.add_argument("--batch-size", type=int, default=RELEASE_TEXT_BATCH,
                   help="records per forward, and captions padded together "
                        "(default %(default)s, the release's local batch)")
    p.add_argument("--pooling", choices=POOLINGS, default="release",
                   help="text-feature pooling (default %(default)s)")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="model weights' dtype (float32); features are stored as float16")
    p.add_argument("--force", action="store_true", help="recompute existing features")
    p.set_defaults(func=_teacher)


def _teacher(args) -> dict:
    from unialign_jax.data.build.teacher_precompute import precompute
    from unialign_jax.data.build.teacher_qwen import QwenTeacher

    teacher = QwenTeacher(args.model, device=args.device, dtype=args.dtype,
                          pooling=args.pooling)
    return {d: precompute(d, teacher, args.batch_size, args.force) for d in args.shards}


LATENTS_HELP = """\
For every record of built shard folders: the VAE posterior moments (mean and log-variance)
of its target and source images, written to SHARDS/latents/ with latents.json naming the
VAE (folder, SHA-256 of its files, dtypes) and the resolution. A run with
data.cached_latents=True reads them instead of encoding the images in every step — the same
steps (it still draws the posterior samples, with the same keys), without the VAE encoder —
and refuses a cache made by another VAE, dtype or shard build. --dtype and --param-dtype
must be the run's compute.dtype and compute.frozen_param_dtype. Interrupted runs resume.
"""


def _add_latents(sub) -> None:
    p = sub.add_parser(
        "latents", help="precompute VAE posterior moments (cached latents) into shard folders",
        description=LATENTS_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("shards", nargs="+", metavar="SHARDS",
                   help="shard folders built by `unialign-data build`")
    p.add_argument("--vae", required=True, metavar="DIR",
                   help="converted VAE folder: the run's models.vae_path (or its pipeline's vae/)")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="compute dtype: the run's compute.dtype (default %(default)s)")
    p.add_argument("--param-dtype", default="bfloat16", choices=("float32", "bfloat16"),
                   help="VAE weights' dtype: the run's compute.frozen_param_dtype "
                        "(default %(default)s)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder call (16)")
    p.add_argument("--force", action="store_true", help="recompute existing latents")
    p.set_defaults(func=_latents)


def _latents(args) -> dict:
    import jax.numpy as jnp

    from unialign_jax.checkpoints.registry import load_vae
    from unialign_jax.data.build.latent_precompute import precompute, vae_moments
    from unialign_jax.data.format.latent_cache import storage_dtype, vae_identity

    identity = vae_identity(args.vae, args.dtype, args.param_dtype)
    vae = load_vae(args.vae, jnp.dtype(args.dtype), param_dtype=jnp.dtype(args.param_dtype))
    moments = vae_moments(vae, args.batch_size)
    return {d: precompute(d, moments, identity, storage_dtype(args.dtype), args.batch_size,
                          vae_path=os.path.abspath(args.vae), force=args.force)
            for d in args.shards}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unialign-data", description="Data preparation for UniAlignment training.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_build(sub)
    _add_synth(sub)
    _add_teacher(sub)
    _add_latents(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
    except (TooManySkipped, FileExistsError, FileNotFoundError, ValueError) as e:
        print(f"unialign-data {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError) as e:
        if not is_disk_full(e):
            raise
        where = getattr(args, "out", None) or " ".join(getattr(args, "shards", []))
        print(f"unialign-data {args.command}: error: {disk_full_message(where)}",
              file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
