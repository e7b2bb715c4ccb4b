"""Shard builder: JSONL corpora → ArrayRecord shards of preprocessed samples.

Every sample is read (path or URL), decoded, converted to RGB, resized and center-cropped
once, here, so that training workers only decode and normalise. Samples are split in input
order into shards of `records_per_shard`; each shard is written by one worker, to a
temporary name renamed into place, with a `.stats.json` beside it that marks it done.
The build runs in a staging folder next to the output (`.NAME.partial`): an interrupted
build (a SIGKILL, a full disk) resumes from its finished shards, and the output folder
appears, complete with its `summary.json`, only when everything succeeded. The output
keeps the build's `plan.json` (inputs, their sizes and times, every setting): rerunning
the same build finds it and changes nothing; another build into the same folder is
refused unless forced.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import logging
import multiprocessing
import os
import shutil

import numpy as np
from tqdm import tqdm

from unialign_jax import images
from unialign_jax.data.build.faults import (DEFAULT_MAX_SKIP_FRACTION, FaultLogger, SkipLog,
                                            SkipSample, check_skipped_fraction)
from unialign_jax.data.build.fetch import FetchOptions, read_image_bytes
from unialign_jax.data.build.jsonl import LineRules, Sample, expected_images, read_jsonl
from unialign_jax.data.format import stored_images
from unialign_jax.data.format.records import BUCKETS, SUMMARY, encode_record
from unialign_jax.files import read_json_or_none, remove_stale_partials, write_atomic, write_json
from unialign_jax.images import DecodeOptions

log = logging.getLogger(__name__)

PLAN = "plan.json"
RECORD_SUFFIX = ".array_record"
STATS_SUFFIX = ".stats.json"
# The release reads images with PIL's own limits: a warning past Image.MAX_IMAGE_PIXELS
# (89_478_485), a refusal past twice that. Its pixel limit is the refusal.
RELEASE_MAX_PIXELS = 2 * DecodeOptions().max_pixels


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    kind: str
    resolution: int = 512
    image_format: str = "png"
    records_per_shard: int = 1000
    workers: int = 1                 # processes, one shard each at a time
    threads: int = 8                 # per worker: overlaps downloads and decoding
    fetch: FetchOptions = FetchOptions()
    max_skip_fraction: float = DEFAULT_MAX_SKIP_FRACTION
    # EXIF orientation, background, pixel limit (the release's: PIL's refusal point)
    decode: DecodeOptions = DecodeOptions(max_pixels=RELEASE_MAX_PIXELS)
    # Shortest side and longest / shortest side accepted; None: any, as the release, which
    # upscales and crops every readable image.
    min_side: int | None = None
    max_aspect: float | None = None
    lines: LineRules = LineRules()   # what a JSONL line must hold (the release's rules)
    # Aspect-ratio buckets: each sample keeps its target's aspect, resized and cropped to
    # the nearest `images.bucket_size` of about resolution² pixels (its sources to the
    # same size); False: the release's square centre crop.
    buckets: bool = False

    def __post_init__(self):
        expected_images(self.kind, self.lines.compose_sources)  # validates kind
        if self.image_format not in stored_images.FORMATS:
            raise ValueError(f"image format must be one of {stored_images.FORMATS}")
        if self.resolution < 8 or self.records_per_shard < 1 or self.workers < 1 or self.threads < 1:
            raise ValueError("need resolution >= 8 and records_per_shard, workers, threads >= 1")
        if (self.max_aspect is not None and self.max_aspect < 1) or (
                self.min_side is not None and self.min_side < 1):
            raise ValueError("need max_aspect >= 1 and min_side >= 1")

    @property
    def num_sources(self) -> int:
        return expected_images(self.kind, self.lines.compose_sources) - 1

    def settings(self) -> dict:
        """What the stored samples depend on, for the plan and `summary.json`."""
        return {"resolution": self.resolution, "image_format": self.image_format,
                "exif_orientation": self.decode.exif_orientation,
                "background": list(self.decode.background),
                "max_pixels": self.decode.max_pixels, "min_side": self.min_side,
                "max_aspect": self.max_aspect, **self.lines.settings(),
                **({"buckets": True} if self.buckets else {})}


def staging_dir(out_dir: str) -> str:
    out_dir = os.path.abspath(out_dir)
    return os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.partial")


def preprocess_sample(sample: Sample, opts: BuildOptions
                      ) -> tuple[bytes, tuple[int, int] | None]:
    """One sample → (its encoded record, its bucket's (width, height) or None unbucketed);
    raises `SkipSample` / `images.ImageError` if any of its images fails: unreadable,
    undecodable, too small, too elongated or too large."""
    decoded = []
    for location in sample.images:
        img = images.decode_image(read_image_bytes(location, opts.fetch), location,
                                  opts.decode).image
        images.check_size(img.size, min_side=opts.min_side or 1,
                          max_aspect=opts.max_aspect or float("inf"), name=location)
        decoded.append(img)
    fields = {"caption": sample.caption, "instruction": sample.instruction,
              "where": sample.where}
    size = None
    if opts.buckets:  # the target (last) decides; its sources take its size
        size = fields["size"] = images.bucket_size(decoded[-1].size, opts.resolution)
        decoded = [images.resize_and_center_crop_to(img, size) for img in decoded]
    else:
        decoded = [images.resize_and_center_crop(img, opts.resolution) for img in decoded]
    return encode_record(fields, [stored_images.encode(img, opts.image_format)
                                  for img in decoded]), size


def _preprocess_or_fault(args):
    try:
        return preprocess_sample(*args)
    except images.ImageError as fault:   # SkipSample is one
        return fault


def build_shard(folder: str, name: str, samples: list, opts: BuildOptions) -> dict:
    """Writes `folder/name.array_record` and its stats file; returns the stats."""
    from array_record.python.array_record_module import ArrayRecordWriter

    path = os.path.join(folder, name + RECORD_SUFFIX)
    skipped, records, buckets = SkipLog(), 0, []
    table = images.bucket_table(opts.resolution)
    writer = ArrayRecordWriter(f"{path}.tmp", "group_size:1")
    try:
        try:
            with concurrent.futures.ThreadPoolExecutor(opts.threads) as pool:
                results = pool.map(_preprocess_or_fault, [(s, opts) for s in samples])
                for sample, result in zip(samples, results):
                    if isinstance(result, images.ImageError):
                        skipped.add(sample.where, result)
                    else:
                        record, size = result
                        writer.write(record)
                        records += 1
                        if size is not None:
                            buckets.append(table.index(size))
        finally:
            writer.close()  # raises when the disk is full
    except BaseException:
        if os.path.exists(f"{path}.tmp"):
            os.remove(f"{path}.tmp")  # frees its space; the rerun writes the shard again
        raise
    os.replace(f"{path}.tmp", path)
    stats = {"file": name + RECORD_SUFFIX, "records": records, "samples": len(samples),
             "skipped": skipped.to_json(), **({"buckets": buckets} if opts.buckets else {})}
    write_json(os.path.join(folder, name + STATS_SUFFIX), stats)
    return stats


def _parse_inputs(paths: list[str], opts: BuildOptions) -> tuple[list[Sample], SkipLog, int]:
    samples, faults, lines = [], SkipLog(), 0
    for path in paths:
        for where, item in read_jsonl(path, opts.kind, opts.lines):
            lines += 1
            if isinstance(item, SkipSample):
                faults.add(where, item)
            else:
                samples.append(item)
    return samples, faults, lines


def _plan(paths: list[str], opts: BuildOptions, num_shards: int) -> dict:
    """What the shards' content depends on; a resumed build must match it exactly."""
    inputs = [{"path": os.path.abspath(p), "bytes": os.path.getsize(p),
               "mtime_ns": os.stat(p).st_mtime_ns} for p in paths]
    return {"kind": opts.kind, **opts.settings(), "records_per_shard": opts.records_per_shard,
            "num_sources": opts.num_sources, "num_shards": num_shards, "inputs": inputs}


def _open_staging(staging: str, plan: dict) -> None:
    plan_path = os.path.join(staging, PLAN)
    if os.path.exists(plan_path):
        with open(plan_path) as f:
            if json.load(f) != plan:
                raise FileExistsError(
                    f"{staging} holds an unfinished build of other inputs or options; "
                    "pass --force to discard it")
        log.info("resuming the build in %s", staging)
        return
    os.makedirs(staging, exist_ok=True)
    write_json(plan_path, plan)


def _run_shards(staging: str, jobs: list, opts: BuildOptions, total: int) -> None:
    pending = [(name, samples) for name, samples in jobs
               if not os.path.exists(os.path.join(staging, name + STATS_SUFFIX))]
    done = total - sum(len(s) for _, s in pending)
    report = FaultLogger()
    with tqdm(total=total, initial=done, unit="sample", desc=f"build {opts.kind}") as bar:
        if opts.workers == 1 or len(pending) <= 1:
            for name, samples in pending:
                stats = build_shard(staging, name, samples, opts)
                report(stats["skipped"]["examples"])
                bar.update(len(samples))
            return
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(opts.workers, mp_context=ctx) as pool:
            futures = [pool.submit(build_shard, staging, name, samples, opts)
                       for name, samples in pending]
            for future in concurrent.futures.as_completed(futures):
                stats = future.result()
                report(stats["skipped"]["examples"])
                bar.update(stats["samples"])


def build(jsonl_paths: list[str], out_dir: str, opts: BuildOptions, force: bool = False) -> dict:
    """Builds the shard folder `out_dir` from JSONL files and returns its summary.

    Raises `TooManySkipped` (keeping the staging folder, so a rerun with a higher
    threshold only re-summarises) when more than `opts.max_skip_fraction` of the lines
    were skipped.
    """
    out_dir = os.path.abspath(out_dir)
    for path in jsonl_paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"JSONL file not found: {path}")
    staging = staging_dir(out_dir)
    if force:
        shutil.rmtree(staging, ignore_errors=True)

    samples, parse_faults, lines = _parse_inputs(jsonl_paths, opts)
    if not lines:
        raise ValueError(f"no samples in {', '.join(jsonl_paths)}")
    n = max(1, -(-len(samples) // opts.records_per_shard))
    plan = _plan(jsonl_paths, opts, n)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)) \
            and not force:
        return _finished_build(out_dir, plan)
    FaultLogger()(parse_faults.examples)
    check_skipped_fraction(parse_faults, lines, opts.max_skip_fraction, "parsing")

    jobs = [(f"{opts.kind}-{i:05d}-of-{n:05d}",
             samples[i * opts.records_per_shard:(i + 1) * opts.records_per_shard])
            for i in range(n)]
    _open_staging(staging, plan)
    _run_shards(staging, jobs, opts, len(samples))

    skipped, shards, buckets = parse_faults, [], []
    for name, _ in jobs:
        with open(os.path.join(staging, name + STATS_SUFFIX)) as f:
            stats = json.load(f)
        skipped.merge(SkipLog.from_json(stats["skipped"]))
        shards.append({"file": stats["file"], "records": stats["records"]})
        buckets += stats.get("buckets", [])
    records = sum(s["records"] for s in shards)
    summary = {"kind": opts.kind, **opts.settings(), "num_sources": opts.num_sources,
               "lines": lines, "records": records,
               "skipped": dict(sorted(skipped.counts.items())), "skipped_total": skipped.total,
               "skipped_examples": skipped.examples, "shards": shards,
               "inputs": [os.path.abspath(p) for p in jsonl_paths]}
    if opts.buckets:
        summary.update(_write_buckets(staging, buckets, opts.resolution))
    check_skipped_fraction(skipped, lines, opts.max_skip_fraction, out_dir)
    write_json(os.path.join(staging, SUMMARY), summary)
    remove_stale_partials(staging)  # files whose writer was killed mid-write
    # A forced rebuild moves the old output aside first: no instant shows a half-deleted one.
    replaced = os.path.join(os.path.dirname(out_dir), f".{os.path.basename(out_dir)}.replaced")
    if os.path.exists(out_dir):
        _remove(replaced)
        os.replace(out_dir, replaced)
    os.replace(staging, out_dir)
    _remove(replaced)
    return summary


def _write_buckets(folder: str, buckets: list[int], resolution: int) -> dict:
    """Writes each record's bucket index (`BUCKETS`); returns the summary's bucket table
    (all sizes of the resolution, as (width, height)) and records per size."""
    table = images.bucket_table(resolution)
    write_atomic(os.path.join(folder, BUCKETS),
                 lambda f: np.save(f, np.asarray(buckets, np.uint8)))
    counts = np.bincount(np.asarray(buckets, np.int64), minlength=len(table))
    return {"bucket_table": [list(size) for size in table],
            "bucket_counts": {f"{w}x{h}": int(n) for (w, h), n in zip(table, counts) if n}}


def _remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def _finished_build(out_dir: str, plan: dict) -> dict:
    """The summary of `out_dir` when it is this very build, finished (a rerun); else a
    clear refusal naming what differs."""
    done = read_json_or_none(os.path.join(out_dir, PLAN))
    summary = read_json_or_none(os.path.join(out_dir, SUMMARY))
    if done == plan and summary is not None:
        log.info("%s already holds this build; nothing to do", out_dir)
        return summary
    what = (f"a build of other inputs or options (differs in: "
            f"{', '.join(k for k in plan if plan[k] != done.get(k))})"
            if isinstance(done, dict) else "something other than a finished shard build")
    raise FileExistsError(f"{out_dir} exists and holds {what}; pass --force to overwrite it")
