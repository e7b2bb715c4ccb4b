"""Atomic checkpoint folders holding Orbax parameter trees.

A writer builds its output in a hidden sibling folder and renames it into place only when
everything succeeded, so a failure never leaves a half-written checkpoint behind. JSON side
files go through `unialign_jax.files`.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PARAMS_DIR = "params"
_STEP_METADATA = "_CHECKPOINT_METADATA"


class _ItemOfAStep(logging.Filter):
    """Orbax looks for a step's `_CHECKPOINT_METADATA` in any folder it reads, also in one
    item of a training step (its `state`) read alone, where the file lives one level up: it
    then warns that the file does not exist. Nothing is missing; that warning (and only it,
    for a local folder whose parent has the file) is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith("Metadata file does not exist") or not record.args:
            return True
        missing = str(record.args[0])
        parent = os.path.dirname(os.path.dirname(missing))
        return not ("://" not in missing and os.path.basename(missing) == _STEP_METADATA
                    and os.path.exists(os.path.join(parent, _STEP_METADATA)))


logging.getLogger("absl").addFilter(_ItemOfAStep())


class CheckpointError(ValueError):
    """A checkpoint folder that is missing, incomplete or of the wrong kind."""


def save_params(folder: str, tree: Any) -> None:
    """Saves a nested dict of (numpy or jax) arrays as an Orbax checkpoint in `folder/params`.

    Host memory stays near one copy of `tree` (a converter must fit T5-XXL on a 24 GB
    machine): the save is synchronous, so numpy leaves skip the defensive copy Orbax makes
    for asynchronous saves, and compression is off because its buffers for the whole tree
    are held until the commit (weights barely compress anyway).
    """
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.get_type_handler(jax.Array)))
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    with ocp.Checkpointer(handler) as ckptr:
        ckptr.save(os.path.join(os.path.abspath(folder), PARAMS_DIR),
                   args=ocp.args.PyTreeSave(tree))


def load_params(folder: str, target: Any) -> Any:
    """Restores `folder/params` into the structure of `target`.

    `target` leaves are `jax.ShapeDtypeStruct`s (optionally with shardings): arrays are read
    straight into that dtype and placement, so a sharded model never exists whole on one host.
    """
    path = os.path.join(os.path.abspath(folder), PARAMS_DIR)
    if not os.path.isdir(path):
        raise CheckpointError(f"{folder}: no '{PARAMS_DIR}' Orbax folder — not a converted checkpoint")
    with ocp.StandardCheckpointer() as ckptr:
        _check_stored_shapes(folder, ckptr.metadata(path).item_metadata.tree, target)
        return ckptr.restore(path, target)


def read_tree(path: str, target: Any, *, partial: bool = False, where: str | None = None
              ) -> Any:
    """The Orbax tree at `path` read into `target`'s structure (ShapeDtypeStruct leaves, cast
    to their dtype): jax arrays placed where a leaf carries a sharding, host numpy arrays
    where it does not (an exporter on an accelerator host keeps the model off the devices).
    `partial`: read only `target`'s top-level items (one of a train state's trees). Stored
    shapes are checked first; `where` names the tree in errors."""
    restore_args = jax.tree.map(
        lambda x: (ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                        dtype=x.dtype) if x.sharding is not None
                   else ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype)), target)
    with ocp.PyTreeCheckpointer() as ckptr:
        stored = ckptr.metadata(path).item_metadata.tree
        if partial:
            stored = {k: stored.get(k) for k in target}
        _check_stored_shapes(where or path, stored, target)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(
            item=target, restore_args=restore_args, partial_restore=partial))


def _shapes_by_path(tree: Any) -> dict[tuple[str, ...], tuple[int, ...]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))
    return {tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): tuple(leaf.shape)
            for path, leaf in flat}


def _check_stored_shapes(folder: str, stored: Any, target: Any) -> None:
    """Orbax restores whatever shape was stored, whatever the target says: refuse a
    checkpoint whose arrays do not match the model its config.json describes."""
    have, want = _shapes_by_path(stored), _shapes_by_path(target)
    problems = [f"missing {'/'.join(p)}" for p in sorted(set(want) - set(have))]
    problems += [f"unexpected {'/'.join(p)}" for p in sorted(set(have) - set(want))]
    problems += [f"{'/'.join(p)} stored {have[p]}, expected {want[p]}"
                 for p in sorted(set(want) & set(have)) if have[p] != want[p]]
    if problems:
        more = f" … and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(f"{folder}: parameters do not match config.json: "
                              + "; ".join(problems[:10]) + more)


def abstract_like(tree: Any, dtype=None, shardings: Any = None) -> Any:
    """ShapeDtypeStructs for a tree of arrays; float leaves recast to `dtype` when given."""
    leaves, treedef = jax.tree.flatten(tree)
    placements = jax.tree.leaves(shardings) if shardings is not None else [None] * len(leaves)

    def cast(x):
        return dtype if dtype is not None and jnp.issubdtype(x.dtype, jnp.floating) else x.dtype

    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(x.shape, cast(x), sharding=s)
                                        for x, s in zip(leaves, placements)])
