"""One image decoder for every image the project reads: bytes or a PIL image -> loaded RGB.

Why not `Image.open(...).convert("RGB")`: PIL's mode conversion clips 16-bit and float pixels
instead of scaling them (a 16-bit grey PNG turns white), drops alpha (the colour hidden under
transparent pixels shows), ignores the EXIF orientation phone cameras write (portraits lie on
their side), and mixes up truncated files with non-images. The data builder, the pipeline
inputs and the sampling CLI all go through `decode_image` / `to_rgb` so they agree.

Ground floor: imports only the standard library, numpy and PIL.

Scaling rules (documented choices, tested in tests/test_images_decode.py):
* 16-bit ("I;16*", 16-bit PNG RGB/RGBA/LA): round(v / 257), exact for data widened from 8 bits.
* "I" (32-bit int; Pillow's container for 16-bit PGM/PPM and int TIFFs): negatives -> 0, then
  v * 255 / max(65535, image max) - i.e. 16-bit range unless the data exceed it.
* "F" (32-bit float, e.g. float TIFFs): taken as [0, 1]: round(clip(v, 0, 1) * 255), NaN -> 0.
* Transparency: alpha * colour + (1 - alpha) * background, rounded, in the source bit depth.
* Colour management: ICC profiles are ignored (pixels are taken as sRGB, as the release does);
  CMYK uses PIL's naive (255-C)(255-K)/255, LAB goes through littlecms.
"""

from __future__ import annotations

import dataclasses
import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

REASONS = {
    "empty_image": "the image file or download has zero bytes",
    "not_an_image": "the bytes are in no image format PIL knows",
    "corrupt_image": "the image is truncated, corrupt, or in a pixel mode with no RGB meaning",
    "image_too_large": "the image has more pixels than the decompression-bomb limit",
    "image_too_small": "the image's short side is below the minimum",
    "bad_aspect_ratio": "the image's long side / short side is above the maximum",
}

# Leading bytes of formats PIL reads: such a file that PIL cannot identify is cut short.
_SIGNATURES = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM",
               b"II*\x00", b"MM\x00*")
# EXIF orientation -> the transpose that shows the image upright (as ImageOps.exif_transpose).
_ORIENTATION = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90}
_UNDO_ORIENTATION = {**_ORIENTATION, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
_EXIF_ORIENTATION_TAG = 0x0112
# Pillow decodes 16-bit colour PNGs to 8 bits by keeping the high byte (floor(v / 256)). The
# same stream decoded with these raw modes yields the low bytes ("LA;16B": both bytes), so
# the 16-bit values can be rebuilt and rounded like 16-bit grey.
_PNG16_LOW_RAWMODE = {"RGB;16B": "RGB;16L", "RGBA;16B": "RGBA;16L", "LA;16B": "RGBA"}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageError(ValueError):
    """An image that cannot be used; `reason` is a key of `REASONS`, `detail` says which/why."""

    REASONS = REASONS

    def __init__(self, reason: str, detail: str):
        if reason not in self.REASONS:
            raise ValueError(f"unknown {type(self).__name__} reason {reason!r}")
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    def __reduce__(self):  # survives pickling across worker processes
        return type(self), (self.reason, self.detail)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """exif_orientation=False keeps the stored orientation (fidelity runs against the release).

    max_pixels defaults to PIL's own limit (Image.MAX_IMAGE_PIXELS, 89_478_485 = 1 GiB of
    24-bit pixels / 3). PIL refuses on its own at open beyond 2x its global limit, so a higher
    max_pixels also needs a higher Image.MAX_IMAGE_PIXELS.
    """

    exif_orientation: bool = True
    background: tuple[int, int, int] = (255, 255, 255)
    max_pixels: int = 89_478_485

    def __post_init__(self):
        bg = tuple(self.background)
        if len(bg) != 3 or not all(isinstance(c, int) and 0 <= c <= 255 for c in bg):
            raise ValueError(f"background must be three ints in 0..255, got {self.background!r}")
        object.__setattr__(self, "background", bg)
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")


@dataclasses.dataclass(frozen=True)
class Decoded:
    image: Image.Image  # mode "RGB", fully loaded, no metadata (so decoding again is a no-op)
    notes: tuple[str, ...]  # what was done, e.g. ("scaled_16bit", "exif_transposed")


def decode_image(data: bytes, name: str = "image",
                 options: DecodeOptions = DecodeOptions()) -> Decoded:
    """Decodes file bytes to RGB (rules in the module docstring), or raises `ImageError`."""
    data = bytes(data)
    if not data:
        raise ImageError("empty_image", f"{name}: zero bytes")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bomb, palette and EXIF warnings: handled here
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:
            raise ImageError("image_too_large", f"{name}: {e}") from None
        except UnidentifiedImageError:
            if data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP"):
                raise ImageError("corrupt_image",
                                 f"{name}: image header PIL cannot read (cut short?)") from None
            raise ImageError("not_an_image",
                             f"{name}: not an image PIL can identify (starts {data[:16]!r})"
                             ) from None
        except Exception as e:  # malformed headers make PIL raise almost anything
            raise ImageError("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None
        return _convert(img, name, options, data)


def to_rgb(img: Image.Image, options: DecodeOptions = DecodeOptions(),
           name: str = "image") -> Decoded:
    """The same conversion for an already-open PIL image (pipeline inputs given as PIL objects).

    An animated image is seeked to its first frame. A 16-bit colour PNG is exact only while
    it is not yet loaded (its file can be read again); once loaded, PIL has kept only the high
    bytes, floor(v / 256), which cannot be told apart from an 8-bit PNG.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _convert(img, name, options, None)


def check_size(size: tuple[int, int], *, min_side: int, max_aspect: float,
               name: str = "image") -> None:
    """Refuses an image whose short side < min_side or long/short > max_aspect (both bounds
    are allowed). Pure: the builder calls it on `Decoded.image.size` (upright size)."""
    w, h = size
    short, long = min(w, h), max(w, h)
    if short < max(min_side, 1):
        raise ImageError("image_too_small",
                         f"{name}: {w}x{h} has a short side of {short} px, below {min_side}")
    if long / short > max_aspect:
        raise ImageError("bad_aspect_ratio", f"{name}: {w}x{h} has aspect ratio "
                         f"{long / short:.4g}, above the maximum {max_aspect:g}")


# -- geometry of model inputs ------------------------------------------------------------
# VAE downsampling (8) × transformer patch (2): image sides fed to the model are multiples.
SIZE_MULTIPLE = 16
RESIZE_MODES = ("crop", "pad", "fit")
# Aspect ratios (width / height) that non-square inputs are snapped to, so that a batch run
# compiles one sampler per bucket rather than one per input size.
ASPECT_BUCKETS = (1 / 2, 9 / 16, 2 / 3, 3 / 4, 1.0, 4 / 3, 3 / 2, 16 / 9, 2.0)


def resize_and_center_crop(img: Image.Image, resolution: int) -> Image.Image:
    """The release's (torchvision) `Resize(resolution)` + `CenterCrop(resolution)`: bicubic
    resize of the short side (the long side becomes int(resolution · long / short)), then
    a square crop at offset round((size − resolution) / 2)."""
    w, h = img.size
    size = (resolution, int(resolution * h / w)) if w <= h else (int(resolution * w / h),
                                                                 resolution)
    img = img.resize(size, Image.BICUBIC)
    left = int(round((size[0] - resolution) / 2.0))
    top = int(round((size[1] - resolution) / 2.0))
    return img.crop((left, top, left + resolution, top + resolution))


def bucket_size(size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """(width, height) for an input of `size`: the `ASPECT_BUCKETS` ratio nearest to its own
    (in log scale), sides multiples of 16, about resolution² pixels."""
    w, h = size
    ratio = min(ASPECT_BUCKETS, key=lambda r: abs(np.log(r) - np.log(w / h)))
    width = max(SIZE_MULTIPLE, int(round(resolution * np.sqrt(ratio) / SIZE_MULTIPLE))
                * SIZE_MULTIPLE)
    height = max(SIZE_MULTIPLE, int(round(resolution / np.sqrt(ratio) / SIZE_MULTIPLE))
                 * SIZE_MULTIPLE)
    return width, height


def bucket_table(resolution: int) -> tuple[tuple[int, int], ...]:
    """The distinct `bucket_size`s at `resolution`, (width, height) in `ASPECT_BUCKETS`
    order: every size a bucketed shard build (`unialign-data build --buckets`) stores."""
    sizes = [bucket_size((r, 1.0), resolution) for r in ASPECT_BUCKETS]
    return tuple(dict.fromkeys(sizes))


def resize_and_center_crop_to(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """The release's resize + centre crop to a (width, height) rectangle: bicubic resize to
    cover it (the side that fits keeps the target length, the other is truncated as
    torchvision's `Resize` does), then a crop at the rounded centre offsets. At a bucket's
    size the crop removes at most what the bucket's rounding differs from the image."""
    width, height = size
    w, h = img.size
    scale = max(width / w, height / h)
    covered = (max(width, int(w * scale)), max(height, int(h * scale)))
    img = img.resize(covered, Image.BICUBIC)
    left = int(round((covered[0] - width) / 2.0))
    top = int(round((covered[1] - height) / 2.0))
    return img.crop((left, top, left + width, top + height))


def fit_image(img: Image.Image, size: tuple[int, int], mode: str,
              background: tuple[int, int, int] = (128, 128, 128)) -> Image.Image:
    """`img` as a (width, height) = `size` model input: "crop" (the release, square only):
    short-side resize and centre crop; "fit": bicubic resize to `size` (the aspect bends at
    most by the bucket rounding); "pad": resize inside `size` keeping the aspect exactly,
    centred on `background` (mid grey: 0 in the model's range)."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    width, height = size
    if mode == "crop":
        if width != height:
            raise ValueError(f"resize mode 'crop' makes square inputs, not {width}x{height}")
        return resize_and_center_crop(img, width)
    if mode == "fit":
        return img.resize((width, height), Image.BICUBIC)
    scale = min(width / img.size[0], height / img.size[1])
    inner = (max(1, round(img.size[0] * scale)), max(1, round(img.size[1] * scale)))
    canvas = Image.new("RGB", (width, height), background)
    canvas.paste(img.resize(inner, Image.BICUBIC),
                 ((width - inner[0]) // 2, (height - inner[1]) // 2))
    return canvas


def to_model_range(pixels: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] → float32 [-1, 1], the VAE's input range."""
    return pixels.astype(np.float32) * np.float32(2 / 255) - np.float32(1)


def _convert(img: Image.Image, name: str, options: DecodeOptions, data: bytes | None) -> Decoded:
    w, h = img.size
    if w * h > options.max_pixels:
        raise ImageError("image_too_large",
                         f"{name}: {w}x{h} = {w * h} pixels > max_pixels {options.max_pixels}")
    notes: list[str] = []
    try:
        frames = getattr(img, "n_frames", 1)
        if frames > 1:
            if img.tell() != 0:
                img.seek(0)
            notes.append(f"first_frame_of_{frames}")
        rawmode16 = _png16_rawmode(img)  # read before load(): PIL empties the tile list then
        if rawmode16 and data is None:
            data = _unread_file_bytes(img)
        # Pillow's TIFF loader turns the image upright itself and drops the tag: read it first.
        stored = _orientation(img) if img.format == "TIFF" else None
        img.load()
        orientation = _orientation(img) if stored is None else stored
        pil_turned = orientation != 1 and stored is not None and _orientation(img) == 1
        full16 = None
        if rawmode16:
            full16 = _png16_values(img, data, rawmode16) if data is not None else None
            if full16 is None:
                notes.append("16bit_high_byte")
        out = _rgb(img, full16, options.background, notes)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError("image_too_large", f"{name}: {e}") from None
    except Exception as e:  # truncated data, bad chunks, decoder errors
        raise ImageError("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None
    if orientation != 1:
        if options.exif_orientation:
            out = out if pil_turned else out.transpose(_ORIENTATION[orientation])
            notes.append("exif_transposed")
        else:
            out = out.transpose(_UNDO_ORIENTATION[orientation]) if pil_turned else out
            notes.append("exif_orientation_kept")
    out.info = {}  # no EXIF left behind: to_rgb(decoded.image) must not rotate again
    return Decoded(out, tuple(notes))


def _rgb(img: Image.Image, full16, background, notes: list) -> Image.Image:
    """Pixels of `img` (16-bit values in `full16` when rebuilt) as an RGB image."""
    mode, key = img.mode, img.info.get("transparency")
    if full16 is not None:  # 16-bit colour PNG: (H, W, 3 or 4) uint16
        alpha = full16[..., 3] / 65535.0 if full16.shape[-1] == 4 else _key_alpha(full16, key)
        notes.append("scaled_16bit")
        return _composite(full16[..., :3] / 257.0, alpha, background, notes)
    if mode.startswith("I") or mode == "F":
        raw = np.asarray(img)
        v = raw.astype(np.float64)
        if mode == "F":
            v = np.clip(np.nan_to_num(v, nan=0.0), 0.0, 1.0) * 255.0
            notes.append("scaled_float")
        elif mode == "I" and v.size and v.max() > 65535:
            v = np.clip(v, 0, None) * (255.0 / v.max())
            notes.append("scaled_by_max")
        else:  # I;16*, or "I" holding 16-bit data (PGM/PPM, 16-bit TIFF/PNG in old Pillows)
            v = np.clip(v, 0, 65535) / 257.0
            notes.append("scaled_16bit")
        return _composite(np.repeat(v[..., None], 3, axis=-1), _key_alpha(raw, key),
                          background, notes)
    if mode in _ALPHA_MODES or key is not None or (
            mode == "P" and getattr(img.palette, "mode", "") == "RGBA"):
        # PIL resolves palette alpha (index or bytes), colour keys and premultiplied alpha.
        rgba = np.asarray((img.convert("LA") if mode == "La" else img).convert("RGBA"))
        return _composite(rgba[..., :3], rgba[..., 3], background, notes)
    if mode == "CMYK":
        notes.append("cmyk_converted")
    if mode == "LAB":  # PIL's own LAB->RGB copies channels; littlecms converts colorimetrically
        from PIL import ImageCms

        lab, srgb = ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB")
        notes.append("lab_converted")
        return ImageCms.applyTransform(img, ImageCms.buildTransform(lab, srgb, "LAB", "RGB"))
    return img.convert("RGB")


def _composite(colour: np.ndarray, alpha, background, notes: list) -> Image.Image:
    """alpha * colour + (1 - alpha) * background. colour: (H, W, 3) in 8-bit units (uint8 or
    float); alpha: None, uint8 0..255, or float 0..1. The hidden colour under alpha 0 drops."""
    bg = np.asarray(background)
    if alpha is not None and alpha.dtype == np.uint8:
        if alpha.min() == 255:
            return Image.fromarray(np.ascontiguousarray(colour, dtype=np.uint8), "RGB")
        a = alpha[..., None].astype(np.uint16)
        notes.append("alpha_composited")  # exact rounding: x/255 never ends in .5
        out = (colour.astype(np.uint16) * a + bg.astype(np.uint16) * (255 - a) + 127) // 255
        return Image.fromarray(out.astype(np.uint8), "RGB")
    if alpha is not None and alpha.min() < 1.0:
        a = alpha[..., None]
        colour = colour * a + bg * (1.0 - a)
        notes.append("alpha_composited")
    return Image.fromarray(np.clip(np.rint(colour), 0, 255).astype(np.uint8), "RGB")


def _key_alpha(raw: np.ndarray, key):
    """0/1 alpha from a PNG tRNS colour key (grey int or RGB tuple, in the source bit depth)."""
    if key is None or isinstance(key, bytes):
        return None
    if raw.ndim == 3:
        hit = np.all(raw[..., :3] == np.asarray(key)[:3], axis=-1)
    else:
        hit = raw == key
    return None if not hit.any() else np.where(hit, 0.0, 1.0)


def _orientation(img: Image.Image) -> int:
    try:
        value = img.getexif().get(_EXIF_ORIENTATION_TAG, 1)
    except Exception:  # unreadable EXIF: keep the stored orientation
        return 1
    return value if value in _ORIENTATION else 1


def _png16_rawmode(img: Image.Image) -> str | None:
    if img.format != "PNG" or len(getattr(img, "tile", ())) != 1:
        return None
    rawmode = img.tile[0][3]
    rawmode = rawmode[0] if isinstance(rawmode, tuple) and rawmode else rawmode
    return rawmode if rawmode in _PNG16_LOW_RAWMODE else None


def _unread_file_bytes(img: Image.Image) -> bytes | None:
    """The file behind a not-yet-loaded image, for the 16-bit low-byte decode."""
    fp = getattr(img, "fp", None)
    try:
        pos = fp.tell()
        fp.seek(0)
        data = fp.read()
        fp.seek(pos)
        return data
    except Exception:
        return None


def _png16_values(img: Image.Image, data: bytes, rawmode: str):
    """The true 16-bit values (H, W, 3|4) of a 16-bit colour PNG whose high bytes PIL decoded
    into `img`; None when the second decode is not possible (then 8-bit high bytes are used)."""
    try:
        low = Image.open(io.BytesIO(data))
        if low.size != img.size or _png16_rawmode(low) != rawmode:
            return None
        low.tile = [low.tile[0]._replace(args=_PNG16_LOW_RAWMODE[rawmode])]
        low.load()
        lo = np.asarray(low).astype(np.uint16)
    except Exception:
        return None
    hi = np.asarray(img).astype(np.uint16)
    if rawmode == "LA;16B":  # lo holds (L high, L low, A high, A low)
        if not (np.array_equal(lo[..., 0], hi[..., 0]) and np.array_equal(lo[..., 2], hi[..., 3])):
            return None
        grey, alpha = lo[..., 0] * 256 + lo[..., 1], lo[..., 2] * 256 + lo[..., 3]
        return np.stack([grey, grey, grey, alpha], axis=-1)
    return hi * 256 + lo
