"""Streaming, torch-free reading and writing of safetensors files and diffusers/transformers
folders.

Tensors are memory-mapped and copied out one at a time, so converting a model needs about
one copy of the output in host memory, whatever the size of the source. Headers are
validated up front so that a corrupt or truncated file fails before anything is written.
Writing (the export) is the mirror image: headers from the declared shapes first, then
each tensor's bytes as it is produced.
"""

from __future__ import annotations

import dataclasses
import json
import mmap
import os
import re
import struct
from typing import Callable, Iterator

import ml_dtypes
import numpy as np

from unialign_jax import files

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
    "BOOL": np.bool_,
}


class ConversionError(ValueError):
    """A source checkpoint that cannot be converted; the message says what and where."""


class SafetensorsFile:
    """One .safetensors file: header parsed and checked, tensors read lazily."""

    def __init__(self, path: str):
        self.path = path
        size = os.path.getsize(path)
        if size < 8:
            raise ConversionError(f"{path}: not a safetensors file ({size} bytes)")
        with open(path, "rb") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise ConversionError(f"{path}: corrupt safetensors header (length {header_len})")
            try:
                header = json.loads(f.read(header_len))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise ConversionError(f"{path}: corrupt safetensors header ({e})") from None
        header.pop("__metadata__", None)
        self._data_start = 8 + header_len
        self._entries = {}
        for key, info in header.items():
            try:
                dtype = _DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise ConversionError(f"{path}: bad header entry for {key!r}") from None
            if end - begin != int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize:
                raise ConversionError(f"{path}: size of {key!r} does not match its shape {shape}")
            if self._data_start + end > size:
                raise ConversionError(
                    f"{path}: truncated — {key!r} ends at byte {self._data_start + end}, "
                    f"file has {size}")
            self._entries[key] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key][1]

    def get(self, key: str) -> np.ndarray:
        """A fresh in-memory copy of one tensor (the file is not kept open)."""
        dtype, shape, begin, end = self._entries[key]
        if end == begin:
            return np.zeros(shape, dtype)
        with open(self.path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            count = (end - begin) // np.dtype(dtype).itemsize
            return np.frombuffer(mm, dtype, count, self._data_start + begin).reshape(shape).copy()


class TensorSource:
    """All tensors of a model folder (single file or sharded with an index json)."""

    def __init__(self, files: list[SafetensorsFile]):
        self._where: dict[str, SafetensorsFile] = {}
        for f in files:
            for k in f.keys():
                self._where[k] = f

    @classmethod
    def from_folder(cls, folder: str, weights_name: str) -> "TensorSource":
        """Opens `<weights_name>.safetensors` or its sharded form with `.safetensors.index.json`."""
        single = os.path.join(folder, f"{weights_name}.safetensors")
        index = os.path.join(folder, f"{weights_name}.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ConversionError(f"{index}: unreadable shard index ({e})") from None
            names = sorted(set(weight_map.values()))
            missing = [n for n in names if not os.path.exists(os.path.join(folder, n))]
            if missing:
                raise ConversionError(f"{folder}: shards listed in the index are missing: {missing}")
            return cls([SafetensorsFile(os.path.join(folder, n)) for n in names])
        if os.path.exists(single):
            return cls([SafetensorsFile(single)])
        found = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
        if len(found) == 1:
            return cls([SafetensorsFile(os.path.join(folder, found[0]))])
        raise ConversionError(
            f"{folder}: no {weights_name}.safetensors (or its .index.json) found; "
            f"safetensors files present: {found or 'none'}")

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._where[key].shape(key)

    def get(self, key: str) -> np.ndarray:
        return self._where[key].get(key)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        for k in self._where:
            yield k, self.get(k)


def read_config(folder: str) -> dict:
    """The folder's config.json, with a clear error when absent or unreadable."""
    path = os.path.join(folder, "config.json")
    if not os.path.exists(path):
        raise ConversionError(f"{folder}: no config.json — not a diffusers/transformers model folder")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


# -- writing ------------------------------------------------------------------------------
_DTYPE_NAMES = {np.dtype(v): k for k, v in _DTYPES.items()}
_HEADER_ALIGN = 8


@dataclasses.dataclass(frozen=True)
class TensorOut:
    """One tensor to write: its key, shape and dtype up front (the headers need them) and
    `value()`, called once when its bytes are written."""

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    value: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize


_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]I?B|B)?\s*", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'10GB', '500MB', '2GiB', '1000' → bytes (decimal units as diffusers; 'i': binary)."""
    match = _SIZE.fullmatch(str(text))
    if not match:
        raise ConversionError(f"not a size: {text!r} (e.g. 10GB, 500MB)")
    return int(float(match.group(1)) * _UNITS[(match.group(2) or "B").upper()])


def shard_plan(tensors: list[TensorOut], max_shard_bytes: int) -> list[list[TensorOut]]:
    """Tensors in their order, cut into shards of at most `max_shard_bytes` (a larger
    tensor gets a shard of its own)."""
    shards, size = [[]], 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def write_safetensors(path: str, tensors: list[TensorOut]) -> None:
    """One .safetensors file written tensor by tensor: only one tensor's bytes are in
    memory besides what the caller holds."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for t in tensors:
        header[t.key] = {"dtype": _DTYPE_NAMES[np.dtype(t.dtype)], "shape": list(t.shape),
                         "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % _HEADER_ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for t in tensors:
            value = np.ascontiguousarray(t.value(), dtype=t.dtype)
            if value.shape != tuple(t.shape):
                raise ConversionError(f"{t.key}: produced shape {value.shape}, declared "
                                      f"{t.shape}")
            f.write(memoryview(value.reshape(-1).view(np.uint8)))
            del value


def write_weights(folder: str, weights_name: str, tensors: list[TensorOut],
                  max_shard_bytes: int) -> list[str]:
    """`<weights_name>.safetensors`, or shards `<weights_name>-0000i-of-0000n.safetensors`
    with the `.safetensors.index.json` that diffusers / transformers read; returns the
    file names."""
    shards = shard_plan(tensors, max_shard_bytes)
    if len(shards) == 1:
        names = [f"{weights_name}.safetensors"]
    else:
        names = [f"{weights_name}-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                 for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_safetensors(os.path.join(folder, name), shard)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors)},
                 "weight_map": {t.key: name for name, shard in zip(names, shards)
                                for t in shard}}
        files.write_json(os.path.join(folder, f"{weights_name}.safetensors.index.json"),
                         index)
    return names
