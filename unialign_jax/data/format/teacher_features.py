"""Teacher features stored beside a shard folder, one row per record: their layout and
their reader (`build/teacher_precompute.py` writes them).

The alignment loss (spec section 4) compares mid-layer projections with Qwen2.5-VL
features of the target image and of its caption, constants per sample, stored as two
float16 `.npy` matrices in `SHARDS/teacher/`, row i belonging to record i of the shard
folder (records in `summary.json` order). The folder is complete only once `teacher.json`
exists.
"""

from __future__ import annotations

import json
import os

import numpy as np

from unialign_jax.data.format.records import RecordArrays, check_array

FOLDER = "teacher"
META = "teacher.json"
KEYS = ("image", "text")
DTYPE = np.float16
# Stored matrix → the batch field its rows fill (`data/read/batch_spec.py` takes these).
BATCH_FIELDS = {key: f"teacher_{key}" for key in KEYS}


def teacher_dir(shard_dir: str) -> str:
    return os.path.join(shard_dir, FOLDER)


def is_precomputed(shard_dir: str) -> bool:
    """Whether the teacher features of `shard_dir` were written to the end."""
    return os.path.exists(os.path.join(teacher_dir(shard_dir), META))


class TeacherFeatures(RecordArrays):
    """Row lookup, memory-mapped lazily so that pickling to workers is cheap. The matrices
    are checked when opened (present, whole, one row per record), so a lost or cut file
    fails at the start of training, named, not in a data worker mid-run."""

    keys = KEYS

    def __init__(self, shard_dir: str, shards: list):
        self.folder = teacher_dir(shard_dir)
        redo = f"rerun `unialign-data teacher --force --shards {shard_dir}`"
        try:
            with open(os.path.join(self.folder, META)) as f:
                meta = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"{self.folder}/{META} is unreadable ({e}); {redo}") from None
        if meta["shards"] != shards:
            raise ValueError(f"{self.folder} was computed for another build of {shard_dir}; "
                             f"{redo}")
        self.dim = int(meta["dim"])
        for key in KEYS:
            path = os.path.join(self.folder, f"{key}.npy")
            check_array(path, (meta["records"], self.dim), "teacher features", redo)

    def row(self, index: int) -> dict:
        return {BATCH_FIELDS[k]: a.astype(np.float32) for k, a in self.arrays_at(index).items()}
