"""Random access to built shard folders: one indexable sequence of records per task.

A finished folder is recognised by its `summary.json` (written last by the builder).
Several folders of one kind (e.g. two text-to-image corpora) are concatenated in the
order given; a record's global index is its position in that concatenation, which is
what the shuffle permutes and what the teacher features are looked up by.
"""

from __future__ import annotations

import bisect
import json
import os

import grain

from unialign_jax.data.shards import SUMMARY
from unialign_jax.data.teacher import TeacherFeatures, has_teacher

_SHARED = ("kind", "resolution", "image_format", "num_sources")


def read_summary(folder: str) -> dict:
    path = os.path.join(folder, SUMMARY)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a finished shard folder (no {SUMMARY}); "
                                "build it with `unialign-data build`")
    with open(path) as f:
        return json.load(f)


def record_files(folder: str, summary: dict) -> list[str]:
    """The folder's ArrayRecord files that hold records, in record order."""
    return [os.path.join(folder, shard["file"]) for shard in summary["shards"] if shard["records"]]


class ShardSource:
    """Records of one or more shard folders of the same kind (a grain data source)."""

    def __init__(self, folders: list[str]):
        if not folders:
            raise ValueError("no shard folders given")
        summaries = [read_summary(f) for f in folders]
        for folder, summary in zip(folders[1:], summaries[1:]):
            if any(summary[k] != summaries[0][k] for k in _SHARED):
                raise ValueError(f"{folder} differs from {folders[0]} in one of {_SHARED}")
        self.kind, self.resolution, self.image_format, self.num_sources = (
            summaries[0][k] for k in _SHARED)
        with_teacher = [has_teacher(f) for f in folders]
        if any(with_teacher) and not all(with_teacher):
            raise ValueError("teacher features exist for only some of "
                             f"{folders}: compute them for all or remove them")
        self.teachers = ([TeacherFeatures(f, s["shards"]) for f, s in zip(folders, summaries)]
                         if all(with_teacher) else None)
        self._offsets = [0]
        for s in summaries:
            self._offsets.append(self._offsets[-1] + s["records"])
        if not len(self):
            raise ValueError(f"no records in {folders}")
        self._records = grain.sources.ArrayRecordDataSource(
            [path for f, s in zip(folders, summaries) for path in record_files(f, s)])

    @property
    def has_teacher(self) -> bool:
        return self.teachers is not None

    def __len__(self) -> int:
        return self._offsets[-1]

    def __getitem__(self, index: int) -> dict:
        item = {"index": index, "record": self._records[index]}
        if self.teachers is not None:
            folder = bisect.bisect_right(self._offsets, index) - 1
            item.update(self.teachers[folder].row(index - self._offsets[folder]))
        return item
