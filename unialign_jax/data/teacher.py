"""Teacher features stored next to a shard folder, one row per record.

The alignment loss (spec section 4) compares mid-layer projections with Qwen2.5-VL
features of the target image and of its caption. Both are constants per sample, so they
are computed once (`scripts/precompute_teacher.py`) and stored as two float16 `.npy`
matrices in `SHARDS/teacher/`, row i belonging to record i of the shard folder (records
in `summary.json` order). The folder is complete only once `teacher.json` exists; until
then it is `SHARDS/.teacher.partial/`, from which an interrupted run resumes.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from unialign_jax.checkpoints.io import write_json

FOLDER = "teacher"
META = "teacher.json"
PROGRESS = "progress.json"
KEYS = ("image", "text")
DTYPE = np.float16


def teacher_dir(shard_dir: str) -> str:
    return os.path.join(shard_dir, FOLDER)


class TeacherWriter:
    """Fills the feature matrices in order, resumably; `finish()` publishes them."""

    def __init__(self, shard_dir: str, shards: list, dim: int, model: str, force: bool = False):
        self.records = sum(s["records"] for s in shards)
        self.final = teacher_dir(shard_dir)
        self.staging = os.path.join(shard_dir, f".{FOLDER}.partial")
        if os.path.exists(self.final) and not force:
            raise FileExistsError(f"{self.final} exists; pass --force to recompute it")
        identity = {"model": model, "dim": dim, "records": self.records, "shards": shards}
        progress_path = os.path.join(self.staging, PROGRESS)
        progress = None
        if os.path.exists(progress_path) and not force:
            with open(progress_path) as f:
                progress = json.load(f)
            if progress["identity"] != identity:
                progress = None  # another model or another shard build: start over
        if progress is None:
            shutil.rmtree(self.staging, ignore_errors=True)
            os.makedirs(self.staging)
            for key in KEYS:
                np.lib.format.open_memmap(self._path(key), "w+", DTYPE, (self.records, dim)).flush()
            progress = {"identity": identity, "done": 0}
            write_json(progress_path, progress)
        self.identity, self.done = identity, progress["done"]
        self._progress_path = progress_path
        self._arrays = {k: np.load(self._path(k), mmap_mode="r+") for k in KEYS}

    def _path(self, key: str) -> str:
        return os.path.join(self.staging, f"{key}.npy")

    def append(self, image: np.ndarray, text: np.ndarray) -> None:
        """Stores the next rows (records `done`, `done + 1`, ...)."""
        n = len(image)
        if len(text) != n or self.done + n > self.records:
            raise ValueError(f"{n} image / {len(text)} text rows at {self.done} of {self.records}")
        for key, rows in zip(KEYS, (image, text)):
            self._arrays[key][self.done:self.done + n] = rows
            self._arrays[key].flush()
        self.done += n
        write_json(self._progress_path, {"identity": self.identity, "done": self.done})

    def finish(self) -> None:
        if self.done != self.records:
            raise RuntimeError(f"only {self.done} of {self.records} teacher rows were written")
        self._arrays.clear()
        os.remove(self._progress_path)
        write_json(os.path.join(self.staging, META), {**self.identity, "dtype": "float16"})
        shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.staging, self.final)


class TeacherFeatures:
    """Read side: row lookup, memory-mapped lazily so that pickling to workers is cheap."""

    def __init__(self, shard_dir: str, shards: list):
        self.folder = teacher_dir(shard_dir)
        with open(os.path.join(self.folder, META)) as f:
            meta = json.load(f)
        if meta["shards"] != shards:
            raise ValueError(f"{self.folder} was computed for another build of {shard_dir}; "
                             "rerun scripts/precompute_teacher.py --force")
        self.dim = int(meta["dim"])
        self._arrays = None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def row(self, index: int) -> dict:
        if self._arrays is None:
            self._arrays = {k: np.load(os.path.join(self.folder, f"{k}.npy"), mmap_mode="r")
                            for k in KEYS}
        return {f"teacher_{k}": self._arrays[k][index].astype(np.float32) for k in KEYS}


def has_teacher(shard_dir: str) -> bool:
    return os.path.exists(os.path.join(teacher_dir(shard_dir), META))
