"""Readers for the release's JSONL corpora (ShareGPT-4o-Image style, spec section 6).

One sample a line. `image` lists the images, sources first and the target last:
text-to-image has 1, editing / perception 2 (source, target), composition K + 1.
`conversations[0].value` is the caption of the target image; editing and composition
lines carry the edit or perception request in `instruction`. For text-to-image the
instruction is the caption itself (spec section 4).

Composition lines may also come in the release's own layout (`FlexibleInternalData_compose`
in its `dataset/data_unify.py`): `original_images` (the K sources), `generated_images` (the
target first), `edit_prompt` (the instruction, with surrounding spaces, backslashes and
double quotes stripped as the release strips them) and `caption`.

`LineRules` says what a line must hold. By default the release's rules: the first images
a kind needs (`image[0]`, and `image[1]` for editing) with any further ones ignored, and
empty texts kept. What the release cannot read (a missing field, too few images) it fails
on; here such a line is skipped and counted by reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

from unialign_jax.data.build.faults import SkipSample
from unialign_jax.data.format.records import KINDS
DEFAULT_COMPOSE_SOURCES = 3


@dataclasses.dataclass(frozen=True)
class LineRules:
    """How a corpus' lines are read (the release's rules unless said otherwise)."""

    compose_sources: int = DEFAULT_COMPOSE_SOURCES
    # False (the release): a line lists at least the images its kind needs and the first
    # ones are taken; True: any other count is skipped as wrong_image_count. Composition
    # lines in the `image` layout (target last, not the release's) always need exactly K + 1.
    exact_images: bool = False
    # True (the release): an empty caption or instruction is trained on; False: skipped as
    # missing_field.
    keep_empty_text: bool = True
    # Folder that relative image paths resolve against; None: each JSONL file's own folder
    # (the release resolves them against its working directory: pass ".").
    image_root: str | None = None

    def __post_init__(self):
        if self.compose_sources < 1:
            raise ValueError(f"compose_sources must be >= 1, got {self.compose_sources}")

    def settings(self) -> dict:
        """What the parsed samples depend on, for a build's plan and summary."""
        root = None if self.image_root is None else os.path.abspath(self.image_root)
        return {"exact_images": self.exact_images, "keep_empty_text": self.keep_empty_text,
                "image_root": root}


@dataclasses.dataclass(frozen=True)
class Sample:
    """One parsed line: resolved image locations (sources..., target), texts, and origin."""

    images: tuple
    caption: str
    instruction: str
    where: str

    @property
    def target(self) -> str:
        return self.images[-1]

    @property
    def sources(self) -> tuple:
        return self.images[:-1]


def is_url(location: str) -> bool:
    return location.startswith(("http://", "https://"))


def resolve_image(location: str, base_dir: str) -> str:
    """URLs and absolute paths stay as they are; other paths are relative to `base_dir`."""
    if is_url(location) or os.path.isabs(location):
        return location
    return os.path.normpath(os.path.join(base_dir, location))


def expected_images(kind: str, compose_sources: int = DEFAULT_COMPOSE_SOURCES) -> int:
    """How many images (sources plus target) a line of this corpus kind must list."""
    if kind not in KINDS:
        raise ValueError(f"unknown corpus kind {kind!r}; expected one of {KINDS}")
    return {"t2i": 1, "edit": 2, "compose": compose_sources + 1}[kind]


def _text(obj, what: str, rules: LineRules, strip: str | None = None) -> str:
    if not isinstance(obj, str):
        raise SkipSample("missing_field", f"{what} is missing or not a string")
    text = obj.strip(strip).strip()
    if not text and not rules.keep_empty_text:
        raise SkipSample("missing_field", f"{what} is empty")
    return text


def _paths(obj, what: str) -> list[str]:
    if isinstance(obj, str):
        obj = [obj]
    if not isinstance(obj, list) or not obj:
        raise SkipSample("missing_field", f"{what} is missing or not a list of paths")
    if not all(isinstance(p, str) and p.strip() for p in obj):
        raise SkipSample("missing_field", f"an entry of {what} is not a path")
    return [p.strip() for p in obj]


def _take(images: list[str], want: int, what: str, exact: bool) -> list[str]:
    """The first `want` images; fewer (or, `exact`, more) is a wrong_image_count."""
    if len(images) < want or (exact and len(images) != want):
        raise SkipSample("wrong_image_count", f"{len(images)} images in {what}, {want} needed")
    return images[:want]


def _release_compose(obj: dict, rules: LineRules) -> tuple[list[str], str, str]:
    """(images, caption, instruction) of a line in the release's composition layout."""
    sources = _take(_paths(obj.get("original_images"), "'original_images'"),
                    rules.compose_sources, "'original_images'", rules.exact_images)
    target = _take(_paths(obj.get("generated_images"), "'generated_images'"), 1,
                   "'generated_images'", rules.exact_images)
    return (sources + target, _text(obj.get("caption"), "'caption'", rules),
            _text(obj.get("edit_prompt"), "'edit_prompt'", rules, strip=' \\"'))


def _image_layout(obj: dict, kind: str, rules: LineRules) -> tuple[list[str], str, str]:
    """(images, caption, instruction) of a line in the `image` + `conversations` layout."""
    want = expected_images(kind, rules.compose_sources)
    images = _take(_paths(obj.get("image"), "'image'"), want, "'image'",
                   rules.exact_images or kind == "compose")
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        raise SkipSample("missing_field", "'conversations' is missing or empty")
    caption = _text(turns[0].get("value"), "conversations[0].value", rules)
    instruction = (caption if kind == "t2i"
                   else _text(obj.get("instruction"), "'instruction'", rules))
    return images, caption, instruction


def parse_line(line: bytes | str, kind: str, base_dir: str, where: str,
               rules: LineRules = LineRules()) -> Sample:
    """One JSONL line → `Sample`; raises `SkipSample` saying what is wrong with it.
    Relative image paths resolve against `base_dir`."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("bad_json", str(e)) from None
    if not isinstance(obj, dict):
        raise SkipSample("bad_json", f"a JSON {type(obj).__name__}, not an object")
    if kind == "compose" and "image" not in obj and "original_images" in obj:
        images, caption, instruction = _release_compose(obj, rules)
    else:
        images, caption, instruction = _image_layout(obj, kind, rules)
    return Sample(tuple(resolve_image(p, base_dir) for p in images), caption, instruction, where)


def read_jsonl(path: str, kind: str, rules: LineRules = LineRules()
               ) -> Iterator[tuple[str, Sample | SkipSample]]:
    """Yields `(where, Sample or SkipSample)` for every non-blank line of `path`.

    A missing JSONL file is an error of the command, not of a sample: it raises.
    """
    expected_images(kind, rules.compose_sources)  # an unknown kind fails here
    base_dir = os.path.abspath(rules.image_root or os.path.dirname(os.path.abspath(path)))
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, parse_line(line, kind, base_dir, where, rules)
            except SkipSample as fault:
                yield where, fault
