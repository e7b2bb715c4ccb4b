"""The on-disk format of a built shard folder, for its builder and its readers alike: the
summary that marks the folder finished and names its record files, and the layout of one
ArrayRecord entry, a JSON header followed by the stored images.

    uint32 little-endian header length | UTF-8 JSON header | image 0 | image 1 | ...

The header holds the texts, the sample's origin (`file:line`) and the byte length of each
image (sources first, target last). Keeping images as raw bytes after the header avoids
base64 or pickle and lets a reader slice them out without copying.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

SUMMARY = "summary.json"  # written last by the builder
KINDS = ("t2i", "edit", "compose")  # a folder's `kind`: what its records hold
BUCKETS = "buckets.npy"  # bucketed builds: each record's bucket index
_LENGTH = struct.Struct("<I")


def encode_record(fields: dict, images: list[bytes]) -> bytes:
    header = json.dumps({**fields, "image_bytes": [len(b) for b in images]},
                        ensure_ascii=False).encode()
    return b"".join([_LENGTH.pack(len(header)), header, *images])


def decode_record(data: bytes) -> tuple[dict, list[memoryview]]:
    """Inverse of `encode_record`: (fields, image byte views)."""
    view = memoryview(data)
    (n,) = _LENGTH.unpack_from(view)
    fields = json.loads(bytes(view[_LENGTH.size:_LENGTH.size + n]))
    images, offset = [], _LENGTH.size + n
    for size in fields.pop("image_bytes"):
        images.append(view[offset:offset + size])
        offset += size
    if offset != len(view):
        raise ValueError(f"corrupt record: {len(view)} bytes, header describes {offset}")
    return fields, images


def read_summary(folder: str) -> dict:
    path = os.path.join(folder, SUMMARY)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{folder} is not a finished shard folder (no {SUMMARY}); "
                                "build it with `unialign-data build`")
    with open(path) as f:
        return json.load(f)


def record_files(folder: str, summary: dict) -> list[str]:
    """The folder's ArrayRecord files that hold records, in record order."""
    return [os.path.join(folder, shard["file"]) for shard in summary["shards"] if shard["records"]]


def check_array(path: str, want: tuple, what: str, redo: str) -> None:
    """Raises a clear error unless the .npy file at `path` (precomputed per-record arrays
    beside the shards: teacher features, latent moments) is whole and of shape `want`."""
    try:
        shape = np.load(path, mmap_mode="r").shape
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} {path} are missing or truncated ({e}); {redo}") from None
    if shape != tuple(want):
        raise ValueError(f"{what} {path} have shape {shape}, expected {tuple(want)}; {redo}")


class RecordArrays:
    """Per-record .npy arrays beside a shard folder (`folder/KEY.npy` for KEY in `keys`),
    memory-mapped on first use in each process: a pickled copy (a data worker) reopens
    them instead of carrying them."""

    folder: str
    keys: tuple[str, ...]
    _arrays: dict | None = None

    def __getstate__(self):
        return {**self.__dict__, "_arrays": None}

    def arrays_at(self, index: int) -> dict:
        """{key: row `index` of that array} (read-only views)."""
        if self._arrays is None:
            self._arrays = {k: np.load(os.path.join(self.folder, f"{k}.npy"), mmap_mode="r")
                            for k in self.keys}
        return {k: self._arrays[k][index] for k in self.keys}
