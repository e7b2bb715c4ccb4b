"""Row arrays beside a shard folder, filled in record order, resumably, and published whole:
how the teacher features and the cached latents are both written.

They grow in `SHARDS/.<folder>.partial/`, one memory-mapped `.npy` per array, with
`progress.json` holding the rows done and the identity of what computes them. A rerun with
the same identity goes on at the first row not done; another identity (another model,
another shard build) starts over. `finish` writes the folder's own metadata file and
publishes the folder by one rename, so a reader finds it whole or not at all.
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from unialign_jax.files import read_json, write_json

PROGRESS = "progress.json"


class StagedArrays:
    """`arrays` maps each array's name to its (shape, dtype); the first axis is the record."""

    def __init__(self, shard_dir: str, folder: str, meta_name: str,
                 arrays: dict[str, tuple[tuple, np.dtype]], identity: dict, force: bool = False):
        records = {shape[0] for shape, _ in arrays.values()}
        if len(records) != 1:
            raise ValueError(f"arrays {arrays} disagree on the number of records")
        (self.records,) = records
        self.arrays, self.identity, self.meta_name = arrays, identity, meta_name
        self.final = os.path.join(shard_dir, folder)
        self.staging = os.path.join(shard_dir, f".{folder}.partial")
        if os.path.exists(self.final) and not force:
            raise FileExistsError(f"{self.final} exists; pass --force to recompute it")
        self._progress_path = os.path.join(self.staging, PROGRESS)
        progress = None
        if os.path.exists(self._progress_path) and not force:
            progress = read_json(self._progress_path)
            if progress.get("identity") != identity:
                progress = None  # computed by something else: start over
        if progress is None:
            if os.path.exists(self.staging):
                shutil.rmtree(self.staging)
            os.makedirs(self.staging)
            for key, (shape, dtype) in arrays.items():
                np.lib.format.open_memmap(self._path(key), "w+", dtype, shape).flush()
            progress = {"identity": identity, "done": 0}
            write_json(self._progress_path, progress)
        self.done = progress["done"]
        self._open = {k: np.load(self._path(k), mmap_mode="r+") for k in arrays}

    def _path(self, key: str) -> str:
        return os.path.join(self.staging, f"{key}.npy")

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """Stores the next records' rows (records `done`, `done + 1`, ...) of every array."""
        n = len(next(iter(rows.values())))
        if set(rows) != set(self.arrays) or self.done + n > self.records or any(
                rows[k].shape != (n, *self.arrays[k][0][1:]) for k in rows):
            raise ValueError(f"rows {({k: v.shape for k, v in rows.items()})} do not fit "
                             f"arrays {self.arrays} at record {self.done}")
        for key, value in rows.items():
            self._open[key][self.done:self.done + n] = value
            self._open[key].flush()
        self.done += n
        write_json(self._progress_path, {"identity": self.identity, "done": self.done})

    def finish(self, meta: dict) -> None:
        """Writes `meta` as the folder's metadata file and publishes the folder."""
        if self.done != self.records:
            raise RuntimeError(f"only {self.done} of {self.records} records were written to "
                               f"{self.staging}")
        self._open.clear()
        os.remove(self._progress_path)
        write_json(os.path.join(self.staging, self.meta_name), meta)
        if os.path.exists(self.final):
            shutil.rmtree(self.final)
        os.replace(self.staging, self.final)
