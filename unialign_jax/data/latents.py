"""Cached latents: the VAE posterior moments of every record's images, stored beside a shard
folder, so that training skips the VAE encoder (`data.cached_latents`).

The release encodes every image in every step and trains on a posterior *sample*. The
posterior's moments (mean and clipped log-variance) are constants of an image and a VAE,
so `unialign-data latents` computes them once; the train step then draws its samples
from them with the very keys it would have used after encoding
(`training.objective.encode_images`): the step on cached moments is the step that encodes.

Layout: `SHARDS/latents/target.npy` (records, h, w, 2C) and, for edit and composition,
`sources.npy` (records, K, h, w, 2C): mean then log-variance on the last axis, row i
belonging to record i (`summary.json` order). Rows are stored in the dtype the encoder
computed in — bfloat16 as its raw 16-bit words, float32 otherwise — which is lossless.
`latents.json` names what made them (the VAE folder, a SHA-256 of its files, its compute
and weight dtypes), the resolution and the shard build; a run with another VAE, dtype or
build is refused. Written in `SHARDS/.latents.partial/`, resumable after an interruption,
published by one rename when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Callable

import numpy as np
from tqdm import tqdm

from unialign_jax.data.batch import MOMENT_KEYS
from unialign_jax.data.records import RecordArrays, check_array
from unialign_jax.files import read_json, write_json

FOLDER = "latents"
META = "latents.json"
PROGRESS = "progress.json"
# Stored array → the batch field it fills (`data.batch`).
ARRAYS = dict(zip(("target", "sources"), MOMENT_KEYS))
STORAGE = ("float32", "bfloat16")
DEFAULT_BATCH = 16


def latents_dir(shard_dir: str) -> str:
    return os.path.join(shard_dir, FOLDER)


def has_latents(shard_dir: str) -> bool:
    return os.path.exists(os.path.join(latents_dir(shard_dir), META))


def made_by(shard_dir: str) -> dict | None:
    """The `vae_identity` of a folder's finished cache (None: no cache)."""
    return read_json(os.path.join(latents_dir(shard_dir), META))["vae"] \
        if has_latents(shard_dir) else None


def folder_digest(folder: str) -> str:
    """SHA-256 of a folder's files (relative names and contents, in sorted order): the
    VAE's weights, whatever the folder is called or where it was copied to."""
    digest = hashlib.sha256()
    for root, dirs, names in sorted(os.walk(folder)):
        dirs.sort()
        for name in sorted(names):
            path = os.path.join(root, name)
            digest.update(os.path.relpath(path, folder).encode() + b"\0")
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()


def vae_identity(vae_path: str, dtype: str, param_dtype: str) -> dict:
    """What the moments depend on: the VAE's files, the dtype it computes in and the dtype
    its weights are held in (the trainer's compute.dtype and compute.frozen_param_dtype)."""
    if not os.path.isdir(vae_path):
        raise FileNotFoundError(f"VAE folder not found: {vae_path}")
    return {"weights_sha256": folder_digest(vae_path), "dtype": str(dtype),
            "param_dtype": str(param_dtype)}


def storage_dtype(dtype: str) -> str:
    """The stored dtype of moments computed in `dtype` (lossless either way)."""
    return "bfloat16" if str(dtype) == "bfloat16" else "float32"


def _to_words(rows: np.ndarray, storage: str) -> np.ndarray:
    if storage == "float32":
        return np.asarray(rows, np.float32)
    import ml_dtypes

    narrow = np.asarray(rows, np.float32).astype(ml_dtypes.bfloat16)
    if not np.array_equal(narrow.astype(np.float32), rows):
        raise ValueError("moments computed in bfloat16 are not bfloat16 values: the encoder "
                         "computed in another dtype than the cache records")
    return narrow.view(np.uint16)


def _from_words(words: np.ndarray, storage: str) -> np.ndarray:
    if storage == "float32":
        return np.asarray(words, np.float32)
    import ml_dtypes

    return np.asarray(words).view(ml_dtypes.bfloat16).astype(np.float32)


class LatentWriter:
    """Fills the moment arrays in record order, resumably; `finish()` publishes them."""

    def __init__(self, shard_dir: str, summary: dict, identity: dict, shape: tuple,
                 storage: str, vae_path: str | None = None, force: bool = False):
        if storage not in STORAGE:
            raise ValueError(f"storage must be one of {STORAGE}, got {storage!r}")
        self.records = summary["records"]
        self.final = latents_dir(shard_dir)
        self.staging = os.path.join(shard_dir, f".{FOLDER}.partial")
        if os.path.exists(self.final) and not force:
            raise FileExistsError(f"{self.final} exists; pass --force to recompute it")
        self.meta = {"vae": identity, "vae_path": vae_path,
                     "resolution": summary["resolution"], "num_sources": summary["num_sources"],
                     "records": self.records, "shards": summary["shards"],
                     "shape": list(shape), "storage": storage}
        self.arrays = {"target": (self.records, *shape)}
        if summary["num_sources"]:
            self.arrays["sources"] = (self.records, summary["num_sources"], *shape)
        progress_path = os.path.join(self.staging, PROGRESS)
        progress = None
        if os.path.exists(progress_path) and not force:
            progress = read_json(progress_path)
            if progress["meta"] != self.meta:
                progress = None  # another VAE or another shard build: start over
        if progress is None:
            shutil.rmtree(self.staging, ignore_errors=True)
            os.makedirs(self.staging)
            words = np.uint16 if storage == "bfloat16" else np.float32
            for key, full in self.arrays.items():
                np.lib.format.open_memmap(self._path(key), "w+", words, full).flush()
            progress = {"meta": self.meta, "done": 0}
            write_json(progress_path, progress)
        self.done, self._progress_path = progress["done"], progress_path
        self._open = {k: np.load(self._path(k), mmap_mode="r+") for k in self.arrays}

    def _path(self, key: str) -> str:
        return os.path.join(self.staging, f"{key}.npy")

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """Stores the next records' moments ({'target': (n, h, w, 2C), 'sources': (n, K,
        h, w, 2C)}) at records `done`, `done + 1`, ..."""
        n = len(rows["target"])
        if set(rows) != set(self.arrays) or self.done + n > self.records or any(
                rows[k].shape[1:] != self.arrays[k][1:] or len(rows[k]) != n for k in rows):
            raise ValueError(f"rows {({k: v.shape for k, v in rows.items()})} do not fit "
                             f"arrays {self.arrays} at record {self.done}")
        for key, value in rows.items():
            self._open[key][self.done:self.done + n] = _to_words(value, self.meta["storage"])
            self._open[key].flush()
        self.done += n
        write_json(self._progress_path, {"meta": self.meta, "done": self.done})

    def finish(self) -> None:
        if self.done != self.records:
            raise RuntimeError(f"only {self.done} of {self.records} records' moments were "
                               "written")
        self._open.clear()
        os.remove(self._progress_path)
        write_json(os.path.join(self.staging, META), self.meta)
        shutil.rmtree(self.final, ignore_errors=True)
        os.replace(self.staging, self.final)


class LatentCache(RecordArrays):
    """Read side: the moments of record i as batch fields, memory-mapped lazily (cheap to
    pickle to data workers). Checked when opened — made by `identity`'s VAE, for this very
    shard build, arrays whole — so a stale or cut cache fails at the start of training,
    named, never mid-run."""

    def __init__(self, shard_dir: str, summary: dict, identity: dict):
        self.folder = latents_dir(shard_dir)
        redo = f"recompute it: `unialign-data latents {shard_dir} --vae VAE_FOLDER --force`"
        if not has_latents(shard_dir):
            raise ValueError(f"{shard_dir} has no cached latents ({self.folder}/{META}); "
                             f"compute them with `unialign-data latents {shard_dir} --vae "
                             "VAE_FOLDER`, or set data.cached_latents=False")
        meta = read_json(os.path.join(self.folder, META))
        if meta["shards"] != summary["shards"] or meta["resolution"] != summary["resolution"]:
            raise ValueError(f"{self.folder} was computed for another build of {shard_dir} "
                             f"(resolution {meta['resolution']}, the shards' "
                             f"{summary['resolution']}); {redo}")
        if meta["vae"] != identity:
            what = [k for k in sorted(set(meta["vae"]) | set(identity))
                    if meta["vae"].get(k) != identity.get(k)]
            raise ValueError(
                f"{self.folder} was computed with another VAE than this run's (they differ in "
                f"{', '.join(what)}: cached {({k: meta['vae'].get(k) for k in what})}, run "
                f"{({k: identity.get(k) for k in what})}, from models.vae_path, compute.dtype "
                f"and compute.frozen_param_dtype); {redo}")
        self.storage, self.shape = meta["storage"], tuple(meta["shape"])
        self.keys = ["target"] + (["sources"] if meta["num_sources"] else [])
        for key in self.keys:
            path = os.path.join(self.folder, f"{key}.npy")
            want = (meta["records"], *([meta["num_sources"]] if key == "sources" else []),
                    *self.shape)
            check_array(path, want, "cached latents", redo)

    def row(self, index: int) -> dict:
        return {ARRAYS[k]: _from_words(a, self.storage)
                for k, a in self.arrays_at(index).items()}


# (N, S, S, 3) pixels in [-1, 1] → (N, h, w, 2C) float32 moments (mean, log-variance).
Moments = Callable[[np.ndarray], np.ndarray]


def vae_moments(vae, batch_size: int = DEFAULT_BATCH) -> Moments:
    """The posterior moments of `vae` (a `models.vae.AutoencoderKL`), jitted once for
    batches of `batch_size` (a shorter last batch is padded)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(vae)

    @jax.jit
    def moments(state, pixels):
        return jnp.concatenate(nnx.merge(graphdef, state).posterior(pixels), axis=-1)

    def run(pixels: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(pixels), batch_size):
            part = pixels[start:start + batch_size]
            padded = np.concatenate([part, np.repeat(part[-1:], batch_size - len(part), 0)])
            out.append(np.asarray(moments(state, padded))[:len(part)])
        return np.concatenate(out)

    return run


def precompute(shard_dir: str, moments: Moments, identity: dict, storage: str,
               batch_size: int = DEFAULT_BATCH, vae_path: str | None = None,
               force: bool = False) -> dict:
    """Fills `shard_dir/latents/` with the moments of every record's images (target and
    sources), resumably, `batch_size` records at a time; `identity` (`vae_identity`) and
    `vae_path` (for people) record what made them."""
    import grain

    from unialign_jax.data import stored_images
    from unialign_jax.data.records import decode_record, read_summary, record_files
    from unialign_jax.images import to_model_range

    summary = read_summary(shard_dir)
    if summary.get("bucket_table"):
        raise ValueError(f"{shard_dir} was built with aspect-ratio buckets: cached latents of "
                         "bucketed shards are not supported yet (one array holds one latent "
                         "shape)")
    records = grain.sources.ArrayRecordDataSource(record_files(shard_dir, summary))
    k, size = summary["num_sources"], summary["resolution"]

    def pixels(indices) -> np.ndarray:  # (n, K + 1, S, S, 3): sources, then the target
        return np.stack([np.stack([to_model_range(stored_images.decode_stored(
            blob, summary["image_format"], size)) for blob in decode_record(records[i])[1]])
            for i in indices])

    shape = moments(pixels([0])[:, -1]).shape[1:]
    writer = LatentWriter(shard_dir, summary, identity, shape, storage, vae_path, force)
    with tqdm(total=writer.records, initial=writer.done, unit="record", desc="latents") as bar:
        while writer.done < writer.records:
            batch = pixels(range(writer.done, min(writer.done + batch_size, writer.records)))
            n = len(batch)
            rows = {"target": moments(batch[:, -1])}
            if k:
                flat = moments(batch[:, :k].reshape(n * k, *batch.shape[2:]))
                rows["sources"] = flat.reshape(n, k, *flat.shape[1:])
            writer.append(rows)
            bar.update(n)
    writer.finish()
    return {"records": writer.records, "shape": list(shape), "storage": storage}
