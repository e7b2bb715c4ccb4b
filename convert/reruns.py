"""Idempotent conversions: a finished DST records what made it (`produced_by.json`: the
subcommand, its options and the source files' sizes and times), so that rerunning the
same command — a retry loop after a preemption — finds it done and changes nothing,
while another source or other options against it stay an error unless --force.
"""

from __future__ import annotations

import os
from typing import Any, Iterable

from unialign_jax import files


def _dest(flags: tuple[str, ...], kwargs: dict) -> str:
    if "dest" in kwargs:
        return kwargs["dest"]
    long = next((f for f in flags if f.startswith("--")), flags[0])
    return long.lstrip("-").replace("-", "_")


def fingerprint(path: str) -> Any:
    """Sizes and modification times of a file, or of every file under a folder."""
    if os.path.isfile(path):
        stat = os.stat(path)
        return [stat.st_size, stat.st_mtime_ns]
    found = {}
    for dirpath, _, names in os.walk(path):
        for name in names:
            full = os.path.join(dirpath, name)
            found[os.path.relpath(full, path)] = fingerprint(full)
    return dict(sorted(found.items()))


def request(args, options: Iterable) -> dict:
    """What a conversion's output depends on: subcommand, options, source files."""
    named = [(_dest(o.flags, o.kwargs), o) for o in options]
    values = {dest: getattr(args, dest) for dest, _ in named}
    inputs = {"src": os.path.abspath(args.src)}
    for dest, option in named:  # files named by options (a mask embedding) count as inputs
        value = values[dest]
        if "choices" not in option.kwargs and isinstance(value, str) and os.path.exists(value):
            inputs[dest] = os.path.abspath(value)
    return {"command": args.command, "options": values,
            "inputs": {k: {"path": p, "files": fingerprint(p)} for k, p in inputs.items()}}


def record_path(dst: str) -> str:
    """Where a finished DST says what made it: inside a folder (written with it by
    `files.atomic_output_dir`), beside a single-file output (`export-lora`)."""
    if is_file_output(dst):
        return f"{dst}.{files.PRODUCED_BY}"
    return os.path.join(dst, files.PRODUCED_BY)


def is_file_output(dst: str) -> bool:
    return dst.endswith(".safetensors")


def already_done(dst: str, wanted: dict, force: bool) -> bool:
    """Whether `dst` already holds exactly this conversion; a FileExistsError naming what
    differs when it holds another one (and `force` is off)."""
    done = files.read_json_or_none(record_path(dst))
    if force or done is None:
        return False
    if done == wanted:
        return True
    differs = [f"{part}.{k}" for part in ("options", "inputs")
               for k in sorted(set(wanted[part]) | set(done.get(part, {})))
               if wanted[part].get(k) != done.get(part, {}).get(k)]
    if done.get("command") != wanted["command"]:
        differs.insert(0, "command")
    raise FileExistsError(f"{dst} holds a conversion of other inputs or options (differs in: "
                          f"{', '.join(differs)}); pass --force to overwrite it")
