"""Computes the teacher features stored beside a shard folder (`data/format/teacher_features.py`
holds their layout and reader).

They are computed once — `precompute`, driven by `unialign-data teacher` for Qwen or by the
quickstart for its stand-in `ProjectionTeacher` — resumably, and published whole
(`staged_arrays.py`).

Text pooling: the release tokenises the captions of its local batch *together*, padded to
the longest, and averages the embedding rows over every position, pads included
(`"release"`); `"clean"` averages each caption's own tokens.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
from tqdm import tqdm

from unialign_jax.data.build.staged_arrays import StagedArrays
from unialign_jax.data.format import stored_images
from unialign_jax.data.format.records import decode_record, read_summary, record_files
from unialign_jax.data.format.teacher_features import DTYPE, FOLDER, KEYS, META

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


class TeacherWriter(StagedArrays):
    """The feature matrices, one row per record, filled in order; `finish()` publishes them."""

    def __init__(self, shard_dir: str, shards: list, dim: int, model: str, force: bool = False):
        records = sum(s["records"] for s in shards)
        identity = {"model": model, "dim": dim, "records": records, "shards": shards}
        super().__init__(shard_dir, FOLDER, META, {k: ((records, dim), DTYPE) for k in KEYS},
                         identity, force)

    def append(self, image: np.ndarray, text: np.ndarray) -> None:
        """Stores the next rows (records `done`, `done + 1`, ...)."""
        super().append(dict(zip(KEYS, (image, text))))

    def finish(self) -> None:
        super().finish({**self.identity, "dtype": np.dtype(DTYPE).name})


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
