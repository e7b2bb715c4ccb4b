"""How shards store images: PNG (lossless), JPEG or raw uint8, and back to pixels.

Decoding source files and the release's resize + centre crop are `unialign_jax.images`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

FORMATS = ("png", "jpeg", "raw")
JPEG_QUALITY = 95


def encode(img: Image.Image, fmt: str) -> bytes:
    """Storage bytes: PNG (lossless), JPEG (quality 95, smallest) or raw uint8 HWC."""
    if fmt == "raw":
        return np.asarray(img, dtype=np.uint8).tobytes()
    if fmt not in FORMATS:
        raise ValueError(f"unknown image format {fmt!r}; expected one of {FORMATS}")
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG", compress_level=1)
    else:
        img.save(buf, format="JPEG", quality=JPEG_QUALITY)
    return buf.getvalue()


def decode_stored(data: bytes, fmt: str, size: int | tuple[int, int]) -> np.ndarray:
    """Stored bytes back to a (height, width, 3) uint8 array; `size` is the side of a
    square image or the (width, height) of a bucketed one (its record's "size")."""
    width, height = (size, size) if isinstance(size, int) else size
    if fmt == "raw":
        return np.frombuffer(data, dtype=np.uint8).reshape(height, width, 3)
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if arr.shape != (height, width, 3):
        raise ValueError(f"stored image has shape {arr.shape}, expected {width}x{height} RGB")
    return arr
