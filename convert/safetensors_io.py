"""Streaming, torch-free reading of safetensors files and diffusers/transformers folders.

Tensors are memory-mapped and copied out one at a time, so converting a model needs about
one copy of the output in host memory, whatever the size of the source. Headers are
validated up front so that a corrupt or truncated file fails before anything is written.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import Iterator

import ml_dtypes
import numpy as np

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
