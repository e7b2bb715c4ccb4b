"""Random access to built shard folders: one indexable sequence of records per task.

A finished folder is recognised by its `summary.json` (written last by the builder).
Several folders of one kind (e.g. two text-to-image corpora) are concatenated in the
order given; a record's global index is its position in that concatenation, which is
what the shuffle permutes and what the teacher features are looked up by.

Shards can be damaged after their build (a cut copy, flipped bits, a lost file).
ArrayRecord's chunk hashes turn such damage into read errors; every error here names the
shard file and the record (`CorruptRecord`). A shard that cannot even be opened fails
when the source is created — or, with `skip_corrupt`, all its records read as corrupt,
for the pipeline to skip.
"""

from __future__ import annotations

import bisect
import logging
import os

import grain
import numpy as np

from unialign_jax.data.format.latent_cache import LatentCache
from unialign_jax.data.format.records import BUCKETS, read_summary
from unialign_jax.data.format.teacher_features import TeacherFeatures, is_precomputed

log = logging.getLogger(__name__)

_SHARED = ("kind", "resolution", "image_format", "num_sources", "bucket_table")
REBUILD = ("rebuild the folder with `unialign-data build --force`, or set "
           "data.skip_corrupt=True to skip and count its unreadable records")


class CorruptRecord(ValueError):
    """A record (or a whole shard) that cannot be read or decoded."""


def open_shard(path: str, records: int):
    """A reader of one ArrayRecord file, checked to hold `records` records."""
    if not os.path.exists(path):
        raise CorruptRecord(f"shard {path} is missing ({records} records); {REBUILD}")
    try:
        reader = grain.sources.ArrayRecordDataSource([path])
    except RuntimeError as e:
        raise CorruptRecord(f"shard {path} is truncated or corrupt ({_first_line(e)}); "
                            f"{REBUILD}") from None
    if len(reader) != records:
        raise CorruptRecord(f"shard {path} holds {len(reader)} records, its summary.json "
                            f"says {records}; {REBUILD}")
    return reader


class ShardSource:
    """Records of one or more shard folders of the same kind (a grain data source); with
    `latents` (a `format.latent_cache.vae_identity`), each record's cached VAE moments too."""

    def __init__(self, folders: list[str], *, skip_corrupt: bool = False,
                 latents: dict | None = None):
        if not folders:
            raise ValueError("no shard folders given")
        summaries = [read_summary(f) for f in folders]
        for folder, summary in zip(folders[1:], summaries[1:]):
            if any(summary.get(k) != summaries[0].get(k) for k in _SHARED):
                raise ValueError(f"{folder} differs from {folders[0]} in one of {_SHARED}")
        self.kind, self.resolution, self.image_format, self.num_sources, table = (
            summaries[0].get(k) for k in _SHARED)
        # Bucketed builds: (width, height) sizes, and each record's index among them.
        self.bucket_table = None if table is None else [tuple(size) for size in table]
        self.record_buckets = None if table is None else np.concatenate(
            [_record_buckets(f, s) for f, s in zip(folders, summaries)])
        with_teacher = [is_precomputed(f) for f in folders]
        if any(with_teacher) and not all(with_teacher):
            raise ValueError("teacher features exist for only some of "
                             f"{folders}: compute them for all or remove them")
        self.teachers = ([TeacherFeatures(f, s["shards"]) for f, s in zip(folders, summaries)]
                         if all(with_teacher) else None)
        self.latents = (None if latents is None else
                        [LatentCache(f, s, latents) for f, s in zip(folders, summaries)])
        self._offsets = [0]
        for s in summaries:
            self._offsets.append(self._offsets[-1] + s["records"])
        if not len(self):
            raise ValueError(f"no records in {folders}")
        self._files, self._readers, self._starts = [], [], [0]
        for folder, summary in zip(folders, summaries):
            for shard in summary["shards"]:
                if shard["records"]:
                    path = os.path.join(folder, shard["file"])
                    self._files.append(path)
                    self._readers.append(self._open(path, shard["records"], skip_corrupt))
                    self._starts.append(self._starts[-1] + shard["records"])

    @staticmethod
    def _open(path: str, records: int, skip_corrupt: bool):
        try:
            return open_shard(path, records)
        except CorruptRecord as e:
            if not skip_corrupt:
                raise
            log.warning("%s: all its records will be skipped", e)
            return str(e)

    @property
    def has_teacher(self) -> bool:
        return self.teachers is not None

    def __len__(self) -> int:
        return self._offsets[-1]

    def where(self, index: int) -> str:
        """'record R of shard FILE (index I)': where record `index` is stored."""
        shard = bisect.bisect_right(self._starts, index) - 1
        return (f"record {index - self._starts[shard]} of shard {self._files[shard]} "
                f"(index {index})")

    def __getitem__(self, index: int) -> dict:
        """{'index', 'record' (bytes), teacher rows, cached moments}; `CorruptRecord` names
        what failed."""
        shard = bisect.bisect_right(self._starts, index) - 1
        reader = self._readers[shard]
        if isinstance(reader, str):  # the shard could not be opened (skip_corrupt)
            raise CorruptRecord(f"{self.where(index)} is unreadable: {reader}")
        try:
            item = {"index": index, "record": reader[index - self._starts[shard]]}
        except RuntimeError as e:
            raise CorruptRecord(f"{self.where(index)} is unreadable ({_first_line(e)}); "
                                f"{REBUILD}") from None
        folder = bisect.bisect_right(self._offsets, index) - 1
        for rows in (self.teachers, self.latents):
            if rows is not None:
                item.update(rows[folder].row(index - self._offsets[folder]))
        return item


def _record_buckets(folder: str, summary: dict) -> np.ndarray:
    """The bucket index of each record of a bucketed build, checked whole."""
    path = os.path.join(folder, BUCKETS)
    try:
        buckets = np.load(path)
    except (OSError, ValueError) as e:
        raise CorruptRecord(f"{path} is missing or unreadable ({e}); {REBUILD}") from None
    if buckets.shape != (summary["records"],) or (
            len(buckets) and buckets.max() >= len(summary["bucket_table"])):
        raise CorruptRecord(f"{path} does not hold one bucket of the table per record "
                            f"({summary['records']}); {REBUILD}")
    return buckets


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
