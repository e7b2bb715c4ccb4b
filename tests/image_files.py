"""Image files written from known pixel values, shared by the decoder and real-image tests.

Each builder writes bytes whose pixels the test knows, so the expected RGB can be computed
with numpy on those values, never taken from the decoder's own output.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

BG = (10, 200, 30)  # a non-white background, so compositing is visible


def save(img: Image.Image, fmt: str, **kw) -> bytes:
    """The file bytes of `img` saved by Pillow as `fmt`."""
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def grey3(v: np.ndarray) -> np.ndarray:
    return np.repeat(np.asarray(v)[..., None], 3, axis=-1)


def composite(rgb, alpha, alpha_max, colour_max, bg=BG) -> np.ndarray:
    """alpha * colour + (1 - alpha) * background in float64, colour in source units."""
    rgb = np.asarray(rgb, np.float64)
    a = np.asarray(alpha, np.float64)[..., None] / alpha_max
    bg = np.asarray(bg, np.float64) * colour_max / 255.0
    return np.rint((rgb * a + bg * (1 - a)) * 255.0 / colour_max).astype(np.uint8)


def chunk(kind: bytes, payload: bytes) -> bytes:
    return (struct.pack(">I", len(payload)) + kind + payload
            + struct.pack(">I", zlib.crc32(kind + payload)))


def filter_rows(img: np.ndarray, bpp: int) -> bytes:
    """PNG-filters each row of an (H, W*bpp) byte array, cycling through all 5 filter types."""
    out = []
    prior = np.zeros(img.shape[1], np.int32)
    for y, row in enumerate(img.astype(np.int32)):
        ftype = y % 5
        left = np.concatenate([np.zeros(bpp, np.int32), row[:-bpp]])
        upleft = np.concatenate([np.zeros(bpp, np.int32), prior[:-bpp]])
        if ftype == 0:
            pred = np.zeros_like(row)
        elif ftype == 1:
            pred = left
        elif ftype == 2:
            pred = prior
        elif ftype == 3:
            pred = (left + prior) // 2
        else:
            p = left + prior - upleft
            pa, pb, pc = np.abs(p - left), np.abs(p - prior), np.abs(p - upleft)
            pred = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, prior, upleft))
        out.append(bytes([ftype]) + ((row - pred) % 256).astype(np.uint8).tobytes())
        prior = row
    return b"".join(out)


ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
          (0, 1, 1, 2))


def png(arr: np.ndarray, color_type: int, bit_depth: int = 16, extra: bytes = b"",
        interlace: bool = False) -> bytes:
    """A PNG written by hand (Pillow cannot write 16-bit colour), with all filter types."""
    arr = arr if arr.ndim == 3 else arr[..., None]
    h, w, channels = arr.shape
    dtype = ">u2" if bit_depth == 16 else "u1"
    bpp = channels * bit_depth // 8

    def stream(sub):
        if sub.size == 0:
            return b""
        return filter_rows(np.frombuffer(sub.astype(dtype).tobytes(), np.uint8)
                           .reshape(sub.shape[0], -1), bpp)

    if interlace:
        raw = b"".join(stream(arr[y0::dy, x0::dx]) for x0, y0, dx, dy in ADAM7)
    else:
        raw = stream(arr)
    ihdr = struct.pack(">IIBBBBB", w, h, bit_depth, color_type, 0, 0, int(interlace))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + extra
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def u16(rng: np.random.Generator, shape) -> np.ndarray:
    """Random 16-bit values plus the extremes and near-rounding-boundary values."""
    v = rng.integers(0, 65536, shape).astype(np.uint16)
    flat = v.reshape(-1)
    special = [0, 65535, 128, 129, 257, 257 * 100 + 128, 257 * 100 + 129, 32896]
    flat[:len(special)] = special
    return v


# Non-symmetric 3x2 image with 6 distinct colours (for the orientation tests).
ORIENT = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255]],
                   [[255, 255, 0], [0, 255, 255], [255, 0, 255]]], np.uint8)
# What the viewer shows for each EXIF orientation, written from the EXIF spec's definitions.
UPRIGHT = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored horizontally
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored vertically
    5: lambda a: a.transpose(1, 0, 2),  # transposed (main diagonal)
    6: lambda a: np.rot90(a, k=-1),  # rotate 90 clockwise
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse (anti-diagonal)
    8: lambda a: np.rot90(a, k=1),  # rotate 90 counter-clockwise
}


def exif(orientation: int) -> Image.Exif:
    tags = Image.Exif()
    tags[0x0112] = orientation
    return tags


def cmyk_reference(cmyk: np.ndarray) -> np.ndarray:
    """PIL's naive CMYK -> RGB: (255 - C)(255 - K) / 255, rounded."""
    c, k = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    return np.rint((255 - c) * (255 - k) / 255).astype(np.uint8)


def gif_frames(rng: np.random.Generator, shape=(4, 5)) -> tuple[list, list, list]:
    """Three palette frames of `shape` (H, W), 8 random colours each: (frames, tables, indices)."""
    frames, tables, idxs = [], [], []
    for _ in range(3):
        table = rng.integers(0, 256, (8, 3)).astype(np.uint8)
        idx = rng.integers(0, 8, shape).astype(np.uint8)
        img = Image.fromarray(idx, "P")
        img.putpalette(table.tobytes())
        frames.append(img)
        tables.append(table)
        idxs.append(idx)
    return frames, tables, idxs
