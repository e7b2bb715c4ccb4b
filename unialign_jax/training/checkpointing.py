"""Training checkpoints: Orbax CheckpointManager over the train state and the data
iterator, asynchronous saves every N steps, keep K, save on preemption (SIGTERM).

Each checkpoint holds two items: `state` (step, parameters, AdamW moments, EMA, PRNG) and
`data` (the Grain iterator's position, one file per host), so a resumed run sees exactly
the batches an uninterrupted run would have seen. Orbax writes each step to a temporary
folder and renames it when complete: a crash mid-save never leaves a checkpoint that
`latest_step` would pick.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

import grain
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"


class Checkpointer:
    def __init__(self, workdir: str, *, every: int, keep: int, use_async: bool = True):
        self.directory = _absolute(os.path.join(workdir, CHECKPOINT_DIR))
        self.every = every
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True,
            enable_async_checkpointing=use_async)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, iterator, *, force: bool = False) -> bool:
        """Starts saving `step` if it is a multiple of `every` (or `force`); returns whether
        it did. Arrays are copied off the devices before returning; writing continues in
        the background."""
        if not (force or step % self.every == 0) or step in self.manager.all_steps():
            return False
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(iterator)),
            force=True)

    def restore(self, step: int, abstract_state, iterator):
        """The state of `step`, placed like `abstract_state`'s shardings; `iterator` is moved
        to the saved position in place."""
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=grain.checkpoint.CheckpointRestore(iterator)))
        return restored["state"]

    def reached_preemption(self, step: int) -> bool:
        """Multi-host preemption notice agreed by all hosts (jax.distributed's service)."""
        return self.manager.reached_preemption(step)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


class PreemptionSignal:
    """Turns SIGTERM (what Cloud TPU and schedulers send before preemption) into a flag the
    training loop polls once per step, so the current step finishes and a checkpoint is
    written before exiting. Restores the previous handler on exit."""

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signals, self._previous, self._event = signals, {}, threading.Event()

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def _handle(self, signum, frame):
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
