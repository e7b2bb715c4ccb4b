"""Computes the teacher features stored beside a shard folder (`data/format/teacher_features.py`
holds their layout and reader).

They are computed once — `precompute`, driven by `unialign-data teacher` for Qwen or by the
quickstart for its stand-in `ProjectionTeacher` — in `SHARDS/.teacher.partial/`, from
which an interrupted run resumes, and published by one rename when complete.

Text pooling: the release tokenises the captions of its local batch *together*, padded to
the longest, and averages the embedding rows over every position, pads included
(`"release"`); `"clean"` averages each caption's own tokens.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Protocol, Sequence

import numpy as np
from tqdm import tqdm

from unialign_jax.data.format import stored_images
from unialign_jax.data.format.records import decode_record, read_summary, record_files
from unialign_jax.data.format.teacher_features import DTYPE, FOLDER, KEYS, META, teacher_dir
from unialign_jax.files import write_json

PROGRESS = "progress.json"
POOLINGS = ("release", "clean")
# The release's local batch per GPU (384 / 8): how many captions it pads together.
RELEASE_TEXT_BATCH = 48


class Teacher(Protocol):
    name: str
    dim: int

    def image_features(self, pixels: list[np.ndarray]) -> np.ndarray: ...   # uint8 HWC → (N, D)

    def text_features(self, texts: list[str]) -> np.ndarray: ...            # → (N, D)


def pool_text(rows: Sequence[np.ndarray], pad_row: np.ndarray, pooling: str) -> np.ndarray:
    """(N, D) text features from each text's (length, D) embedding rows: the mean of its own
    rows ("clean"), or of its rows padded with `pad_row` to the longest text ("release")."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling == "clean":
        return np.stack([r.mean(0) for r in rows])
    longest = max(len(r) for r in rows)
    return np.stack([(r.sum(0) + (longest - len(r)) * pad_row) / longest for r in rows])


class ProjectionTeacher:
    """A frozen stand-in for Qwen2.5-VL in toy runs (the quickstart): the image feature is a
    fixed random projection of the 4×4-pooled pixels, the text feature pools fixed random
    embedding rows of the caption's tokens. Deterministic from `seed`; no model to load."""

    def __init__(self, dim: int, tokenizer, *, seed: int = 0, pooling: str = "release"):
        rng = np.random.default_rng(seed)
        self.name, self.dim, self.tokenizer, self.pooling = "projection", dim, tokenizer, pooling
        self.image_matrix = rng.standard_normal((48, dim)).astype(np.float32) / np.sqrt(48)
        self.table = rng.standard_normal((len(tokenizer), dim)).astype(np.float32)

    def image_features(self, pixels: list[np.ndarray]) -> np.ndarray:
        pooled = [p.astype(np.float32).reshape(4, p.shape[0] // 4, 4, p.shape[1] // 4, 3)
                  .mean((1, 3)).reshape(-1) / 127.5 - 1.0 for p in pixels]
        return np.tanh(np.stack(pooled) @ self.image_matrix)

    def text_features(self, texts: list[str]) -> np.ndarray:
        rows = [self.table[self.tokenizer(t)["input_ids"]] for t in texts]
        return pool_text(rows, self.table[self.tokenizer.pad_token_id], self.pooling)


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


def precompute(shard_dir: str, teacher: Teacher, batch_size: int = RELEASE_TEXT_BATCH,
               force: bool = False) -> dict:
    """Fills `shard_dir/teacher/` with `teacher`'s features of every record, resumably, in
    batches of `batch_size` consecutive records (the captions a "release"-pooling teacher
    pads together)."""
    import grain

    summary = read_summary(shard_dir)
    writer = TeacherWriter(shard_dir, summary["shards"], teacher.dim, teacher.name, force)
    records = grain.sources.ArrayRecordDataSource(record_files(shard_dir, summary))
    with tqdm(total=writer.records, initial=writer.done, unit="record", desc="teacher") as bar:
        while writer.done < writer.records:
            batch = range(writer.done, min(writer.done + batch_size, writer.records))
            targets, captions = [], []
            for i in batch:
                fields, blobs = decode_record(records[i])
                targets.append(stored_images.decode_stored(
                    blobs[-1], summary["image_format"],
                    fields.get("size", summary["resolution"])))  # (width, height) if bucketed
                captions.append(fields["caption"])
            writer.append(teacher.image_features(targets), teacher.text_features(captions))
            bar.update(len(batch))
    writer.finish()
    return {"records": writer.records, "dim": teacher.dim, "model": teacher.name}
