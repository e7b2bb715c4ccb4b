"""Output files of the batch runners: written whole or not at all, and found again on resume.

Each file is written to a hidden temporary name in its folder and renamed into place, so
an interrupted run never leaves a truncated PNG or JSON that a resumed run would trust.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

from PIL import Image


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """Calls `write(tmp)` and renames `tmp` to `path`; on failure nothing appears at `path`."""
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_png(image: Image.Image, path: str) -> None:
    write_atomic(path, lambda tmp: image.save(tmp, format="PNG"))


def save_json(obj: Any, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, ensure_ascii=False)
            f.write("\n")

    write_atomic(path, write)


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
