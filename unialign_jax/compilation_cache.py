"""JAX's persistent compilation cache, set up in one place for every command line.

A restarted sampler or trainer compiles the same programs again; with the cache on, XLA
executables are read back from disk instead (cold vs warm start times are in the README).
Every CLI calls `add_arguments` on its parser and `setup_from_args` first thing in `main`.

Where the cache lives, first match wins:
  --no-compilation-cache                    off
  --compilation-cache DIR                   DIR
  $UNIALIGN_JAX_COMPILATION_CACHE           a folder, or "off"
  $JAX_COMPILATION_CACHE_DIR                JAX's own setting, kept
  $XDG_CACHE_HOME/unialign_jax/jax          default (~/.cache/unialign_jax/jax)

Programs that compile in under `MIN_COMPILE_SECONDS` are not written (JAX's own threshold
is 1 s; the CPU quickstart's steps compile in well under that); the JAX environment
variable `JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS` still overrides it.
"""

from __future__ import annotations

import argparse
import contextlib
import os

ENV_VAR = "UNIALIGN_JAX_COMPILATION_CACHE"
JAX_ENV_VAR = "JAX_COMPILATION_CACHE_DIR"
OFF = "off"
MIN_COMPILE_SECONDS = 0.1


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "unialign_jax", "jax")


def cache_dir(folder: str | None = None, disabled: bool = False) -> str | None:
    """The cache folder the flags (`folder`, `disabled`) and the environment choose; None
    when the cache is off."""
    if disabled:
        return None
    chosen = folder or os.environ.get(ENV_VAR) or os.environ.get(JAX_ENV_VAR) or default_dir()
    return None if chosen.strip().lower() == OFF else os.path.abspath(os.path.expanduser(chosen))


def enable(folder: str | None) -> str | None:
    """Points JAX's persistent cache at `folder` (None: turns it off); returns `folder`.

    Call before the first compilation: JAX opens the cache once per process."""
    import jax

    if folder is not None:
        os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_enable_compilation_cache", folder is not None)
    jax.config.update("jax_compilation_cache_dir", folder)
    if folder is not None and "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    return folder


@contextlib.contextmanager
def writing_nothing():
    """Compilations inside write no cache entry, even in a process already using the cache.

    For programs compiled for a TPU topology (abstract chips, `scripts/tpu_plan.py`): with
    no TPU client, their executables could never be loaded back (JAX warns and compiles
    again). JAX decides once per process whether the cache is used, so switching the cache
    off here would not hold after a first compilation; the minimum compile time of an entry
    is read at every write, so it is raised past any compile instead. An entry never
    written is never read: a later read is a quiet miss."""
    import jax

    name = "jax_persistent_cache_min_compile_time_secs"
    was = getattr(jax.config, name)
    jax.config.update(name, float("inf"))
    try:
        yield
    finally:
        jax.config.update(name, was)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("compilation cache")
    group.add_argument("--compilation-cache", metavar="DIR", default=None,
                       help=f"persistent XLA compilation cache, so restarts skip compiling "
                            f"(default: ${ENV_VAR}, ${JAX_ENV_VAR}, else {default_dir()})")
    group.add_argument("--no-compilation-cache", action="store_true",
                       help="compile everything afresh and write no cache")


def setup_from_args(args: argparse.Namespace) -> str | None:
    """`enable(cache_dir(...))` from the flags `add_arguments` defined."""
    return enable(cache_dir(args.compilation_cache, args.no_compilation_cache))
