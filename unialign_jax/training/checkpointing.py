"""Training checkpoints: Orbax CheckpointManager over the train state and the data
iterator, asynchronous saves every N steps, keep K, save on preemption (SIGTERM), and a
resume that trusts only checkpoints it has verified.

Each checkpoint holds two items: `state` (step, parameters, AdamW moments, EMA, PRNG) and
`data` (the Grain iterator's position, one file per host), so a resumed run sees exactly
the batches an uninterrupted run would have seen. Orbax writes each step to a temporary
folder and commits it when complete: a SIGKILL mid-save never leaves a checkpoint that a
restart picks (leftover temporary folders are deleted when the next run starts). Damage
after the commit (missing or truncated files, flipped bits) is found on resume by
`checkpoints.training_steps` and the fingerprint saved with each step; the run then falls
back to the newest intact checkpoint (`run.resume="latest-valid"`, with a warning naming
the damage; the damaged folder is moved to WORKDIR/corrupt_checkpoints/) or stops
(`"latest-only"`). It never starts from scratch over a run that has checkpoints.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import threading
import time

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

from unialign_jax import files
from unialign_jax.checkpoints import training_steps
from unialign_jax.checkpoints.io import CheckpointError
from unialign_jax.checkpoints.training_steps import CHECKPOINT_DIR, FINGERPRINT_KEY, StepCheck

log = logging.getLogger(__name__)

QUARANTINE_DIR = "corrupt_checkpoints"
# Orbax's messages for a failed read carry the whole TensorStore spec: keep the start.
_MAX_ERROR_CHARS = 300


class Checkpointer:
    def __init__(self, workdir: str, *, every: int, keep: int, use_async: bool = True):
        self.workdir = _absolute(workdir)
        self.directory = _absolute(os.path.join(workdir, CHECKPOINT_DIR))
        self.every, self._finished = every, False
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=use_async)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def save(self, step: int, state, iterator, *, force: bool = False) -> bool:
        """Starts saving `step` if it is a multiple of `every` (or `force`); returns whether
        it did. Arrays are copied off the devices (and fingerprinted) before returning;
        writing continues in the background."""
        if not (force or step % self.every == 0) or step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)),
            custom_metadata={FINGERPRINT_KEY: training_steps.fingerprint(state)}, force=True)

    def restore(self, step: int, abstract_state, iterator):
        """The state of `step`, placed like `abstract_state`'s shardings and checked against
        its saved fingerprint; `iterator` is moved to the saved position in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(iterator)))
        state = restored["state"]
        recorded = training_steps.recorded_fingerprint(self.workdir, step)
        bad = training_steps.fingerprint_mismatches(state, recorded or {})
        if bad:
            more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
            raise CheckpointError(f"array data differ from the fingerprint saved with the "
                                  f"checkpoint (corrupt bytes) in {', '.join(bad[:5])}{more}")
        return state

    def restore_latest(self, abstract_state, iterator, *, mode: str = "latest-valid"):
        """(state, step) of the newest checkpoint that is complete and reads back intact;
        (None, None) when there is none at all. Damaged newer ones are skipped with a
        warning and moved aside (`mode="latest-valid"`), or stop the run
        (`"latest-only"`); a run whose checkpoints are all damaged stops too."""
        damaged: list[StepCheck] = []
        for check in training_steps.step_checks(self.workdir):
            if check.valid:
                try:
                    state = self.restore(check.step, abstract_state, iterator)
                except Exception as e:  # noqa: BLE001 — any failure to read means damaged
                    check = StepCheck(check.step, check.path,
                                      (f"unreadable: {_short(e)}",))
                else:
                    self._set_aside(damaged)
                    return state, check.step
            if mode == "latest-only":
                raise CheckpointError(
                    f"the latest checkpoint is damaged: {check.describe()}. "
                    "run.resume='latest-only' forbids falling back to an older one; set "
                    "run.resume='latest-valid' to resume from the newest intact checkpoint")
            log.warning("skipping damaged checkpoint %s", check.describe())
            damaged.append(check)
        if damaged:
            raise CheckpointError(
                f"no intact checkpoint in {self.directory}: "
                + " | ".join(c.describe() for c in damaged)
                + ". Refusing to start from scratch over an existing run: restore the "
                "checkpoints, or move the folder away to start over")
        return None, None

    def _set_aside(self, damaged: list[StepCheck]) -> None:
        """Moves damaged step folders to WORKDIR/corrupt_checkpoints/ (kept for inspection),
        so that the resumed run can save those steps again."""
        if not damaged:
            return
        if jax.process_index() == 0:
            target = epath.Path(self.workdir) / QUARANTINE_DIR
            target.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for check in damaged:
                epath.Path(check.path).rename(target / f"{check.step}-{stamp}")
                log.warning("moved damaged checkpoint %d to %s", check.step, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("unialign_set_aside_damaged_checkpoints")
        self.manager.reload()

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption notice agreed by all hosts (jax.distributed's service)."""
        return self.manager.reached_preemption(step)

    def finish(self) -> None:
        """Waits for pending saves (raising what failed in them) and closes the manager;
        later calls do nothing."""
        if self._finished:
            return
        self._finished = True
        try:
            self.manager.wait_until_finished()
        finally:
            self.manager.close()

    def discard_unfinished(self, rounds: int = 5) -> None:
        """Deletes the folders of saves that failed before committing (a full disk): they
        are never restored, and they hold the space the next save needs. Call after
        `finish`. Writes Orbax no longer waits for can still make a folder (see
        `files.remove_tree`), also one not there yet when listed: list again until none is
        left; PartialLeftBehind when some still are after `rounds`."""
        if jax.process_index() != 0:
            return
        for _ in range(rounds):
            left = training_steps.uncommitted(self.workdir)
            if not left:
                return
            for path in left:
                files.remove_tree(str(path))
        left = training_steps.uncommitted(self.workdir)
        if not left:
            return
        raise files.PartialLeftBehind(
            errno.EBUSY, f"could not remove the failed saves {[str(p) for p in left]}: "
            "writers kept making them again; delete them by hand")


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def _short(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".replace("\n", " ")
    return text if len(text) <= _MAX_ERROR_CHARS else text[:_MAX_ERROR_CHARS] + " …"


class PreemptionSignal:
    """Turns SIGTERM (what Cloud TPU and schedulers send before preemption) and SIGINT
    (Ctrl-C) into a flag the training loop polls once per step, so the current step finishes
    and a checkpoint is written before exiting. A second Ctrl-C stops at once (Python's
    KeyboardInterrupt), for a user who will not wait for the step. Restores the previous
    handlers on exit."""

    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.signals, self._previous, self._event = signals, {}, threading.Event()
        self.signum: int | None = None  # the first signal received

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            log.warning("interrupted: saving a checkpoint after this step (Ctrl-C again to "
                        "stop at once, losing the steps since the last checkpoint)")
        else:
            log.warning("received signal %d: saving a checkpoint after this step", signum)
        self._event.set()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        return False
