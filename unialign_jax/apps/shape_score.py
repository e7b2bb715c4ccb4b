"""Which shape an image of the synthetic corpus shows: the quickstart's shape score.

Template matching against the corpus' own renderer, nothing learned: the image's foreground
(pixels nearer a palette colour than the grey background, the vote `dominant_colour` counts)
is compared by intersection over union with the mask of every square, circle and triangle
the corpus draws for a lone shape — each box side `random_scene` picks, at every position
inside the image — and the best match names the shape. A clean render matches its own
template exactly (IoU 1); a blob matches whichever template it overlaps most, so
shapeless generations score near chance (1/3) instead of being guessed right.

Composition (`composition_score`): the corpus' composed scenes hold shapes of distinct
colours, so each wanted shape is looked for alone — among the pixels nearest its colour,
matched against the templates of the sides a scene of that many shapes draws — and counts
as present when its kind matches best with an IoU of at least `PRESENT_IOU`.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from unialign_jax.data.build.synth import (PALETTE, SHAPES, Shape, nearest_colour,
                                           render_mask, side_range)

# A wanted shape of a composition is present when its colour's pixels match a template of
# its kind at least this well (a clean render: 1; stray pixels of the colour: far less).
PRESENT_IOU = 0.5


@functools.lru_cache(maxsize=8)
def _templates(size: int, count: int = 1) -> tuple[tuple[str, np.ndarray], ...]:
    """(kind, side × side 0/1 mask) of every shape a `size`-pixel scene of `count` shapes
    can hold."""
    return tuple((kind, (np.asarray(render_mask([Shape("red", kind, (0, 0, s - 1, s - 1))], s)
                                    )[..., 0] > 0).astype(np.float32))
                 for kind in SHAPES for s in side_range(size, count) if s <= size)


def foreground(image) -> np.ndarray:
    """(H, W) bool: pixels nearer a palette colour than the background."""
    return nearest_colour(image) > 0


def best_shapes(images: Sequence) -> list[tuple[str | None, float]]:
    """(shape, IoU of its best template) per image; (None, 0.0) for an image without
    foreground. Images as `nearest_colour` takes them, all square and of one size."""
    return _best_matches(np.stack([foreground(im) for im in images]))


def _best_matches(masks: np.ndarray, count: int = 1) -> list[tuple[str | None, float]]:
    """(shape, IoU) of the best template of a `count`-shape scene for each (H, W) mask."""
    masks = masks.astype(np.float32)
    n, size = masks.shape[0], masks.shape[1]
    if masks.shape[2] != size:
        raise ValueError(f"shape scoring needs square images, got {masks.shape[1:]}")
    area = masks.sum(axis=(1, 2))
    best_iou, best_kind = np.zeros(n, np.float32), np.full(n, -1)
    for kind, template in _templates(size, count):
        side = template.shape[0]
        windows = sliding_window_view(masks, (side, side), axis=(1, 2))
        inter = np.einsum("nijkl,kl->nij", windows, template).reshape(n, -1).max(axis=1)
        # The largest intersection is the best IoU at this side: the union grows with it.
        iou = inter / np.maximum(area + template.sum() - inter, 1.0)
        better = iou > best_iou
        best_iou[better], best_kind[better] = iou[better], SHAPES.index(kind)
    return [(SHAPES[k] if k >= 0 else None, float(v)) for k, v in zip(best_kind, best_iou)]


def shape_accuracy(images: Sequence, wanted: Sequence[str]) -> float:
    """Fraction of images whose best-matching shape is the wanted one (chance: 1/3)."""
    if len(images) != len(wanted):
        raise ValueError(f"{len(images)} images but {len(wanted)} wanted shapes")
    return float(np.mean([kind == w for (kind, _), w in zip(best_shapes(images), wanted)]))


def shapes_present(images: Sequence, scenes: Sequence[Sequence[tuple[str, str]]]
                   ) -> np.ndarray:
    """(n, K) bool: whether image i shows the k-th (colour, kind) of `scenes[i]` — every
    scene of K shapes in distinct colours, as the corpus composes them."""
    count = len(scenes[0])
    if any(len(scene) != count for scene in scenes) or len(scenes) != len(images):
        raise ValueError("one scene of the same number of shapes per image is needed")
    colours = list(PALETTE)
    masks = [nearest_colour(image) == 1 + colours.index(colour)
             for image, scene in zip(images, scenes) for colour, _ in scene]
    found = _best_matches(np.stack(masks), count)
    wanted = [kind for scene in scenes for _, kind in scene]
    return np.array([kind == w and iou >= PRESENT_IOU for (kind, iou), w in zip(found, wanted)]
                    ).reshape(len(scenes), count)


def composition_score(images: Sequence, scenes: Sequence[Sequence[tuple[str, str]]]
                      ) -> dict[str, float]:
    """all_present: fraction of images showing every shape of their scene; shape_recall:
    fraction of the wanted shapes shown."""
    present = shapes_present(images, scenes)
    return {"all_present": float(present.all(axis=1).mean()),
            "shape_recall": float(present.mean())}
