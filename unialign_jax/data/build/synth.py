"""Synthetic corpus: flat-coloured shape scenes with exact captions, edits and masks.

Written in the release's JSONL formats (spec section 6), so the real readers and shard
builder consume it unchanged. It feeds the CPU quickstart, which trains a tiny model and
scores it by caption token accuracy and by whether a generated image's `dominant_colour`
is the prompt's colour; hence a small regular vocabulary ("a red square"), colours at
the corners of the RGB cube (pairwise ≥ 255 apart) and a neutral grey background.

Files: `t2i_train.jsonl`, `edit_train.jsonl` (colour edits and segmentation requests
alternating — perception data is editing data), `compose_train.jsonl` (in the release's
composition layout: K source images each holding one shape, in distinct colours, and the
target scene holding them all where they were, for the fixed instruction "combine
them"), their `*_heldout.jsonl` twins when a held-out fraction is asked for, `images/`,
and `synth.json` describing the run. Composition samples draw from their own random stream,
so adding them left the text-to-image and editing samples of a seed as they were.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
from PIL import Image, ImageDraw

from unialign_jax.data.build.jsonl import DEFAULT_COMPOSE_SOURCES

PALETTE = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "cyan": (0, 255, 255),
    "magenta": (255, 0, 255),
}
BACKGROUND = (128, 128, 128)
MASK_ON, MASK_OFF = (255, 255, 255), (0, 0, 0)
SHAPES = ("square", "circle", "triangle")
MASK_INSTRUCTION = "give the segmentation mask"
COMPOSE_INSTRUCTION = "combine them"  # 4 tokens with the quickstart's tokenizer


@dataclasses.dataclass(frozen=True)
class Shape:
    colour: str
    kind: str
    box: tuple  # (left, top, right, bottom), inclusive pixel bounds

    def draw(self, canvas: ImageDraw.ImageDraw, fill) -> None:
        x0, y0, x1, y1 = self.box
        if self.kind == "square":
            canvas.rectangle(self.box, fill=fill)
        elif self.kind == "circle":
            canvas.ellipse(self.box, fill=fill)
        else:
            canvas.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)


def render(shapes: list[Shape], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), BACKGROUND)
    canvas = ImageDraw.Draw(img)
    for shape in shapes:
        shape.draw(canvas, PALETTE[shape.colour])
    return img


def render_mask(shapes: list[Shape], size: int) -> Image.Image:
    img = Image.new("RGB", (size, size), MASK_OFF)
    canvas = ImageDraw.Draw(img)
    for shape in shapes:
        shape.draw(canvas, MASK_ON)
    return img


def caption(shapes: list[Shape]) -> str:
    return " and ".join(f"a {s.colour} {s.kind}" for s in shapes)


def mask_caption(shapes: list[Shape]) -> str:
    return "the mask of " + " and ".join(f"a {s.kind}" for s in shapes)


def edit_instruction(shape: Shape, new_colour: str) -> str:
    return f"make the {shape.colour} {shape.kind} {new_colour}"


def _area(shape: Shape, size: int) -> int:
    return int((np.asarray(render_mask([shape], size))[..., 0] > 0).sum())


def side_range(size: int, count: int = 1) -> range:
    """Box sides `random_scene` draws in a `size`-pixel scene of `count` shapes: a lone
    shape fills much of the image, two or more share it."""
    low, high = {1: (0.4, 0.7), 2: (0.25, 0.45)}.get(count, (0.15, 0.35))
    return range(int(low * size), int(high * size) + 1)


def random_scene(rng: np.random.Generator, size: int, max_shapes: int = 1,
                 count: int | None = None, distinct_colours: bool = False) -> list[Shape]:
    """1..max_shapes (or exactly `count`) non-overlapping shapes with distinct (colour,
    kind) — or distinct colours —, largest first."""
    count = int(rng.integers(1, max_shapes + 1)) if count is None else count
    sides = side_range(size, count)
    shapes, boxes, used = [], [], set()
    for _ in range(100 * count):
        if len(shapes) == count:
            break
        colour, kind = str(rng.choice(list(PALETTE))), str(rng.choice(SHAPES))
        side = int(rng.integers(sides.start, sides.stop))
        x0, y0 = (int(v) for v in rng.integers(0, size - side, 2))
        box = (x0, y0, x0 + side - 1, y0 + side - 1)
        overlaps = any(box[0] <= b[2] and b[0] <= box[2] and box[1] <= b[3] and b[1] <= box[3]
                       for b in boxes)
        key = colour if distinct_colours else (colour, kind)
        if key in used or overlaps:
            continue
        used.add(key)
        boxes.append(box)
        shapes.append(Shape(colour, kind, box))
    return sorted(shapes, key=lambda s: -_area(s, size))


def nearest_colour(image) -> np.ndarray:
    """(H, W) index of each pixel's nearest colour: 0 the grey background, k ≥ 1 the k-th
    palette colour, so noisy and blurred generations are still scored.

    `image`: a PIL image, a uint8 (H, W, 3) array, or a float (H, W, 3) array in the
    model's [-1, 1] range.
    """
    pixels = np.asarray(image)
    if pixels.dtype != np.uint8:
        pixels = (np.clip(pixels, -1.0, 1.0) + 1.0) * 127.5
    pixels = pixels.astype(np.float32)
    refs = np.array([BACKGROUND, *PALETTE.values()], np.float32)
    return ((pixels[..., None, :] - refs) ** 2).sum(-1).argmin(-1)


def dominant_colour(image) -> str | None:
    """Palette colour covering most pixels, background aside (each pixel votes for its
    `nearest_colour`); None for a blank image."""
    votes = np.bincount(nearest_colour(image).ravel(), minlength=len(PALETTE) + 1)[1:]
    return list(PALETTE)[int(votes.argmax())] if votes.max() else None


def corpus_texts() -> list[str]:
    """Every caption and instruction of single-shape scenes, the composition instruction and
    a two-shape caption (for the word "and"), e.g. to train a tokenizer."""
    pair = [Shape("red", "square", (0, 0, 1, 1)), Shape("blue", "circle", (0, 0, 1, 1))]
    texts = [MASK_INSTRUCTION, COMPOSE_INSTRUCTION, caption(pair)]
    for kind in SHAPES:
        texts.append(mask_caption([Shape("red", kind, (0, 0, 1, 1))]))
        for colour in PALETTE:
            shape = Shape(colour, kind, (0, 0, 1, 1))
            texts.append(caption([shape]))
            texts += [edit_instruction(shape, c) for c in PALETTE if c != colour]
    return texts


def _line(images: list[str], text: str, size: int, instruction: str | None = None) -> str:
    record = {"image": images, "conversations": [{"from": "human", "value": text},
                                                 {"from": "gpt", "value": "<image>"}],
              "img_w": size, "img_h": size}
    if instruction is not None:
        record["instruction"] = instruction
    return json.dumps(record)


def _edit_pair(rng: np.random.Generator, scene: list[Shape], size: int, i: int):
    """(target image, caption of the target, instruction): a recolouring or a mask."""
    if i % 2:
        return render_mask(scene, size), mask_caption(scene), MASK_INSTRUCTION
    j = int(rng.integers(len(scene)))
    new = str(rng.choice([c for c in PALETTE if c != scene[j].colour]))
    edited = [dataclasses.replace(s, colour=new) if k == j else s for k, s in enumerate(scene)]
    return render(edited, size), caption(edited), edit_instruction(scene[j], new)


def _compose_line(scene: list[Shape], size: int, i: int, folder: str) -> str:
    """Writes a composition sample's images (each shape alone, then the scene) and returns
    its line in the release's composition layout."""
    names = [f"images/compose_{i:06d}_source{k}.png" for k in range(len(scene))]
    for name, shape in zip(names, scene):
        render([shape], size).save(os.path.join(folder, name))
    target = f"images/compose_{i:06d}_target.png"
    render(scene, size).save(os.path.join(folder, target))
    return json.dumps({"original_images": names, "generated_images": [target],
                       "edit_prompt": COMPOSE_INSTRUCTION, "caption": caption(scene)})


def generate(out_dir: str, n: int, seed: int = 0, size: int = 64, max_shapes: int = 1,
             heldout: float = 0.0, force: bool = False,
             compose_sources: int = DEFAULT_COMPOSE_SOURCES) -> dict:
    """Writes `n` samples of each kind (text-to-image, edit/perception, composition of
    `compose_sources` shapes); returns the description."""
    from unialign_jax.files import atomic_output_dir, write_json

    if n < 1 or size < 16 or max_shapes < 1 or not 0.0 <= heldout < 1.0 or not (
            1 <= compose_sources <= len(PALETTE)):
        raise ValueError("need n >= 1, size >= 16, max_shapes >= 1, 0 <= heldout < 1 and "
                         f"1 <= compose_sources <= {len(PALETTE)}")
    rng = np.random.default_rng(seed)
    n_heldout = int(round(n * heldout))
    with atomic_output_dir(out_dir, force) as tmp:
        os.makedirs(os.path.join(tmp, "images"))
        lines = {"t2i": [], "edit": [], "compose": []}
        for i in range(n):
            scene = random_scene(rng, size, max_shapes)
            t2i = f"images/t2i_{i:06d}.png"
            render(scene, size).save(os.path.join(tmp, t2i))
            lines["t2i"].append(_line([t2i], caption(scene), size))

            scene = random_scene(rng, size, max_shapes)
            source, target = f"images/edit_{i:06d}_source.png", f"images/edit_{i:06d}_target.png"
            target_img, target_caption, instruction = _edit_pair(rng, scene, size, i)
            render(scene, size).save(os.path.join(tmp, source))
            target_img.save(os.path.join(tmp, target))
            lines["edit"].append(_line([source, target], target_caption, size, instruction))
        compose_rng = np.random.default_rng([seed, 1])
        for i in range(n):
            scene = []
            while len(scene) != compose_sources:  # a crowded draw may place fewer
                scene = random_scene(compose_rng, size, count=compose_sources,
                                     distinct_colours=True)
            lines["compose"].append(_compose_line(scene, size, i, tmp))
        files = {}
        for kind, kind_lines in lines.items():
            splits = {"train": kind_lines[:n - n_heldout], "heldout": kind_lines[n - n_heldout:]}
            for split, split_lines in splits.items():
                if split_lines:
                    name = f"{kind}_{split}.jsonl"
                    with open(os.path.join(tmp, name), "w") as f:
                        f.write("\n".join(split_lines) + "\n")
                    files[name] = len(split_lines)
        info = {"n": n, "seed": seed, "size": size, "max_shapes": max_shapes,
                "compose_sources": compose_sources, "heldout": n_heldout, "files": files, "palette": PALETTE,
                "background": BACKGROUND}
        write_json(os.path.join(tmp, "synth.json"), info)
    return info
