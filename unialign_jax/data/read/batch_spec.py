"""The training batch: one specification of its fields, shared by the data pipeline, the
objective, the train step's placement and the memory planner.

Dimensions are named: B rows, S×S pixels (`resolution`), L tokens (`max_length`), K source
images (edit 1, compose 3; no `sources` for text-to-image), D teacher width, h×h latent
positions and M = 2 × latent channels (cached VAE moments: mean, then log-variance).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import numpy as np

from unialign_jax.data.format import latent_cache, teacher_features


@dataclasses.dataclass(frozen=True)
class Field:
    name: str
    dims: tuple[str | int, ...]
    dtype: Any
    doc: str
    required: bool = True      # False: only some batches have it (sources, teacher rows)
    model_input: bool = True   # False: bookkeeping the objective never reads


FIELDS = (
    Field("target", ("B", "S", "S", 3), np.float32, "the image to generate, in [-1, 1]",
          required=False),
    Field("sources", ("B", "K", "S", "S", 3), np.float32,
          "clean condition images (edit, perception, compose)", required=False),
    Field("target_moments", ("B", "h", "h", "M"), np.float32,
          "the target's VAE posterior mean and log-variance (data.cached_latents: replaces "
          "`target`)", required=False),
    Field("source_moments", ("B", "K", "h", "h", "M"), np.float32,
          "each source's VAE posterior moments (data.cached_latents: replaces `sources`)",
          required=False),
    Field("caption_ids", ("B", "L"), np.int32, "T5 ids of the target's caption"),
    Field("instruction_ids", ("B", "L"), np.int32,
          "T5 ids of the prompt / instruction (text-to-image: the caption)"),
    Field("teacher_image", ("B", "D"), np.float32, "alignment teacher's image feature",
          required=False),
    Field("teacher_text", ("B", "D"), np.float32, "alignment teacher's caption feature",
          required=False),
    Field("task", ("B",), np.int32, "task id of the stream (equal within a batch)",
          model_input=False),
    Field("index", ("B",), np.int64, "record index in the task's shard folders",
          model_input=False),
    Field("skipped", ("B",), np.int32, "1 where the row's own record was corrupt and the "
          "next readable one replaced it (data.skip_corrupt)", required=False,
          model_input=False),
)
BY_NAME = {f.name: f for f in FIELDS}
PIXEL_KEYS = ("target", "sources")
# The per-record arrays stored beside the shards fill these fields, under the names their
# readers give them.
TEACHER_KEYS = tuple(teacher_features.BATCH_FIELDS.values())
MOMENT_KEYS = tuple(latent_cache.BATCH_FIELDS.values())


def example(fields: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """One batch row made to the spec: each field in its dtype, of its rank less the batch
    axis; a field the spec does not name is an error, so that no batch leaves the pipeline
    other than described here."""
    out = {}
    for name, value in fields.items():
        if name not in BY_NAME:
            raise KeyError(f"{name!r} is not a batch field (data/read/batch_spec.py)")
        field = BY_NAME[name]
        out[name] = np.asarray(value, field.dtype)
        if out[name].ndim != len(field.dims) - 1:
            raise ValueError(f"batch field {name} {field.dims}: a row of shape "
                             f"{out[name].shape}")
    return out


def model_inputs(batch: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a batch that the objective reads (bookkeeping dropped)."""
    return {f.name: batch[f.name] for f in FIELDS if f.model_input and f.name in batch}


def shapes(*, batch_size: int, resolution: int, max_length: int, num_sources: int = 0,
           teacher_dim: int | None = None, model_only: bool = True,
           latent: tuple[int, int] | None = None
           ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{field: (shape, dtype)} of one batch of this kind (no `sources` when num_sources is
    0, no teacher rows when teacher_dim is None; cached moments in place of pixels when
    `latent` gives their (h, M))."""
    h, m = latent or (None, None)
    sizes = {"B": batch_size, "S": resolution, "L": max_length, "K": num_sources,
             "D": teacher_dim, "h": h, "M": m}
    out = {}
    for f in FIELDS:
        if (not f.model_input and model_only) \
                or (f.name in ("sources", "source_moments") and not num_sources) \
                or (f.name in TEACHER_KEYS and teacher_dim is None) \
                or f.name in (PIXEL_KEYS if latent else MOMENT_KEYS):
            continue
        out[f.name] = (tuple(sizes[d] if isinstance(d, str) else d for d in f.dims),
                       np.dtype(f.dtype))
    return out
