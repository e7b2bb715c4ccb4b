"""Computes the cached latents of a shard folder (`data/format/latent_cache.py` holds their
layout and reader).

The release encodes every image in every step and trains on a posterior *sample*. The
posterior's moments (mean and clipped log-variance) are constants of an image and a VAE,
so `unialign-data latents` computes them once; the train step then draws its samples
from them with the very keys it would have used after encoding
(`training.objective.encode_images`): the step on cached moments is the step that encodes.
Written resumably and published whole (`staged_arrays.py`).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
from tqdm import tqdm

from unialign_jax.data.build.staged_arrays import StagedArrays
from unialign_jax.data.format import stored_images
from unialign_jax.data.format.latent_cache import FOLDER, META, STORAGE, to_words
from unialign_jax.data.format.records import decode_record, read_summary, record_files
from unialign_jax.images import to_model_range

DEFAULT_BATCH = 16


class LatentWriter(StagedArrays):
    """The moment arrays, one row per record, filled in order; `finish()` publishes them."""

    def __init__(self, shard_dir: str, summary: dict, identity: dict, shape: tuple,
                 storage: str, vae_path: str | None = None, force: bool = False):
        if storage not in STORAGE:
            raise ValueError(f"storage must be one of {STORAGE}, got {storage!r}")
        records, words = summary["records"], np.uint16 if storage == "bfloat16" else np.float32
        arrays = {"target": ((records, *shape), words)}
        if summary["num_sources"]:
            arrays["sources"] = ((records, summary["num_sources"], *shape), words)
        super().__init__(shard_dir, FOLDER, META, arrays, {
            "vae": identity, "vae_path": vae_path, "resolution": summary["resolution"],
            "num_sources": summary["num_sources"], "records": records,
            "shards": summary["shards"], "shape": list(shape), "storage": storage}, force)

    def append(self, rows: dict[str, np.ndarray]) -> None:
        """Stores the next records' moments ({'target': (n, h, w, 2C), 'sources': (n, K,
        h, w, 2C)}) at records `done`, `done + 1`, ..."""
        super().append({k: to_words(v, self.identity["storage"]) for k, v in rows.items()})

    def finish(self) -> None:
        super().finish(self.identity)


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
