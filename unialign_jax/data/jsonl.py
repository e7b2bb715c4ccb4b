"""Readers for the release's JSONL corpora (ShareGPT-4o-Image style, spec section 6).

One sample a line. `image` lists the images, sources first and the target last:
text-to-image has 1, editing / perception 2 (source, target), composition K + 1.
`conversations[0].value` is the caption of the target image; editing and composition
lines carry the edit or perception request in `instruction`. For text-to-image the
instruction is the caption itself (spec section 4).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterator

from unialign_jax.data.faults import SkipSample

KINDS = ("t2i", "edit", "compose")
DEFAULT_COMPOSE_SOURCES = 3


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
    """URLs and absolute paths stay as they are; other paths are relative to the JSONL."""
    if is_url(location) or os.path.isabs(location):
        return location
    return os.path.normpath(os.path.join(base_dir, location))


def expected_images(kind: str, compose_sources: int = DEFAULT_COMPOSE_SOURCES) -> int:
    """How many images (sources plus target) a line of this corpus kind must list."""
    if kind not in KINDS:
        raise ValueError(f"unknown corpus kind {kind!r}; expected one of {KINDS}")
    return {"t2i": 1, "edit": 2, "compose": compose_sources + 1}[kind]


def _text(obj, what: str) -> str:
    if not isinstance(obj, str) or not obj.strip():
        raise SkipSample("missing_field", f"{what} is missing or not a non-empty string")
    return obj.strip()


def parse_line(line: bytes | str, kind: str, base_dir: str, where: str,
               compose_sources: int = DEFAULT_COMPOSE_SOURCES) -> Sample:
    """One JSONL line → `Sample`; raises `SkipSample` saying what is wrong with it."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SkipSample("bad_json", str(e)) from None
    if not isinstance(obj, dict):
        raise SkipSample("bad_json", f"a JSON {type(obj).__name__}, not an object")

    images = obj.get("image")
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not images:
        raise SkipSample("missing_field", "'image' is missing or not a list of paths")
    images = [_text(p, "an entry of 'image'") for p in images]
    want = expected_images(kind, compose_sources)
    if len(images) != want:
        raise SkipSample("wrong_image_count", f"{len(images)} images, a {kind} line needs {want}")

    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns or not isinstance(turns[0], dict):
        raise SkipSample("missing_field", "'conversations' is missing or empty")
    caption = _text(turns[0].get("value"), "conversations[0].value")
    instruction = caption if kind == "t2i" else _text(obj.get("instruction"), "'instruction'")
    return Sample(tuple(resolve_image(p, base_dir) for p in images), caption, instruction, where)


def read_jsonl(path: str, kind: str, compose_sources: int = DEFAULT_COMPOSE_SOURCES
               ) -> Iterator[tuple[str, Sample | SkipSample]]:
    """Yields `(where, Sample or SkipSample)` for every non-blank line of `path`.

    A missing JSONL file is an error of the command, not of a sample: it raises.
    """
    base_dir = os.path.dirname(os.path.abspath(path))
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, parse_line(line, kind, base_dir, where, compose_sources)
            except SkipSample as fault:
                yield where, fault
