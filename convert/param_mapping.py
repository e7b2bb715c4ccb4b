"""Checked, streaming assembly of a parameter tree from a PyTorch state dict.

A converter lists `TensorMove`s (source key → place in our tree, with the axis permutation
from the torch layout); `assemble` validates every key and shape before reading any data,
then copies the tensors one at a time into preallocated arrays of the output dtype, so the
host holds about one copy of the output plus one source tensor.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any, Callable, Sequence

import jax
import ml_dtypes
import numpy as np
from flax import nnx, traverse_util
from tqdm import tqdm

from unialign_convert.safetensors_io import ConversionError, TensorSource

Path = tuple[Any, ...]

LINEAR = (1, 0)  # torch (out, in) → (in, out)
CONV = (2, 3, 1, 0)  # torch OIHW → HWIO

_OUTPUT_DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}
DTYPE_NAMES = tuple(_OUTPUT_DTYPES)


def output_dtype(name: str) -> np.dtype:
    """The numpy dtype of a stored-parameter dtype name ('float32' or 'bfloat16')."""
    if name not in _OUTPUT_DTYPES:
        raise ConversionError(f"unsupported dtype {name!r}; choose one of {DTYPE_NAMES}")
    return _OUTPUT_DTYPES[name]


@dataclasses.dataclass(frozen=True)
class TensorMove:
    """One source tensor and its destination: `target` path, optionally one `layer` of a
    stacked leaf, after permuting its axes by `perm`."""

    source: str
    target: Path
    perm: tuple[int, ...] | None = None
    layer: int | None = None

    def placed_shape(self, source_shape: tuple[int, ...]) -> tuple[int, ...]:
        return source_shape if self.perm is None else tuple(source_shape[p] for p in self.perm)

    # The way back (export): the same move read in reverse.
    def source_shape(self, placed_shape: tuple[int, ...]) -> tuple[int, ...]:
        return placed_shape if self.perm is None else _unpermute(placed_shape, self.perm)

    def unplace(self, placed: np.ndarray) -> np.ndarray:
        """A tensor in our layout back in the source's (torch) layout."""
        return placed if self.perm is None else placed.transpose(np.argsort(self.perm))


def _listing(items: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f", … ({len(items) - limit} more)" if len(items) > limit else "")


def check_moves(source: TensorSource, moves: Sequence[TensorMove],
                target_shapes: dict[Path, tuple[int, ...]], ignored: Sequence[str] = ()) -> None:
    """Raises one ConversionError listing every missing, unexpected and mis-shaped tensor.

    `ignored` holds glob patterns of source keys that are allowed and dropped.
    """
    used = {m.source for m in moves}
    missing = [m.source for m in moves if m.source not in source]
    unexpected = [k for k in source.keys() if k not in used
                  and not any(fnmatch.fnmatchcase(k, p) for p in ignored)]
    mismatched, filled = [], {path: set() for path in target_shapes}
    for m in moves:
        filled[m.target].add(m.layer)
        if m.source not in source:
            continue
        full = target_shapes[m.target]
        want = full if m.layer is None else full[1:]
        if m.placed_shape(source.shape(m.source)) != want:
            expected = want if m.perm is None else _unpermute(want, m.perm)
            mismatched.append(f"{m.source} {source.shape(m.source)} (expected {expected})")
    sections = {"missing tensors": missing,
                "unexpected tensors (wrong model class or size?)": unexpected,
                "shape mismatches": mismatched}
    problems = [f"{what}: {_listing(keys)}" for what, keys in sections.items() if keys]
    if problems:
        raise ConversionError(f"{len(source.keys())}-tensor checkpoint does not match the "
                              "model of its config.json:\n  " + "\n  ".join(problems))
    for path, layers in filled.items():
        if layers != {None} and layers != set(range(target_shapes[path][0])):
            raise ConversionError(f"no source tensor fills {'/'.join(map(str, path))} entirely")


def _unpermute(shape: tuple[int, ...], perm: tuple[int, ...]) -> tuple[int, ...]:
    out = [0] * len(perm)
    for i, p in enumerate(perm):
        out[p] = shape[i]
    return tuple(out)


def fits(source: TensorSource, move: TensorMove, target_shape: tuple[int, ...]) -> bool:
    """Whether `source` holds the move's tensor with the shape its destination needs."""
    want = target_shape if move.layer is None else target_shape[1:]
    return move.source in source and move.placed_shape(source.shape(move.source)) == want


def assemble(source: TensorSource, moves: Sequence[TensorMove], abstract_params: dict, dtype,
             ignored: Sequence[str] = (), desc: str = "tensors",
             fresh: Callable[[TensorMove, tuple[int, ...]], np.ndarray] | None = None) -> dict:
    """The nested parameter dict shaped like `abstract_params` (ShapeDtypeStruct leaves),
    filled from `source` in `dtype`.

    Strict by default (`check_moves` first). With `fresh`, a move whose tensor is absent or
    mis-shaped in `source` gets `fresh(move, shape)` instead: porting one layout into
    another (SD3 → UniAlignment) keeps what fits and initialises the rest.
    """
    flat = traverse_util.flatten_dict(abstract_params)
    shapes = {path: tuple(leaf.shape) for path, leaf in flat.items()}
    if fresh is None:
        check_moves(source, moves, shapes, ignored)
    out = {path: np.empty(shape, dtype) for path, shape in shapes.items()}
    for m in tqdm(moves, desc=desc, unit="tensor", leave=False):
        full = shapes[m.target]
        if fresh is not None and not fits(source, m, full):
            value = fresh(m, full if m.layer is None else full[1:])
        else:
            value = source.get(m.source)
            if m.perm is not None:
                value = value.transpose(m.perm)
        if m.layer is None:
            out[m.target][...] = value
        else:
            out[m.target][m.layer] = value
        del value
    return traverse_util.unflatten_dict(out)


def param_shapes(abstract_module) -> dict:
    """Nested dict of ShapeDtypeStruct for the `nnx.Param`s of an `nnx.eval_shape`d module."""
    pure = nnx.to_pure_dict(nnx.state(abstract_module, nnx.Param))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), pure)
