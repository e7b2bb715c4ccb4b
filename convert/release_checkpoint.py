"""The training checkpoints of the release's `train.py`: where the weights are, and their step.

`train.py` saves every `ckpt_every` steps into `RESULTS/checkpoints/NNNNNNN/`, numbered one
past the updates done (`{step + 1:07d}`: 5000 updates → `0005001/`; lines 671-703 of the
release's train.py): `consolidated.00-of-01.safetensors` (FSDP's full state dict
of `SD3JointModelFlexible`, unprefixed keys, with metadata `step`), the per-rank
`optimizer.*.pth`, `scheduler.pth`, `model_args.pth` and, written last, `resume_step.txt`
(the same step). Only the safetensors file and the step are read here; there is no
config.json, so the model's configuration comes from elsewhere (`--config`).
"""

from __future__ import annotations

import dataclasses
import os
import re

from unialign_convert.safetensors_io import ConversionError

WEIGHTS_FILE = "consolidated.00-of-01.safetensors"
STEP_FILE = "resume_step.txt"  # written last: a step folder without it is unfinished
CHECKPOINTS_DIR = "checkpoints"  # under train.py's --results_dir
_CONSOLIDATED = re.compile(r"consolidated\.(\d+)-of-(\d+)\.safetensors")


@dataclasses.dataclass(frozen=True)
class ReleaseCheckpoint:
    folder: str          # the step folder
    weights: str         # its consolidated safetensors file
    step: int | None     # from resume_step.txt, else the folder's name; None if neither


def _is_step_folder(folder: str) -> bool:
    return any(_CONSOLIDATED.fullmatch(n) or n == STEP_FILE for n in os.listdir(folder))


def _step_folders(folder: str) -> dict[int, str]:
    """{step: path} of the NNNNNNN/ sub-folders of a checkpoints folder."""
    return {int(n): os.path.join(folder, n) for n in os.listdir(folder)
            if n.isdigit() and os.path.isdir(os.path.join(folder, n))}


def is_release_checkpoint(path: str) -> bool:
    """Whether `path` is a step folder, a checkpoints folder or a results folder of train.py."""
    if not os.path.isdir(path):
        return False
    run = os.path.join(path, CHECKPOINTS_DIR)
    return (_is_step_folder(path) or any(map(_is_step_folder, _step_folders(path).values()))
            or (os.path.isdir(run) and bool(_step_folders(run))))


def _read_step(folder: str) -> int | None:
    path = os.path.join(folder, STEP_FILE)
    if not os.path.exists(path):
        name = os.path.basename(os.path.normpath(folder))
        return int(name) if name.isdigit() else None
    with open(path) as f:
        text = f.read().strip()
    if not text.isdigit():
        raise ConversionError(f"{path}: expected the step number, found {text[:40]!r}")
    return int(text)


def _weights(folder: str) -> str:
    path = os.path.join(folder, WEIGHTS_FILE)
    if os.path.isfile(path):
        return path
    found = sorted(n for n in os.listdir(folder) if _CONSOLIDATED.fullmatch(n))
    if found:
        raise ConversionError(
            f"{folder}: holds {found}, a model-parallel checkpoint (train.py "
            "--model_parallel_size > 1); only the single-file "
            f"{WEIGHTS_FILE} that the default --model_parallel_size 1 writes is supported")
    raise ConversionError(f"{folder}: no {WEIGHTS_FILE} (the weights train.py saves in each "
                          f"step folder); files present: {sorted(os.listdir(folder)) or 'none'}")


def locate(path: str, step: int | None = None) -> ReleaseCheckpoint:
    """The checkpoint at `path`: a step folder itself, or in a run (train.py's --results_dir
    or its checkpoints/ folder) the step folder of `step`, by default the newest finished one
    (with its resume_step.txt, which train.py writes last)."""
    if not os.path.isdir(path):
        raise ConversionError(f"{path}: no such checkpoint folder")
    if _is_step_folder(path):
        found = _read_step(path)
        if step is not None and step != found:
            raise ConversionError(f"{path} is the checkpoint of step {found}, not --step {step}")
        return ReleaseCheckpoint(path, _weights(path), found)
    run = os.path.join(path, CHECKPOINTS_DIR)
    folders = _step_folders(run if os.path.isdir(run) else path)
    if step is not None:
        if step not in folders:
            raise ConversionError(f"{path}: no checkpoint of step {step}; steps present: "
                                  f"{sorted(folders) or 'none'}")
        chosen = folders[step]
    else:
        finished = [s for s, f in folders.items() if os.path.exists(os.path.join(f, STEP_FILE))]
        if not finished:
            raise ConversionError(
                f"{path}: no finished checkpoint (an NNNNNNN/ folder with {WEIGHTS_FILE} and "
                f"{STEP_FILE}, as train.py writes under --results_dir/{CHECKPOINTS_DIR}/)")
        chosen = folders[max(finished)]
    return ReleaseCheckpoint(chosen, _weights(chosen), _read_step(chosen))
