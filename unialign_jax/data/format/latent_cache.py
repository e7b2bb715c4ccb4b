"""Cached latents stored beside a shard folder: the VAE posterior moments of every record's
images, their layout, what made them and their reader (`build/latent_precompute.py`
writes them), so that training skips the VAE encoder (`data.cached_latents`).

Layout: `SHARDS/latents/target.npy` (records, h, w, 2C) and, for edit and composition,
`sources.npy` (records, K, h, w, 2C): mean then log-variance on the last axis, row i
belonging to record i (`summary.json` order). Rows are stored in the dtype the encoder
computed in — bfloat16 as its raw 16-bit words, float32 otherwise — which is lossless.
`latents.json` names what made them (the VAE folder, a SHA-256 of its files, its compute
and weight dtypes), the resolution and the shard build; a run with another VAE, dtype or
build is refused.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np

from unialign_jax.data.format.records import RecordArrays, check_array
from unialign_jax.files import read_json

FOLDER = "latents"
META = "latents.json"
# Stored array → the batch field its rows fill (`data/read/batch_spec.py` takes these).
BATCH_FIELDS = {"target": "target_moments", "sources": "source_moments"}
STORAGE = ("float32", "bfloat16")


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


def to_words(rows: np.ndarray, storage: str) -> np.ndarray:
    """float32 moments → the words stored (bfloat16: their raw 16 bits), exactly."""
    if storage == "float32":
        return np.asarray(rows, np.float32)
    import ml_dtypes

    narrow = np.asarray(rows, np.float32).astype(ml_dtypes.bfloat16)
    if not np.array_equal(narrow.astype(np.float32), rows):
        raise ValueError("moments computed in bfloat16 are not bfloat16 values: the encoder "
                         "computed in another dtype than the cache records")
    return narrow.view(np.uint16)


def from_words(words: np.ndarray, storage: str) -> np.ndarray:
    """Inverse of `to_words`: float32 moments."""
    if storage == "float32":
        return np.asarray(words, np.float32)
    import ml_dtypes

    return np.asarray(words).view(ml_dtypes.bfloat16).astype(np.float32)


class LatentCache(RecordArrays):
    """The moments of record i as batch fields, memory-mapped lazily (cheap to pickle to
    data workers). Checked when opened — made by `identity`'s VAE, for this very shard
    build, arrays whole — so a stale or cut cache fails at the start of training, named,
    never mid-run."""

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
        return {BATCH_FIELDS[k]: from_words(a, self.storage)
                for k, a in self.arrays_at(index).items()}
