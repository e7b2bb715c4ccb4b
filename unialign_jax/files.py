"""Every file the project writes is written whole or not at all; JSON is read with clear errors.

The ground floor of the package: no JAX, no Orbax, so data builders, samplers, trainers and
converters all write through the same few functions. A writer fills a hidden temporary file
beside the target (flushed to disk), then renames it over the target: a crash, a SIGKILL
or a full disk leaves either the previous file or the new one, never a truncated file that a
resumed run would trust. Paths may be local or cloud URLs (`gs://...`, through etils).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any, BinaryIO, Callable, Iterable

from etils import epath


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in os.fspath(path)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Calls `write(file)` on a temporary file and renames it to `path` when it succeeded."""
    path = os.fspath(path)
    if not _is_local(path):
        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.partial"
        with tmp.open("wb") as f:
            write(f)
        tmp.replace(target)
        return
    folder, name = os.path.split(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{name}.partial-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_output_dir(dst: str, force: bool = False):
    """Yields a temporary folder that becomes `dst` only if the block finishes without error
    (a folder's `write_atomic`: converters, shard builds, synthetic corpora)."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)) and not force:
        raise FileExistsError(f"{dst} exists and is not empty; pass --force to overwrite it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.partial-", dir=parent)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(dst):
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def dumps(obj: Any) -> str:
    """The project's JSON style: indented, keys sorted, UTF-8 kept, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, dumps(obj))


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def save_png(image, path: str | os.PathLike) -> None:
    """A PIL image as PNG."""
    write_atomic(path, lambda f: image.save(f, format="PNG"))


def read_json(path: str | os.PathLike) -> Any:
    """The JSON value at `path`; FileNotFoundError / ValueError that name the file."""
    path = epath.Path(path)
    if not path.exists():
        raise FileNotFoundError(f"missing {path.name} in {path.parent}")
    try:
        return json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def read_json_or_none(path: str | os.PathLike) -> Any | None:
    """The JSON at `path`, or None when it is missing or unreadable (then redo the work)."""
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def read_jsonl(path: str | os.PathLike) -> list[Any]:
    """Every non-blank line of a JSON-lines file; a bad line is a ValueError naming file:line."""
    rows = []
    for number, line in enumerate(epath.Path(path).read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg})") from None
    return rows
