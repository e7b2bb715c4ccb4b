"""Atomic checkpoint folders: Orbax parameter trees plus JSON side files.

A writer builds its output in a hidden sibling folder and renames it into place only when
everything succeeded, so a failure never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

PARAMS_DIR = "params"


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or of the wrong kind."""


@contextlib.contextmanager
def atomic_output_dir(dst: str, force: bool = False):
    """Yields a temporary folder that becomes `dst` only if the block finishes without error."""
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


def write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def read_json(path: str) -> Any:
    if not os.path.exists(path):
        raise CheckpointError(f"missing {os.path.basename(path)} in {os.path.dirname(path)}")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None


def save_params(folder: str, tree: Any) -> None:
    """Saves a nested dict of (numpy or jax) arrays as an Orbax checkpoint in `folder/params`."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.join(os.path.abspath(folder), PARAMS_DIR), tree)
        ckptr.wait_until_finished()


def load_params(folder: str, target: Any) -> Any:
    """Restores `folder/params` into the structure of `target`.

    `target` leaves are `jax.ShapeDtypeStruct`s (optionally with shardings): arrays are read
    straight into that dtype and placement, so a sharded model never exists whole on one host.
    """
    path = os.path.join(os.path.abspath(folder), PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{folder}: no '{PARAMS_DIR}' Orbax folder — not a converted checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(path, target)


def abstract_like(tree: Any, dtype=None, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for a tree of arrays; float leaves recast to `dtype` when given."""
    leaves, treedef = jax.tree.flatten(tree)
    placements = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)

    def cast(x):
        return dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype

    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, cast(x), sharding=s)
                                        for x, s in zip(leaves, placements)])
