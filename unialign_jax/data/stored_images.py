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


def decode_stored(data: bytes, fmt: str, resolution: int) -> np.ndarray:
    """Stored bytes back to a (resolution, resolution, 3) uint8 array."""
    if fmt == "raw":
        return np.frombuffer(data, dtype=np.uint8).reshape(resolution, resolution, 3)
    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    if arr.shape != (resolution, resolution, 3):
        raise ValueError(f"stored image has shape {arr.shape}, expected {resolution}² RGB")
    return arr
