"""Images and prompts into the pipeline, decoded images out (spec section 2).

Images are prepared exactly as for training (`unialign_jax.data.images`: bicubic resize of
the short side, centered square crop, [-1, 1]). Every check that can fail on user input
raises `InputError` here, before anything is compiled.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
from PIL import Image

from unialign_jax.data.faults import SkipSample
from unialign_jax.data.images import decode_rgb, resize_and_center_crop, to_model_range

# VAE downsampling (8) × transformer patch (2): image sides must be multiples of this.
SIZE_MULTIPLE = 16


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


def load_image(image: Any) -> Image.Image:
    """A file path, a PIL image, or an (H, W[, C]) uint8 / [0, 1] float array → RGB image."""
    if isinstance(image, (str, os.PathLike)):
        path = os.fspath(image)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            raise InputError(f"cannot read image {path}: {e.strerror or e}") from None
        if not data:
            raise InputError(f"image file {path} is empty")
        try:
            return decode_rgb(data, path)
        except SkipSample as e:
            raise InputError(f"cannot decode image {path}: {e}") from None
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (1, 3, 4)) \
            or 0 in arr.shape:
        raise InputError("an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); "
                         f"got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.floating):
            raise InputError(f"an image array must be uint8 or float in [0, 1], got {arr.dtype}")
        arr = (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr[..., 0] if arr.ndim == 3 and arr.shape[-1] == 1 else arr
                           ).convert("RGB")


def preprocess(images: Sequence[Image.Image], resolution: int) -> np.ndarray:
    """(B, resolution, resolution, 3) float32 in [-1, 1], channels-last."""
    return np.stack([to_model_range(np.asarray(resize_and_center_crop(im, resolution)))
                     for im in images])


def to_pil(images) -> list[Image.Image]:
    """(B, H, W, 3) in [-1, 1] → uint8 PIL images, as the release converts them:
    clamp(x·0.5 + 0.5, 0, 1)·255, truncated (not rounded) to integers."""
    arr = np.clip(np.asarray(images, np.float32) * np.float32(0.5) + np.float32(0.5), 0.0, 1.0)
    return [Image.fromarray(a) for a in (arr * np.float32(255)).astype(np.uint8)]
