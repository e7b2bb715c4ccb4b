"""Images and prompts into the pipeline, decoded images out (spec section 2).

Images are decoded by the project's one decoder (`unialign_jax.images`: bit depth, EXIF
orientation, transparency) and prepared as for training by default (bicubic resize of the
short side, centred square crop, [-1, 1]) or, for non-square inputs, fitted or padded into
an aspect bucket. Every check that can fail on user input raises `InputError` here, before
anything is compiled.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from unialign_jax import images
from unialign_jax.images import SIZE_MULTIPLE, DecodeOptions, fit_image, to_model_range

log = logging.getLogger(__name__)

# Inputs whose short side is below this are refused: there is nothing left to see.
MIN_INPUT_SIDE = 32
# Upscaling an input by more than this factor is allowed but warned about.
MAX_QUIET_UPSCALE = 4.0


class InputError(ValueError):
    """User input the pipeline cannot run on (bad image, size, prompt list, ...)."""


def check_resolution(height: int, width: int, max_side: int | None = None) -> None:
    """Sides must be positive multiples of 16 and, if given, at most `max_side` pixels."""
    for name, side in (("height", height), ("width", width)):
        if isinstance(side, bool) or not isinstance(side, (int, np.integer)) \
                or side <= 0 or side % SIZE_MULTIPLE:
            raise InputError(f"{name} must be a positive multiple of {SIZE_MULTIPLE} "
                             f"(VAE 8× times patch 2), got {side!r}")
        if max_side is not None and side > max_side:
            raise InputError(f"{name} {side} exceeds the model's position table "
                             f"({max_side} px at most)")


def check_prompts(prompts: str | Sequence[str], what: str = "prompt") -> list[str]:
    """A non-empty list of strings (a lone string becomes a list of one)."""
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError(f"the {what} list is empty")
    for i, p in enumerate(prompts):
        if not isinstance(p, str):
            raise InputError(f"{what} {i} is a {type(p).__name__}, not a string")
    return prompts


def load_image(image: Any, *, exif_orientation: bool = True,
               background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """A file path, a PIL image, or an (H, W[, C]) uint8 / [0, 1] float array → RGB image,
    decoded by `unialign_jax.images` (EXIF orientation applied unless told to keep it,
    transparency composited onto `background`)."""
    options = DecodeOptions(exif_orientation=exif_orientation, background=background)
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InputError(f"cannot read image {path}: {e.strerror or e}") from None
        try:
            return images.decode_image(data, path, options).image
        except images.ImageError as e:
            raise InputError(f"cannot decode image {path}: {e}") from None
    if isinstance(image, Image.Image):
        try:
            return images.to_rgb(image, options).image
        except images.ImageError as e:
            raise InputError(f"cannot use the given image: {e}") from None
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)) \
            or 0 in arr.shape:
        raise InputError("an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
                         f"got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"an image array must be uint8 or float in [0, 1], got {arr.dtype}")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return images.to_rgb(Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1
                                         else arr), options).image


def check_input_size(image: Image.Image, size: tuple[int, int], what: str = "image") -> None:
    """Refuses an input below `MIN_INPUT_SIDE` px; warns when it is upscaled by more than
    `MAX_QUIET_UPSCALE`× to become a (width, height) = `size` model input."""
    w, h = image.size
    if min(w, h) < MIN_INPUT_SIDE:
        raise InputError(f"{what} is {w}x{h}: its short side is below {MIN_INPUT_SIDE} px, "
                         "too small to edit, perceive or caption")
    factor = max(size[0] / w, size[1] / h) if min(size) else 1.0
    if factor > MAX_QUIET_UPSCALE:
        log.warning("%s (%dx%d) is upscaled %.1f× to %dx%d: expect a blurry input",
                    what, w, h, factor, size[0], size[1])


def preprocess(images_: Sequence[Image.Image], size: int | tuple[int, int],
               resize: str = "crop") -> np.ndarray:
    """(B, height, width, 3) float32 in [-1, 1], channels-last. `size` is the side of a
    square ("crop": the release's short-side resize + centre crop) or (width, height)."""
    size = (size, size) if isinstance(size, int) else tuple(size)
    return np.stack([to_model_range(np.asarray(fit_image(im, size, resize)))
                     for im in images_])


def to_pil(images) -> list[Image.Image]:
    """(B, H, W, 3) in [-1, 1] → uint8 PIL images, as the release converts them:
    clamp(x·0.5 + 0.5, 0, 1)·255, truncated (not rounded) to integers."""
    from unialign_jax.parallel.placement import to_host  # gathered across processes

    arr = np.clip(to_host(images).astype(np.float32) * np.float32(0.5) + np.float32(0.5),
                  0.0, 1.0)
    return [Image.fromarray(a) for a in (arr * np.float32(255)).astype(np.uint8)]
