"""Which checkpoints of a training work dir are complete and readable, newest first.

`unialign-train` writes `WORKDIR/checkpoints/STEP/` through Orbax: each step is saved into
a temporary `STEP.orbax-checkpoint-tmp` folder and committed by writing
`commit_success.txt` and renaming it (on GCS, which has no atomic rename, Orbax writes into
`STEP/` itself and commits by the commit file alone). A SIGKILL during a save therefore
leaves only a temporary folder (on GCS: a step folder without the commit file), which is
never a step. What Orbax cannot see is damage after the commit — a copy that lost files,
a truncated file, flipped bits — so the trainer and the readers of runs (`runs.work_dir`,
`unialign-convert from-run`) ask here before trusting a step:

    valid_steps(workdir)         [2, 4, 6]: committed steps whose files are all there
    latest_valid_step(workdir)   6, or None
    step_checks(workdir)         every committed step, newest first, with its problems

These are structural checks (every file Orbax and Grain write is present, non-empty and
parses); they read metadata only. Array bytes are covered by a fingerprint: every save
records a 32-bit position-weighted sum of each array's bits in the step's metadata
(`fingerprint`), and a restore recomputes it (`fingerprint_mismatches`), which catches
truncated, zeroed or bit-flipped array data that still deserialises.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

CHECKPOINT_DIR = "checkpoints"
ITEMS = ("state", "data")
COMMIT_FILE = "commit_success.txt"       # Orbax's commit marker (both atomicity modes)
STEP_METADATA = "_CHECKPOINT_METADATA"   # Orbax's per-step metadata (JSON)
TMP_SUFFIX = ".orbax-checkpoint-tmp"     # Orbax's uncommitted folders
FINGERPRINT_KEY = "state_fingerprint"    # custom metadata: {leaf path: uint32}
# Files of an Orbax OCDBT array item and of a Grain iterator item.
_STATE_JSON = ("_METADATA", "_sharding")
_STATE_INDEX = "manifest.ocdbt"
_DATA_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")


@dataclasses.dataclass(frozen=True)
class StepCheck:
    """One committed step folder and what is wrong with it (nothing: it is valid)."""

    step: int
    path: str
    problems: tuple[str, ...] = ()

    @property
    def valid(self) -> bool:
        return not self.problems

    def describe(self) -> str:
        return f"step {self.step} ({self.path}): " + ("; ".join(self.problems) or "valid")


def checkpoint_dir(workdir: str) -> epath.Path:
    return epath.Path(workdir) / CHECKPOINT_DIR


def _unfinished_in_place(workdir: str, step_folder: epath.Path) -> bool:
    """Whether `step_folder` is a save Orbax is writing, or stopped writing, in place: on
    GCS (`gs://`, no atomic rename there) Orbax writes a step straight into its final folder
    and commits it by the commit file alone, so a step folder without one is no step."""
    return str(workdir).startswith("gs://") and not (step_folder / COMMIT_FILE).exists()


def committed_steps(workdir: str) -> list[int]:
    """Step folders (named by their step, as Orbax names them), ascending."""
    folder = checkpoint_dir(workdir)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and p.is_dir()
                  and not _unfinished_in_place(workdir, p))


def uncommitted(workdir: str) -> list[epath.Path]:
    """Folders of saves that never committed (interrupted), which Orbax ignores."""
    folder = checkpoint_dir(workdir)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if TMP_SUFFIX in p.name
                  or (p.name.isdigit() and _unfinished_in_place(workdir, p)))


def check_step(workdir: str, step: int) -> StepCheck:
    """The problems of one committed step folder, from its files alone."""
    path = checkpoint_dir(workdir) / str(step)
    problems = []
    if not (path / COMMIT_FILE).exists():
        problems.append(f"no {COMMIT_FILE} (the save never committed)")
    problems += _json_problems(path, (STEP_METADATA,))
    for item in ITEMS:
        if not (path / item).is_dir():
            problems.append(f"missing the '{item}' item")
    if (path / "state").is_dir():
        problems += _state_problems(path / "state")
    if (path / "data").is_dir():
        problems += _data_problems(path / "data")
    return StepCheck(step, str(path), tuple(problems))


def step_checks(workdir: str) -> list[StepCheck]:
    """Every committed step of `workdir`, newest first, each with its problems."""
    return [check_step(workdir, s) for s in reversed(committed_steps(workdir))]


def valid_steps(workdir: str) -> list[int]:
    """Committed steps whose files are all present and readable, ascending."""
    return sorted(c.step for c in step_checks(workdir) if c.valid)


def latest_valid_step(workdir: str) -> int | None:
    steps = valid_steps(workdir)
    return steps[-1] if steps else None


def _json_problems(folder: epath.Path, names) -> list[str]:
    problems = []
    for name in names:
        file = folder / name
        if not file.exists():
            problems.append(f"missing {_rel(file)}")
            continue
        try:
            json.loads(file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            problems.append(f"{_rel(file)} is truncated or corrupt ({e})")
    return problems


def _state_problems(state: epath.Path) -> list[str]:
    problems = _json_problems(state, _STATE_JSON)
    index = state / _STATE_INDEX
    if not index.exists() or index.stat().length == 0:
        problems.append(f"missing or empty {_rel(index)}")
    data = state / "d"
    if not data.is_dir() or not any(True for _ in data.iterdir()):
        problems.append(f"no array data files in {_rel(data)}")
    else:
        problems += [f"empty array data file {_rel(f)}" for f in data.iterdir()
                     if f.stat().length == 0]
    return problems


def _data_problems(data: epath.Path) -> list[str]:
    """Grain writes one `process_I-of-N.json` per host: all N must be there and parse."""
    found = {}
    for f in data.iterdir():
        match = _DATA_FILE.fullmatch(f.name)
        if match:
            found[int(match.group(1))] = int(match.group(2))
    if not found:
        return [f"no iterator state files (process_*-of-*.json) in {_rel(data)}"]
    count = max(found.values())
    missing = sorted(set(range(count)) - set(found))
    problems = [f"missing iterator state of process {i} in {_rel(data)}" for i in missing]
    return problems + _json_problems(data, [f"process_{i}-of-{n}.json"
                                            for i, n in sorted(found.items())])


def _rel(path: epath.Path) -> str:
    """`path` from its step folder on (`state/_METADATA`), for messages."""
    parts = path.parts
    step = next((i for i in range(len(parts) - 1, -1, -1) if parts[i].isdigit()), 0)
    return "/".join(parts[step + 1:])


def recorded_fingerprint(workdir: str, step: int) -> dict[str, int] | None:
    """The array fingerprint saved with `step` (None: saved without one)."""
    meta = json.loads((checkpoint_dir(workdir) / str(step) / STEP_METADATA).read_text())
    return (meta.get("custom_metadata") or {}).get(FINGERPRINT_KEY)


def leaf_name(path) -> str:
    """'params/blocks/attn/kernel' for a pytree key path (dataclass fields, dict keys and
    sequence indices alike), so that a partial restore can check the leaves it read."""
    return "/".join(str(getattr(k, "name", getattr(k, "key", getattr(k, "idx", k))))
                    for k in path)


def fingerprint(tree: Any) -> dict[str, int]:
    """{leaf name: uint32} for every array leaf: Σ bits(x[i]) · (2i + 1) mod 2³², so any
    change of one element (one flipped bit included) changes it. Computed where the
    arrays live (sharded arrays stay sharded); integer sums are exact in any order."""
    named = jax.tree_util.tree_leaves_with_path(tree)
    sums = jax.device_get(_fingerprints([x for _, x in named]))
    return {leaf_name(p): int(s) for (p, _), s in zip(named, sums)}


def fingerprint_mismatches(tree: Any, recorded: dict[str, int]) -> list[str]:
    """Names of the leaves of `tree` whose fingerprint differs from `recorded` (leaves
    `recorded` does not name are not checked)."""
    now = fingerprint(tree)
    return [name for name, value in now.items() if name in recorded and recorded[name] != value]


@jax.jit
def _fingerprints(leaves: list) -> list:
    return [_leaf_fingerprint(x) for x in leaves]


def _leaf_fingerprint(x: jax.Array) -> jax.Array:
    bits = _as_uint32(x)
    index = jnp.zeros(bits.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(bits.ndim)):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, bits.shape, axis) * np.uint32(
            stride % 2 ** 32)
        stride *= bits.shape[axis]
    return jnp.sum(bits * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of each element as uint32 (8-byte types keep both halves, as a last axis)."""
    x = jnp.asarray(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = x.dtype.itemsize
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[size]
    bits = jax.lax.bitcast_convert_type(x, unsigned)
    return bits.astype(jnp.uint32)
