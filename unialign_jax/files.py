"""Every file the project writes is written whole or not at all; JSON is read with clear errors.

The ground floor of the package: no JAX, no Orbax, so data builders, samplers, trainers and
converters all write through the same few functions. A writer fills a hidden temporary file
beside the target (flushed to disk), then renames it over the target: a crash, a SIGKILL
or a full disk leaves either the previous file or the new one, never a truncated file that a
resumed run would trust. Paths may be local or cloud URLs (`gs://...`, through etils).

On an object store (GCS) there is no rename: gcsfs moves an object by copying it and
deleting the original, two requests that are not atomic together. What is atomic there is
the upload itself: an object appears, or replaces the previous one, only when its upload
completes, whole. So a cloud writer collects the bytes in memory and uploads them as one
object under the target's name: no temporary object, nothing to rename or clean up, and a
writer that fails or is killed, before or during the upload, leaves the previous object.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import io
import json
import os
import re
import secrets
import shutil
import tempfile
import time
from typing import Any, BinaryIO, Callable, Iterable

from etils import epath


def _is_local(path: str | os.PathLike) -> bool:
    return "://" not in os.fspath(path)


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Calls `write(file)` on a temporary file and renames it to `path` when it succeeded
    (on a cloud store: on a buffer, uploaded to `path` as one object when it succeeded)."""
    path = os.fspath(path)
    if not _is_local(path):
        buffer = io.BytesIO()
        write(buffer)
        target = epath.Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(buffer.getvalue())
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


# Temporary names of `write_atomic` (files) and `atomic_output_dir` (folders): the
# writer's PID is in the name, so what a killed writer left is recognisable.
_TEMPORARY = re.compile(r"\.(.+)\.(?:partial|replaced)-(\d+)(?:-.*)?")


def remove_stale_partials(folder: str | os.PathLike, name: str | None = None,
                          recursive: bool = True) -> int:
    """Deletes the temporary files and folders under `folder` (of the output `name` only,
    when given) that writers no longer running left behind (a SIGKILL mid-write); returns
    how many. Called before publishing a folder and when resuming into one, so that
    interrupted runs neither litter outputs nor keep their disk space."""
    removed = 0
    for dirpath, dirnames, filenames in os.walk(folder):
        for entry in dirnames + filenames:
            match = _TEMPORARY.fullmatch(entry)
            if match and (name is None or match.group(1) == name) \
                    and not _running(int(match.group(2))):
                path = os.path.join(dirpath, entry)
                _rmtree(path)
                removed += 1
        dirnames[:] = [d for d in dirnames if os.path.isdir(os.path.join(dirpath, d))]
        if not recursive:
            break
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    return True


class PartialLeftBehind(OSError):
    """A failed write's temporary could not be removed: reported, never left silently (it
    is not the clean failure that `is_disk_full` callers promise)."""


# How long a removed temporary must stay away, with nothing under it open, to count as gone;
# how long `remove_tree` tries before it reports what is left.
REMOVE_QUIET_S, REMOVE_TIMEOUT_S = 0.5, 60.0


def remove_tree(path: str | os.PathLike, *, quiet_s: float | None = None,
                timeout_s: float | None = None) -> None:
    """Removes the folder `path` of a failed write for good, also while writers of this
    process still write into it. Orbax raises at the first failed write and leaves its other
    writes running in TensorStore's threads (no handle to join them), and TensorStore makes
    the parent folders of what it writes: a single rmtree can be undone. So: remove, then
    wait until no file under `path` is open in this process and `path` has stayed away
    `quiet_s` seconds, removing it again whenever it is back. PartialLeftBehind when it
    still exists after `timeout_s`."""
    path = os.path.abspath(path) if _is_local(path) else os.fspath(path)
    quiet_s = REMOVE_QUIET_S if quiet_s is None else quiet_s
    timeout_s = REMOVE_TIMEOUT_S if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    quiet_since, failure = None, None
    while True:
        busy = _open_under(path)
        if _exists(path):
            quiet_since = None
            try:
                _rmtree(path)
            except FileNotFoundError:  # a writer renamed or removed something meanwhile
                pass
            except OSError as e:  # a writer added a file after the walk (ENOTEMPTY), ...
                failure = e
        elif busy:
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since >= quiet_s:
            return
        if time.monotonic() > deadline:
            if not _exists(path):  # gone, though something still holds a file of it open
                return
            raise PartialLeftBehind(
                errno.EBUSY, f"could not remove the partial output {path} of a failed write "
                f"within {timeout_s:g} s (last error: {failure}); delete it by hand")
        time.sleep(0.02)


def _exists(path: str) -> bool:
    return os.path.lexists(path) if _is_local(path) else epath.Path(path).exists()


def _rmtree(path: str) -> None:
    if not _is_local(path):
        epath.Path(path).rmtree(missing_ok=True)
    elif os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


def _open_under(path: str) -> int:
    """How many of this process's file descriptors are open on `path` or below (removed
    files included); 0 where /proc cannot tell (not Linux, a cloud path)."""
    if not _is_local(path) or not os.path.isdir("/proc/self/fd"):
        return 0
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed since the listing
            continue
        if target.removesuffix(" (deleted)") == path or target.startswith(path + os.sep):
            count += 1
    return count


PRODUCED_BY = "produced_by.json"
_RECORDS: contextvars.ContextVar[dict] = contextvars.ContextVar("produced_by", default={})


@contextlib.contextmanager
def recording(dst: str, record: Any):
    """While active, `atomic_output_dir(dst)` writes `record` into the folder as
    PRODUCED_BY before it appears: a finished folder always says what made it, so that a
    rerun of the same command can tell "already done" from "made by something else"."""
    token = _RECORDS.set({**_RECORDS.get(), os.path.abspath(dst): record})
    try:
        yield
    finally:
        _RECORDS.reset(token)


@contextlib.contextmanager
def atomic_output_dir(dst: str, force: bool = False):
    """Yields a temporary folder that becomes `dst` only if the block finishes without error
    (a folder's `write_atomic`: converters, shard builds, synthetic corpora). A replaced
    `dst` is moved aside before the new one takes its name, so no instant shows a
    half-deleted folder under it."""
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and (not os.path.isdir(dst) or os.listdir(dst)) and not force:
        raise FileExistsError(f"{dst} exists and is not empty; pass --force to overwrite it")
    parent, name = os.path.split(dst)
    os.makedirs(parent, exist_ok=True)
    remove_stale_partials(parent, name, recursive=False)
    tmp = _new_folder(parent, f".{name}.partial-{os.getpid()}-")
    try:
        yield tmp
        if dst in _RECORDS.get():
            write_json(os.path.join(tmp, PRODUCED_BY), _RECORDS.get()[dst])
    except BaseException as error:
        try:
            remove_tree(tmp)
        except PartialLeftBehind as left:
            raise left from error
        raise
    old = None
    if os.path.exists(dst):
        old = tempfile.mkdtemp(prefix=f".{name}.replaced-{os.getpid()}-", dir=parent)
        os.replace(dst, os.path.join(old, "folder"))
    os.replace(tmp, dst)
    if old is not None:
        shutil.rmtree(old)


def _new_folder(parent: str, prefix: str) -> str:
    """A new empty folder `parent/prefix<random>` made by `os.mkdir`, so that it has the
    permissions `mkdir` gives (0o777 less the umask): it becomes the published folder, and
    `tempfile.mkdtemp`'s 0o700 would leave that readable by its writer alone."""
    while True:
        path = os.path.join(parent, prefix + secrets.token_hex(4))
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def into_new_folder(write: Callable[..., Any]) -> Callable[..., Any]:
    """`write(src, out_dir, **options)`, which fills an existing folder, as
    `f(src, dst, *, force=False, **options)`, which writes the new folder `dst` through
    `atomic_output_dir`: nothing appears at `dst` unless `write` finishes. One wrapper
    serves every converter."""

    def to_new_folder(src: str, dst: str, *, force: bool = False, **options):
        with atomic_output_dir(dst, force) as tmp:
            return write(src, tmp, **options)

    to_new_folder.__doc__ = (f"`{write.__name__}` into the new folder `dst`, written "
                             "atomically (`force`: replace an existing one).")
    return to_new_folder


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    write_atomic(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def dumps(obj: Any) -> str:
    """The project's JSON style: indented, keys sorted, UTF-8 kept, trailing newline."""
    return json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, dumps(obj))


def jsonl(records: Iterable[Any]) -> str:
    """JSON lines: one compact object per line, UTF-8 kept."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def write_jsonl(path: str | os.PathLike, records: Iterable[Any]) -> None:
    write_text(path, jsonl(records))


def write_text_if_changed(path: str | os.PathLike, text: str) -> bool:
    """`write_text` unless the file already holds exactly `text`: a rerun with nothing new
    to say leaves its files untouched. Returns whether it wrote."""
    try:
        if epath.Path(path).read_text() == text:
            return False
    except (OSError, UnicodeDecodeError):
        pass
    write_text(path, text)
    return True


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


def is_disk_full(error: BaseException | None) -> bool:
    """Whether `error`, or an error that caused it, is a full disk: an OSError with ENOSPC,
    or the same reported as text by a native writer (TensorStore, ArrayRecord)."""
    while error is not None:
        if isinstance(error, PartialLeftBehind):  # not clean: that is reported as itself
            return False
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def disk_full_message(where: str) -> str:
    """What every command line says when the disk filled up under `where`."""
    return (f"no space left on device writing {where}. Nothing partial was kept under an "
            "output name and finished work is kept: free some space, then rerun the same "
            "command to continue")
