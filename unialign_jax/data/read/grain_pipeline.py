"""Grain input pipeline: shard folders → fixed-shape training batches, alternating tasks.

Per task stream (spec section 4): global shuffle with one seed on every host, cut into
batches of the per-host size b; host `p` of `P` takes batches p, p + P, p + 2P, ... —
so global batch k is host 0's k-th batch, then host 1's, ...: exactly the single-host
run's global batch k, row for row, and hosts never share a sample. Each record is decoded
to float32 [-1, 1] channels-last images and its texts tokenised like the release (pad
`</s>`, fixed length); records are batched per task, and the task streams (text-to-image,
editing, composition) alternate in a fixed cycle of `task_weights` batches each (the
release: one step text-to-image, one step editing).

Bucketed builds (`unialign-data build --buckets`, `buckets=True`): a task's stream is one
stream per aspect-ratio bucket, each shuffled with its own seed and host-sharded as above,
mixed in a fixed interleaving weighted by the buckets' record counts; every batch is then
one bucket's size (S × S becomes that bucket's height × width), the same on every host.

A record that cannot be read or decoded stops the pipeline with a `CorruptRecord` error
naming its shard and position; with `skip_corrupt` it is replaced by the next readable
record of the stream, and the batch's `skipped` field marks the rows replaced.
`next_batch` bounds the wait for one batch, so a stuck worker process fails the run
instead of hanging it (a crashed one fails at once).

The iterator is a `grain.DatasetIterator`: `get_state()` / `set_state()` give exact
resume, and `grain.checkpoint.CheckpointSave(it)` / `CheckpointRestore(it)` put the same
state into an Orbax checkpoint next to the model.

A batch holds the fields of `batch_spec.FIELDS` (B = per-host batch), each example made
by `batch_spec.example`: teacher rows only when the folders have teacher features, cached
moments in place of the images only with `latents`, `skipped` only with `skip_corrupt`.
"""

from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import signal
import threading
from typing import Mapping, Sequence

import grain
import numpy as np

from unialign_jax.data.format import stored_images
from unialign_jax.data.format.records import KINDS, decode_record, read_summary
from unialign_jax.data.read import batch_spec
from unialign_jax.data.read.batch_spec import MOMENT_KEYS, TEACHER_KEYS
from unialign_jax.data.read.shard_source import CorruptRecord, ShardSource
from unialign_jax.data.read.tfds_source import is_tfds, open_source
from unialign_jax.images import to_model_range
from unialign_jax.text.tokenizer import MAX_LENGTH, load_tokenizer, tokenize

log = logging.getLogger(__name__)

TASK_IDS = {task: i for i, task in enumerate(KINDS)}  # t2i 0, edit 1, compose 2
_TOKENIZER_LOCK = threading.Lock()


class DataError(RuntimeError):
    """The pipeline could not deliver a batch: a worker process crashed or hung."""


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int                   # per host
    tokenizer: str                    # local T5 tokenizer folder
    max_length: int = MAX_LENGTH
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None     # None: repeat forever (training)
    process_index: int | None = None  # None: jax.process_index()
    process_count: int | None = None  # None: jax.process_count()
    num_workers: int = 0              # worker processes; 0 decodes in this process
    read_threads: int = 2             # batches decoded concurrently per process
    worker_buffer: int = 2            # finished batches each worker keeps ready
    resolution: int | None = None     # expected shard resolution; None accepts the shards'
    skip_corrupt: bool = False        # replace unreadable records by the next readable one
    # Batches of each corpus per cycle of the mix, in the corpora's order (None: one each).
    task_weights: tuple[float, ...] | None = None
    # Cached VAE moments to read in place of the pixels: the `latent_cache.vae_identity`
    # that made them (a cache made otherwise is refused); None: decode the images.
    latents: dict | None = None
    # Aspect-ratio buckets: the folders were built with `--buckets`, and every batch is
    # formed from one bucket (data.buckets); False: square builds only.
    buckets: bool = False


class ToTrainingExample(grain.transforms.Map):
    """One position in the stream's records (all of the source's, or one bucket's: the
    record indices `records`) → one training example (read, decoded, tokenised)."""

    def __init__(self, task: str, source: ShardSource, tokenizer: str, max_length: int,
                 skip_corrupt: bool = False, records: np.ndarray | None = None):
        self.task, self.tokenizer_path, self.max_length = task, tokenizer, max_length
        self.source, self.skip_corrupt, self.records = source, skip_corrupt, records
        self.image_format, self.resolution = source.image_format, source.resolution
        self._tokenizer, self._reported = None, set()

    def __getstate__(self):
        return {**self.__dict__, "_tokenizer": None}  # each worker loads its own

    def map(self, index: int) -> dict:
        """The example of the stream's record `index`; with `skip_corrupt`, of its first
        readable record from `index` on (its `skipped` field is 1 when that is not `index`
        itself) — of the same bucket, so that the batch keeps one shape."""
        count = len(self.source) if self.records is None else len(self.records)
        for skipped in range(count):
            position = (int(index) + skipped) % count
            if self.records is not None:
                position = int(self.records[position])
            try:
                example = self._example(self.source[position])
            except CorruptRecord as e:
                if not self.skip_corrupt:
                    raise
                if position not in self._reported:
                    self._reported.add(position)
                    log.warning("skipping a corrupt record: %s", e)
                continue
            if self.skip_corrupt:
                example["skipped"] = skipped > 0
            return batch_spec.example(example)
        raise CorruptRecord(f"no readable record in the {self.task} shards")

    def _ids(self, texts: list[str]) -> np.ndarray:
        # Read threads share one tokenizer: neither loading it (a lazy transformers import)
        # nor calling it (it resets padding / truncation state in Rust) is thread-safe.
        with _TOKENIZER_LOCK:
            if self._tokenizer is None:
                self._tokenizer = load_tokenizer(self.tokenizer_path)
            return tokenize(self._tokenizer, texts, self.max_length)

    def _example(self, item: dict) -> dict:
        cached = MOMENT_KEYS[0] in item  # cached moments replace the pixels
        try:
            fields, blobs = decode_record(item["record"])
            size = fields.get("size", self.resolution)  # (width, height) when bucketed
            pixels = [] if cached else [
                to_model_range(stored_images.decode_stored(b, self.image_format, size))
                for b in blobs]
            texts = [fields["caption"], fields["instruction"]]
        except (ValueError, OSError, KeyError) as e:
            raise CorruptRecord(f"{self.source.where(item['index'])} does not decode "
                                f"({type(e).__name__}: {e})") from None
        caption_ids, instruction_ids = self._ids(texts)
        example = {"caption_ids": caption_ids, "instruction_ids": instruction_ids,
                   "task": TASK_IDS[self.task], "index": item["index"]}
        if pixels:
            example["target"] = pixels[-1]
        if len(pixels) > 1:
            example["sources"] = np.stack(pixels[:-1])
        example.update({k: v for k, v in item.items() if k in TEACHER_KEYS + MOMENT_KEYS})
        return example


def _host(cfg: PipelineConfig) -> tuple[int, int]:
    if cfg.process_index is not None and cfg.process_count is not None:
        index, count = cfg.process_index, cfg.process_count
    else:
        import jax
        index, count = jax.process_index(), jax.process_count()
    if not 0 <= index < count:
        raise ValueError(f"process index {index} outside [0, {count})")
    return index, count


def condition_images(task: str, folders: Sequence[str]) -> int:
    """Source images per sample of a task's corpus — 0 for text-to-image, 1 for editing, the
    build's `--compose-sources` for composition —: the `K` of its batches' `sources`."""
    if task == "t2i":
        return 0
    return 1 if is_tfds(folders[0]) else int(read_summary(folders[0])["num_sources"])


def task_batches(task: str, folders: Sequence[str], cfg: PipelineConfig, seed: int
                 ) -> grain.MapDataset:
    """Shuffled, host-sharded, decoded and batched stream of one task's shard folders (or
    prepared TFDS datasets, `tfds:NAME?...` entries: `tfds_source`)."""
    source = open_source(list(folders), task, cfg.resolution)
    if source is not None and cfg.latents is not None:
        raise ValueError(f"{list(folders)}: cached latents are read from shard folders only, "
                         "not TFDS datasets; set data.cached_latents=False")
    source = source or ShardSource(list(folders), skip_corrupt=cfg.skip_corrupt,
                                   latents=cfg.latents)
    if source.kind != task:
        raise ValueError(f"{folders} hold {source.kind!r} records, not {task!r}")
    if cfg.resolution is not None and source.resolution != cfg.resolution:
        raise ValueError(f"{folders} were built at {source.resolution} px, not {cfg.resolution}")
    bucketed = getattr(source, "bucket_table", None) is not None
    if bucketed != cfg.buckets:
        raise ValueError(
            f"{list(folders)} were built {'with' if bucketed else 'without'} aspect-ratio "
            f"buckets but data.buckets is {cfg.buckets}: set data.buckets={bucketed}, or "
            f"rebuild them {'without' if bucketed else 'with'} `unialign-data build --buckets`")
    if not bucketed:
        return _record_batches(task, source, None, cfg, seed)
    return bucket_batches(task, source, cfg, seed)


def _record_batches(task: str, source, records: np.ndarray | None, cfg: PipelineConfig,
                    seed: int) -> grain.MapDataset:
    """Shuffled, repeated, decoded, batched and host-sharded stream of `records` (record
    indices; None: all the source's)."""
    index, count = _host(cfg)
    ds = grain.MapDataset.range(len(source) if records is None else len(records))
    if cfg.shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(cfg.num_epochs).map(ToTrainingExample(
        task, source, cfg.tokenizer, cfg.max_length, cfg.skip_corrupt, records))
    # Lazy: a host decodes only the rows of its own batches.
    return ds.batch(cfg.batch_size, drop_remainder=True)[index::count]


def bucket_batches(task: str, source: ShardSource, cfg: PipelineConfig, seed: int
                   ) -> grain.MapDataset:
    """A bucketed task's batches: one stream per bucket (each shuffled with its own seed,
    derived from `seed`), mixed in a fixed interleaving weighted by the buckets' record
    counts — so every batch holds one image size, on every host the same one, and the
    order is a function of the seed (resumable as any MapDataset)."""
    streams, weights = [], []
    for bucket in range(len(source.bucket_table)):
        records = np.flatnonzero(source.record_buckets == bucket)
        if not len(records):
            continue
        stream = _record_batches(task, source, records, cfg,
                                 int(np.random.SeedSequence([seed, bucket]).generate_state(1)[0]))
        if len(stream):  # a finite read (eval) of a bucket smaller than one batch: none
            streams.append(stream)
            weights.append(len(records))
    if not streams:
        raise ValueError(f"no bucket of the {task} shards holds one batch of "
                         f"{cfg.batch_size} records")
    return streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, weights)


def training_dataset(corpora: Mapping[str, Sequence[str]], cfg: PipelineConfig
                     ) -> grain.IterDataset:
    """Batches alternating over `corpora` ({task: shard folders}) in its order, each
    corpus `cfg.task_weights[i]` batches per cycle (a fixed interleaving, not a draw)."""
    if not corpora:
        raise ValueError("no corpora given")
    if cfg.task_weights is not None and len(cfg.task_weights) != len(corpora):
        raise ValueError(f"{len(cfg.task_weights)} task weights for {len(corpora)} corpora")
    unknown = set(corpora) - set(TASK_IDS)
    if unknown:
        raise ValueError(f"unknown tasks {sorted(unknown)}; expected some of {list(TASK_IDS)}")
    streams = [task_batches(task, folders, cfg, cfg.seed + i)
               for i, (task, folders) in enumerate(corpora.items())]
    ds = streams[0] if len(streams) == 1 else grain.MapDataset.mix(streams, cfg.task_weights)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads,
                                              prefetch_buffer_size=cfg.read_threads))
    if cfg.num_workers:
        _allow_unparsed_absl_flags()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=cfg.num_workers, per_worker_buffer_size=cfg.worker_buffer),
            worker_init_fn=_ignore_interrupts)
    return ds


def _ignore_interrupts(worker_index: int, worker_count: int) -> None:
    """Data workers leave Ctrl-C to the trainer: a terminal sends SIGINT to the whole
    process group, and the trainer finishes its step and saves (it needs the workers for
    that, and closes them itself)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def training_iterator(corpora: Mapping[str, Sequence[str]], cfg: PipelineConfig
                      ) -> grain.DatasetIterator:
    """`iter(training_dataset(...))`; call `.close()` when done if it has workers."""
    return iter(training_dataset(corpora, cfg))


def next_batch(iterator, timeout_s: float = 0.0) -> dict:
    """`next(iterator)`, but a `DataError` after `timeout_s` seconds without a batch (0:
    wait forever) or when a worker process died, instead of a hang or a bare traceback.
    On a timeout the worker processes are killed, so that the process can exit."""
    if not timeout_s:
        return _next(iterator)
    result: dict = {}
    done = threading.Event()

    def fetch():
        try:
            result["batch"] = _next(iterator)
        except BaseException as e:  # noqa: BLE001 — re-raised in the caller's thread
            result["error"] = e
        finally:
            done.set()

    threading.Thread(target=fetch, name="unialign-next-batch", daemon=True).start()
    if not done.wait(timeout_s):
        for worker in multiprocessing.active_children():
            worker.kill()
        raise DataError(f"no batch from the data pipeline in {timeout_s:g} s "
                        "(data.worker_timeout_s): a data worker process or the storage is "
                        "stuck; the workers were stopped. Rerun to resume from the last "
                        "checkpoint")
    if "error" in result:
        raise result["error"]
    return result["batch"]


def _next(iterator) -> dict:
    try:
        return next(iterator)
    except RuntimeError as e:
        if "Worker process" not in str(e):
            raise
        raise DataError(f"a data worker process crashed ({str(e).splitlines()[0]}); rerun "
                        "to resume from the last checkpoint") from e


def _allow_unparsed_absl_flags() -> None:
    """Grain's worker processes read absl flags; outside `absl.app` they were never parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
