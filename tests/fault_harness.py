"""Fault injection for tests/test_faults_*.py: SIGKILL at chosen points, NaN batches, and
the shared setup (a tiny corpus, a compilation cache, commands, comparisons).

Run as a script, it is a launcher that arms the faults, then runs a module as `__main__`:

    python tests/fault_harness.py --kill-at save:4 --nan-steps 3,4 -- \\
        unialign_jax.training.cli --config tiny --workdir W ...

Kill points (SIGKILL of the process itself, nothing flushed, nothing cleaned up):
    step:N       right after train step N is dispatched (while it computes)
    save:N       right after the asynchronous save of step N started (arrays in flight)
    data:N       halfway through writing the data-iterator state of step N
    commit:N     after every file of step N is written, just before Orbax commits it
    committed:N  right after step N was committed
    delete:N     halfway through Orbax deleting old step N (max_to_keep)
    write:N      halfway through the N-th file written through unialign_jax.files
    record:N     right after the N-th ArrayRecord record of a shard build was written
(the test kills at random times from outside as well: `time:SECONDS`.)

The suite's size: CI runs a bounded number of trials of every test. UNIALIGN_FAULT_TRIALS=N
makes it a full run: N SIGKILLs of training and of `unialign-data build`, every damage kind
end to end, 4 processes; UNIALIGN_FAULT_CLI_TRIALS=M (default 3 in a full run) SIGKILLs of
each model command line (convert, sample, semgen: each trial loads a pipeline).
UNIALIGN_FAULT_REPORT=FILE appends each test's figures as JSON lines, which
scripts/fault_report.py runs and prints (the README's Reliability figures).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
# One compilation cache for every fault test and run: restarts load, not compile. One per
# pytest-xdist worker: JAX writes an entry in place (no temporary and rename), so a worker
# could read, or a second writer garble, an entry the other is writing.
CACHE = os.path.join(tempfile.gettempdir(), "unialign_jax_fault_tests_cache"
                     + (f"-{os.environ['PYTEST_XDIST_WORKER']}"
                        if os.environ.get("PYTEST_XDIST_WORKER") else ""))


def full() -> bool:
    """A full local run (UNIALIGN_FAULT_TRIALS set): every kind end to end, not CI's subset."""
    return bool(os.environ.get("UNIALIGN_FAULT_TRIALS"))


def trials(ci: int) -> int:
    """SIGKILLs of training or of a shard build: UNIALIGN_FAULT_TRIALS, else CI's `ci`."""
    return int(os.environ.get("UNIALIGN_FAULT_TRIALS") or ci)


def cli_trials(ci: int) -> int:
    """SIGKILLs of one model command line: UNIALIGN_FAULT_CLI_TRIALS, else 3 in a full run,
    else CI's `ci`."""
    return int(os.environ.get("UNIALIGN_FAULT_CLI_TRIALS") or (3 if full() else ci))


def report(name: str, **figures) -> None:
    """Appends one test's figures to $UNIALIGN_FAULT_REPORT (and prints them)."""
    line = json.dumps({"test": name, **figures}, sort_keys=True)
    print(line)
    path = os.environ.get("UNIALIGN_FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def env(**extra) -> dict:
    """A subprocess environment: CPU, the shared compilation cache, quick XLA."""
    return dict(os.environ, JAX_PLATFORMS="cpu",
                XLA_FLAGS="--xla_backend_optimization_level=0",
                UNIALIGN_JAX_COMPILATION_CACHE=CACHE,
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
                PYTHONPATH=os.pathsep.join(p for p in (TESTS, os.environ.get("PYTHONPATH"))
                                           if p),
                **extra)


def build_corpus(root) -> dict:
    """Synthetic shapes (t2i + edit) built into 16 px raw shards, and a tiny tokenizer."""
    from unialign_jax.data import cli as data_cli
    from unialign_jax.data.build.synth import corpus_texts
    from unialign_jax.text.tokenizer import train_tiny_tokenizer

    root = str(root)
    assert data_cli.main(["synth", "--out", f"{root}/synth", "--n", "24", "--size", "16"]) == 0
    for kind in ("t2i", "edit"):
        assert data_cli.main(["build", "--jsonl", f"{root}/synth/{kind}_train.jsonl",
                              "--kind", kind, "--out", f"{root}/{kind}", "--resolution", "16",
                              "--image-format", "raw", "--threads", "1"]) == 0
    train_tiny_tokenizer(corpus_texts(), f"{root}/tokenizer", vocab_size=60)
    return {"root": root, "t2i": f"{root}/t2i", "edit": f"{root}/edit",
            "tokenizer": f"{root}/tokenizer"}


def data_overrides(corpus: dict) -> list[str]:
    """The train overrides that point the tiny config at `corpus`."""
    return [f"models.tokenizer={corpus['tokenizer']}", f"data.t2i_shards=('{corpus['t2i']}',)",
            f"data.edit_shards=('{corpus['edit']}',)"]


def train_args(corpus: dict, workdir, *overrides) -> list[str]:
    """`unialign-train` arguments (module and flags) for the tiny config on `corpus`."""
    return ["unialign_jax.training.cli", "--config", "tiny", "--workdir", str(workdir),
            *data_overrides(corpus), *overrides]


def command(module_args: list[str], *, kill_at: str | None = None,
            nan_steps: tuple[int, ...] = ()) -> list[str]:
    """`python -m MODULE ARGS`, through this launcher when a fault is armed."""
    if kill_at is None and not nan_steps:
        return [sys.executable, "-m", *module_args]
    armed = (["--kill-at", kill_at] if kill_at else []) + (
        ["--nan-steps", ",".join(map(str, nan_steps))] if nan_steps else [])
    return [sys.executable, os.path.join(TESTS, "fault_harness.py"), *armed, "--",
            *module_args]


def python_with_fault(folder, kill_at: str) -> str:
    """An executable that stands in for `python` where a script runs `$PYTHON -m MODULE
    ARGS` (scripts/tpu_worker.sh): it runs MODULE through this launcher, `kill_at` armed."""
    path = os.path.join(str(folder), f"python_killed_at_{kill_at.replace(':', '_')}")
    with open(path, "w") as f:
        f.write(f'#!/bin/sh\n[ "$1" = -m ] && shift\n'
                f'exec {sys.executable} {os.path.join(TESTS, "fault_harness.py")} '
                f'--kill-at {kill_at} -- "$@"\n')
    os.chmod(path, 0o755)
    return path


def run(cmd: list[str], *, kill_after: float | None = None, timeout: float = 600,
        environ: dict | None = None) -> subprocess.CompletedProcess:
    """Runs `cmd` (SIGKILLed after `kill_after` seconds when given); never hangs longer
    than `timeout`."""
    proc = subprocess.Popen(cmd, env=environ or env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    if kill_after is not None:
        try:
            proc.wait(kill_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        raise AssertionError(f"{cmd} hung for {timeout} s:\n{out[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-6000:]}"
    return proc


def timed(cmd, **kw) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = run(cmd, **kw)
    return proc, time.monotonic() - start


def metrics(workdir) -> list[dict]:
    """The logged metrics, less those that depend on the wall clock (`workdir`: a folder
    or a gs:// URL)."""
    from etils import epath

    from unialign_jax.training.trainer import TIMING_METRICS

    text = (epath.Path(workdir) / "metrics.jsonl").read_text()
    rows = [json.loads(line) for line in text.splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING_METRICS} for r in rows]


def saved_state(workdir, step: int):
    """The arrays of a saved train state as numpy (exactly what is on disk, whatever
    devices wrote it)."""
    import jax
    import orbax.checkpoint as ocp

    path = os.path.join(str(workdir), "checkpoints", str(step), "state")
    with ocp.PyTreeCheckpointer() as ckptr:
        tree = ckptr.metadata(path).item_metadata.tree
        as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def data_state(workdir, step: int) -> dict:
    from etils import epath

    folder = epath.Path(workdir) / "checkpoints" / str(step) / "data"
    return {f.name: f.read_text() for f in sorted(folder.iterdir())
            if f.name.startswith("process_")}


def differences(a, b) -> list[str]:
    """Leaves of two pytrees of arrays that are not bit-identical (or differ in structure)."""
    import jax

    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    if [p for p, _ in la] != [p for p, _ in lb]:
        return ["tree structure"]
    return [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(la, lb)
            if not np.array_equal(np.asarray(x), np.asarray(y))
            or np.asarray(x).dtype != np.asarray(y).dtype]


def files_of(folder) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `folder`."""
    out = {}
    for dirpath, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = f.read()
    return out


@pytest.fixture
def small_disks(tmp_path):
    """`mount(size)` → a fresh tmpfs of `size` ("8m"): a disk that really fills up
    (mounting needs root; the test is skipped otherwise). Unmounted afterwards."""
    mounted = []

    def mount(size: str = "8m"):
        path = tmp_path / f"disk{len(mounted)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode:
            pytest.skip("cannot mount a small tmpfs here (needs root)")
        mounted.append(path)
        return path

    yield mount
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.fixture
def small_disk(small_disks):
    """An 8 MiB tmpfs."""
    return small_disks()


def fill(disk, leave_bytes: int) -> None:
    """A ballast file that leaves `leave_bytes` free on `disk` (delete it to free space)."""
    free = shutil.disk_usage(disk).free
    with open(os.path.join(disk, "ballast"), "wb") as f:
        f.write(bytes(max(0, free - leave_bytes)))


# ---- the launcher: arms faults inside the process, then runs the module ----------------

def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _arm_training(kind: str, at: int, nan_steps: set[int]) -> None:
    import dataclasses

    from unialign_jax.training import checkpointing, trainer

    make = trainer.make_train_step

    def make_train_step(*args, **kwargs):
        built = make(*args, **kwargs)

        def step(state, frozen, batch):
            number = int(np.asarray(state.step)) + 1
            if number in nan_steps:
                batch = {**batch, "target": batch["target"] * np.float32("nan")}
            out = built.step(state, frozen, batch)
            if kind == "step" and number == at:
                _die()
            return out

        return dataclasses.replace(built, step=step)

    trainer.make_train_step = make_train_step
    save = checkpointing.Checkpointer.save

    def checkpointer_save(self, step, *args, **kwargs):
        started = save(self, step, *args, **kwargs)
        if kind == "save" and started and step == at:
            _die()
        return started

    checkpointing.Checkpointer.save = checkpointer_save
    if kind in ("data", "commit", "committed", "delete"):
        _arm_orbax(kind, at)


def _arm_orbax(kind: str, at: int) -> None:
    import grain._src.python.checkpoint.handler as grain_handler
    from orbax.checkpoint._src.path import atomicity, deleter

    if kind == "data":
        def save(self, directory, item=None, args=None):
            if not str(directory).split("/")[-2].startswith(f"{at}."):
                return grain_save(self, directory, item, args)
            item = item or args.item
            text = json.dumps(item.get_state(), indent=4)
            (directory / "process_0-of-1.json").write_text(text[:len(text) // 2])
            _die()

        grain_save = grain_handler.CheckpointHandler.save
        grain_handler.CheckpointHandler.save = save
    elif kind in ("commit", "committed"):
        finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize_then_maybe_die(self):
            if kind == "commit" and self.get_final().name == str(at):
                _die()
            await finalize(self)
            if kind == "committed" and self.get_final().name == str(at):
                _die()

        atomicity.AtomicRenameTemporaryPath.finalize = finalize_then_maybe_die
    else:
        delete = deleter.PathDeleter.delete

        def delete_half_then_die(self, path, **kwargs):
            if path.name != str(at):
                return delete(self, path, **kwargs)
            found = sorted(os.path.join(d, n) for d, _, ns in os.walk(path) for n in ns)
            for name in found[:len(found) // 2]:
                os.remove(name)
            _die()

        deleter.PathDeleter.delete = delete_half_then_die


def _arm_writes(kind: str, at: int) -> None:
    from unialign_jax import files

    if kind == "write":
        write_atomic, count = files.write_atomic, [0]

        def write_half_then_die(path, write):
            count[0] += 1
            if count[0] != at:
                return write_atomic(path, write)

            def half(f):
                buffer = io.BytesIO()
                write(buffer)
                f.write(buffer.getvalue()[:len(buffer.getvalue()) // 2])
                f.flush()
                _die()

            return write_atomic(path, half)

        files.write_atomic = write_half_then_die
    elif kind == "record":
        from array_record.python import array_record_module

        writer_class, count = array_record_module.ArrayRecordWriter, [0]

        class CountingWriter:
            def __init__(self, *args):
                self._writer = writer_class(*args)

            def write(self, record):
                self._writer.write(record)
                count[0] += 1
                if count[0] == at:
                    _die()

            def close(self):
                self._writer.close()

        array_record_module.ArrayRecordWriter = CountingWriter


def main(argv: list[str]) -> None:
    import argparse
    import runpy

    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-at", default=None)
    parser.add_argument("--nan-steps", default="")
    args = parser.parse_args(argv[:split])
    module, module_args = argv[split + 1], argv[split + 2:]
    nan_steps = {int(s) for s in args.nan_steps.split(",") if s}
    kind, at = (args.kill_at.split(":") if args.kill_at else ("", "0"))
    if kind in ("write", "record"):
        _arm_writes(kind, int(at))
    elif kind or nan_steps:
        _arm_training(kind, int(at), nan_steps)
    sys.argv = [module, *module_args]
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main(sys.argv[1:])
