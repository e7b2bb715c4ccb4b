"""Output files of the batch runners: written whole or not at all, and found again on resume.

Each file is written to a hidden temporary name in its folder and renamed into place, so
an interrupted run never leaves a truncated PNG or JSON that a resumed run would trust.
"""

from __future__ import annotations

import json
from typing import Any

from PIL import Image

from unialign_jax.checkpoints.io import write_atomic


def save_png(image: Image.Image, path: str) -> None:
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def save_jsonl(records: list[Any], path: str) -> None:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

    write_atomic(path, write)


def read_json(path: str) -> Any | None:
    """The JSON at `path`, or None when it is missing or unreadable (then redo the item)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
