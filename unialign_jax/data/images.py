"""Image decoding, the release's resize + center crop, storage encodings, model range.

Spec section 2: images are RGB in [-1, 1]; resize the short side to the resolution
(bicubic) and center-crop a square. The geometry follows torchvision's
`Resize(int)` + `CenterCrop`, which the PyTorch release uses: the long side becomes
`int(resolution * long / short)` and the crop offset is `round((size - resolution) / 2)`.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from unialign_jax.data.faults import SkipSample

FORMATS = ("png", "jpeg", "raw")
# Leading bytes of common formats: such a file that PIL cannot identify is a cut-off image.
_SIGNATURES = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
JPEG_QUALITY = 95


def decode_rgb(data: bytes, name: str = "image") -> Image.Image:
    """Decodes any image PIL reads into a fully loaded RGB image, or raises `SkipSample`."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # palette-transparency and bomb warnings
            img = Image.open(io.BytesIO(data))
            img.load()
            return img.convert("RGB")
    except Image.DecompressionBombError as e:
        raise SkipSample("image_too_large", f"{name}: {e}") from None
    except UnidentifiedImageError:
        if bytes(data[:12]).startswith(_SIGNATURES) or bytes(data[8:12]) == b"WEBP":
            raise SkipSample("corrupt_image", f"{name}: image header is cut short") from None
        raise SkipSample("not_an_image", f"{name}: not an image PIL can identify") from None
    except Exception as e:  # malformed files make PIL's decoders raise almost anything
        raise SkipSample("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None


def resize_and_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """Bicubic resize of the short side to `resolution`, then a centered square crop."""
    w, h = img.size
    if w <= h:
        size = (resolution, int(resolution * h / w))
    else:
        size = (int(resolution * w / h), resolution)
    img = img.resize(size, Image.BICUBIC)
    left = int(round((size[0] - resolution) / 2.0))
    top = int(round((size[1] - resolution) / 2.0))
    return img.crop((left, top, left + resolution, top + resolution))


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


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] → float32 [-1, 1], the VAE's input range."""
    return pixels.astype(np.float32) * np.float32(2 / 255) - np.float32(1)
