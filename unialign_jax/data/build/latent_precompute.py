"""Computes the cached latents of a shard folder (`data/format/latent_cache.py` holds their
layout and reader).

The release encodes every image in every step and trains on a posterior *sample*. The
posterior's moments (mean and clipped log-variance) are constants of an image and a VAE,
so `unialign-data latents` computes them once; the train step then draws its samples
from them with the very keys it would have used after encoding
(`training.objective.encode_images`): the step on cached moments is the step that encodes.
Written in `SHARDS/.latents.partial/`, resumable after an interruption, published by one
rename when complete.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable

import numpy as np
from tqdm import tqdm

from unialign_jax.data.format import stored_images
from unialign_jax.data.format.latent_cache import FOLDER, META, STORAGE, latents_dir, to_words
from unialign_jax.data.format.records import decode_record, read_summary, record_files
from unialign_jax.files import read_json, write_json
from unialign_jax.images import to_model_range

PROGRESS = "progress.json"
DEFAULT_BATCH = 16


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
            self._open[key][self.done:self.done + n] = to_words(value, self.meta["storage"])
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
