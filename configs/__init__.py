"""Training configs as plain Python: each module's `get_config()` returns a `TrainConfig`.

Installed as `unialign_configs`, so `unialign-train --config NAME` finds them by name from
any working directory (a path to a `.py` file works too).
"""

from __future__ import annotations

import importlib
import importlib.util
import os


def names() -> list[str]:
    """The shipped configs' names."""
    folder = os.path.dirname(os.path.abspath(__file__))
    return sorted(n[:-3] for n in os.listdir(folder) if n.endswith(".py") and n[0] != "_")


def load(name_or_path: str):
    """The `TrainConfig` of a shipped config's name, or of a `.py` file."""
    if name_or_path.endswith(".py"):
        return load_file(name_or_path)
    if name_or_path not in names():
        raise FileNotFoundError(f"no config named {name_or_path!r}: give a .py file or one of "
                                f"{names()}")
    return config_of(importlib.import_module(f"{__name__}.{name_or_path}"), name_or_path)


def load_file(path: str):
    """The `TrainConfig` of `get_config()` in the Python file `path`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file not found: {path}")
    name = os.path.basename(path)[:-3]
    spec = importlib.util.spec_from_file_location(f"_config_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return config_of(module, path)


def config_of(module, where: str):
    """The `TrainConfig` a config module's `get_config()` returns, checked."""
    from unialign_jax.runs.config import TrainConfig

    if not hasattr(module, "get_config"):
        raise ValueError(f"{where} defines no get_config()")
    config = module.get_config()
    if not isinstance(config, TrainConfig):
        raise ValueError(f"{where}: get_config() returned {type(config).__name__}, not "
                         "TrainConfig")
    return config
