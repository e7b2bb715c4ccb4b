"""Training configs as plain Python: each module's `get_config()` returns a `TrainConfig`.

Installed as `unialign_configs`, so `unialign-train --config NAME` finds them by name from
any working directory (a path to a `.py` file works too).
"""

from __future__ import annotations

import importlib
import os


def names() -> list[str]:
    """The shipped configs' names."""
    folder = os.path.dirname(os.path.abspath(__file__))
    return sorted(n[:-3] for n in os.listdir(folder) if n.endswith(".py") and n[0] != "_")


def load(name_or_path: str):
    """The `TrainConfig` of a shipped config's name, or of a `.py` file."""
    from unialign_jax.runs.config import config_of, load_config

    if name_or_path.endswith(".py"):
        return load_config(name_or_path)
    if name_or_path not in names():
        raise FileNotFoundError(f"no config named {name_or_path!r}: give a .py file or one of "
                                f"{names()}")
    return config_of(importlib.import_module(f"{__name__}.{name_or_path}"), name_or_path)
