"""Training under faults, through the real `unialign-train` in subprocesses: SIGKILL
anywhere (during steps, asynchronous saves, the iterator-state write, commits, deletions,
random times) resumes bit-identically; damaged checkpoints are detected and skipped or
refused; non-finite steps are skipped and counted; a full disk stops cleanly.

Every committed checkpoint a killed run leaves behind is compared, bit for bit, with the
uninterrupted reference run's checkpoint of the same step, so no interrupted save can
pass for complete. UNIALIGN_FAULT_TRIALS sets the number of kills (CI: 3).
"""

import os
import random
import shutil

import numpy as np
import pytest

import fault_harness as fh
from fault_harness import small_disk, small_disks  # noqa: F401 — fixtures
from unialign_jax.checkpoints import training_steps
from unialign_jax.checkpoints.io import CheckpointError
from unialign_jax.training.checkpointing import Checkpointer

STEPS, EVERY = 8, 2
KINDS = ("step", "save", "data", "commit", "committed", "delete", "time")

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fh.build_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def reference(corpus, tmp_path_factory):
    """The uninterrupted run, every checkpoint kept; and how long it took."""
    workdir = tmp_path_factory.mktemp("reference") / "run"
    proc, seconds = fh.timed(fh.command(fh.train_args(
        corpus, workdir, f"run.num_steps={STEPS}", f"run.ckpt_every={EVERY}",
        "run.keep_checkpoints=100")))
    fh.ok(proc)
    return {"workdir": workdir, "seconds": seconds, "metrics": fh.metrics(workdir),
            "states": {s: fh.saved_state(workdir, s) for s in range(EVERY, STEPS + 1, EVERY)}}


def _same_as_reference(reference, workdir, step) -> list[str]:
    problems = fh.differences(reference["states"][step], fh.saved_state(workdir, step))
    if fh.data_state(workdir, step) != fh.data_state(reference["workdir"], step):
        problems.append("data iterator state")
    return problems


def _next_point(kind: str, resumed: int, rng: random.Random, seconds: float):
    """A kill point of `kind` that the next run (resuming at `resumed`) reaches; None if
    none is left."""
    saves = [s for s in range(EVERY, STEPS + 1, EVERY) if s > resumed]
    choices = {"step": list(range(resumed + 1, STEPS + 1)), "save": saves, "data": saves,
               "commit": saves, "committed": saves,
               # with keep_checkpoints=2, step s is deleted when s + 2·EVERY commits
               "delete": [s for s in range(EVERY, STEPS + 1, EVERY)
                          if s + 2 * EVERY > resumed and s + 2 * EVERY <= STEPS]}
    if kind == "time":
        return f"time:{rng.uniform(0.5, 0.75 * seconds):.2f}"  # mostly before it ends
    return f"{kind}:{rng.choice(choices[kind])}" if choices[kind] else None


def test_sigkill_anywhere_resumes_bit_identically(corpus, reference, tmp_path):
    total = fh.trials(3)
    kinds = KINDS if fh.full() else KINDS[:3]  # CI: during a step, a save, the data write
    rng = random.Random(0)
    tally, mid_save, half_deleted, chain, attempts, killed = {}, 0, 0, 0, 0, 0
    while killed < total and attempts < 2 * total:
        chain += 1
        workdir = tmp_path / f"chain{chain}"
        args = fh.train_args(corpus, workdir, f"run.num_steps={STEPS}",
                             f"run.ckpt_every={EVERY}", "run.keep_checkpoints=2")
        for _ in range(6):
            resumed = training_steps.latest_valid_step(str(workdir)) or 0
            point = _next_point(kinds[attempts % len(kinds)], resumed, rng,
                                reference["seconds"])
            if point is None or killed == total:
                break
            attempts += 1
            kind, at = point.split(":")
            if kind == "time":
                proc = fh.run(fh.command(args), kill_after=float(at))
            else:
                proc = fh.run(fh.command(args, kill_at=point))
            if proc.returncode == 0:  # a random time after the run finished
                tally["finished first"] = tally.get("finished first", 0) + 1
                break
            assert proc.returncode == -9, f"{point}: exit {proc.returncode}\n{proc.stdout[-4000:]}"
            mid_save += bool(training_steps.uncommitted(str(workdir)))
            # The newest committed step is complete and exactly the reference's, as is every
            # other valid one; a damaged one can only be an old step Orbax was deleting
            # (max_to_keep), superseded by a newer valid one, so a restart never picks it.
            checks = training_steps.step_checks(str(workdir))
            if checks:
                assert checks[0].valid, f"after {point}: {checks[0].describe()}"
            for check in checks:
                if check.valid:
                    assert _same_as_reference(reference, workdir, check.step) == [], point
                else:
                    half_deleted += 1
            tally[kind] = tally.get(kind, 0) + 1
            killed += 1
        fh.ok(fh.run(fh.command(args)))
        assert _same_as_reference(reference, workdir, STEPS) == []
        assert fh.metrics(workdir) == reference["metrics"]
    assert killed == total, tally
    fh.report("sigkill_training", kills=killed, resumed_bit_identical=killed, by_point=tally,
              left_an_uncommitted_save=mid_save, left_a_half_deleted_old_step=half_deleted,
              chains=chain)


# ---- damaged checkpoints -----------------------------------------------------------------

def _largest(folder):
    found = [os.path.join(d, n) for d, _, ns in os.walk(folder) for n in ns]
    return max(found, key=os.path.getsize)


def _truncate(path):
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)


def _flip(path):
    data = bytearray(open(path, "rb").read())
    data[len(data) // 3] ^= 0x04
    open(path, "wb").write(bytes(data))


def _zero(path):
    open(path, "wb").write(bytes(os.path.getsize(path)))


# name → (damage(step folder), what the error names)
DAMAGE = {
    "uncommitted": (lambda p: os.remove(f"{p}/commit_success.txt"), "commit_success.txt"),
    "no step metadata": (lambda p: os.remove(f"{p}/_CHECKPOINT_METADATA"),
                         "_CHECKPOINT_METADATA"),
    "cut step metadata": (lambda p: _truncate(f"{p}/_CHECKPOINT_METADATA"),
                          "_CHECKPOINT_METADATA is truncated"),
    "no state item": (lambda p: shutil.rmtree(f"{p}/state"), "missing the 'state' item"),
    "no data item": (lambda p: shutil.rmtree(f"{p}/data"), "missing the 'data' item"),
    "cut iterator state": (lambda p: _truncate(f"{p}/data/process_0-of-1.json"),
                           "data/process_0-of-1.json is truncated"),
    "no array metadata": (lambda p: os.remove(f"{p}/state/_METADATA"), "state/_METADATA"),
    "no array index": (lambda p: os.remove(f"{p}/state/manifest.ocdbt"),
                       "state/manifest.ocdbt"),
    "cut array data": (lambda p: _truncate(_largest(f"{p}/state/ocdbt.process_0/d")),
                       "unreadable"),
    "lost array data": (lambda p: os.remove(_largest(f"{p}/state/ocdbt.process_0/d")),
                        "unreadable"),
    "zeroed array data": (lambda p: _zero(_largest(f"{p}/state/ocdbt.process_0/d")),
                          "unreadable"),
    "flipped bit": (lambda p: _flip(_largest(f"{p}/state/ocdbt.process_0/d")),
                    "differ from the fingerprint"),
    "empty step folder": (lambda p: [shutil.rmtree(f"{p}/{n}") if os.path.isdir(f"{p}/{n}")
                                     else os.remove(f"{p}/{n}") for n in os.listdir(p)],
                          "missing the 'state' item"),
}


@pytest.fixture(scope="module")
def six_steps(reference, tmp_path_factory):
    """A finished 6-step run (checkpoints 4 and 6): the reference's folder, cut back."""
    workdir = tmp_path_factory.mktemp("six") / "run"
    shutil.copytree(reference["workdir"], workdir)
    for step in (2, 8):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    return workdir


def _damaged_copy(six_steps, tmp_path, kind):
    workdir = tmp_path / kind.replace(" ", "_")
    shutil.copytree(six_steps, workdir)
    DAMAGE[kind][0](str(workdir / "checkpoints" / "6"))
    return workdir


def _resume_six(corpus, workdir, *overrides):
    return fh.run(fh.command(fh.train_args(corpus, workdir, "run.num_steps=6",
                                           f"run.ckpt_every={EVERY}",
                                           "run.keep_checkpoints=2", *overrides)))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # Orbax's
def test_every_kind_of_damage_is_detected(six_steps, tmp_path):  # failed reads, in-process
    """In-process: the structural check or the restore + fingerprint catches each kind."""
    import orbax.checkpoint as ocp

    caught = []
    for kind, (_, names) in DAMAGE.items():
        workdir = _damaged_copy(six_steps, tmp_path, kind)
        check = training_steps.check_step(str(workdir), 6)
        if check.valid:  # the files look whole: the bytes must give it away
            try:
                with ocp.StandardCheckpointer() as ckptr:
                    state = ckptr.restore(str(workdir / "checkpoints" / "6" / "state"))
                bad = training_steps.fingerprint_mismatches(
                    state, training_steps.recorded_fingerprint(str(workdir), 6))
            except Exception:  # noqa: BLE001 — unreadable is detected as well
                bad = ["unreadable"]
            assert bad, kind
        else:
            assert names in check.describe(), (kind, check.describe())
        assert training_steps.valid_steps(str(workdir)) in ([4], [4, 6]), kind
        caught.append(kind)
    assert training_steps.valid_steps(str(six_steps)) == [4, 6]
    fh.report("damage_detected", kinds=len(DAMAGE), detected=len(caught))


def test_damaged_latest_checkpoint_falls_back_to_the_newest_intact(corpus, reference,
                                                                   six_steps, tmp_path):
    """The hardest kind: every file whole, one flipped bit (full runs do every kind)."""
    _assert_falls_back(corpus, reference, six_steps, tmp_path, "flipped bit")


def _assert_falls_back(corpus, reference, six_steps, tmp_path, kind):
    workdir = _damaged_copy(six_steps, tmp_path, kind)
    proc = fh.ok(_resume_six(corpus, workdir))
    assert "skipping damaged checkpoint step 6" in proc.stdout
    assert DAMAGE[kind][1] in proc.stdout, proc.stdout[-3000:]
    assert "resuming from step 4" in proc.stdout
    assert _same_as_reference(reference, workdir, 6) == []
    assert fh.metrics(workdir) == reference["metrics"][:6]
    aside = os.listdir(workdir / "corrupt_checkpoints")
    assert len(aside) == 1 and aside[0].startswith("6-")


def test_every_damage_falls_back_end_to_end(corpus, reference, six_steps, tmp_path):
    """Full runs only (UNIALIGN_FAULT_TRIALS set): every kind through the real trainer."""
    if not fh.full():
        pytest.skip("set UNIALIGN_FAULT_TRIALS to run every damage kind end to end")
    for kind in DAMAGE:
        _assert_falls_back(corpus, reference, six_steps, tmp_path, kind)
    fh.report("damage_fallback", kinds=len(DAMAGE), resumed_from_newest_intact=len(DAMAGE))


def test_latest_only_stops_and_all_damaged_never_restarts_from_scratch(corpus, six_steps,
                                                                       tmp_path):
    workdir = _damaged_copy(six_steps, tmp_path, "no data item")
    proc = _resume_six(corpus, workdir, "run.resume=latest-only")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "the latest checkpoint is damaged: step 6" in proc.stdout
    assert "missing the 'data' item" in proc.stdout
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"], "nothing was touched"

    # Every checkpoint damaged (in-process: these damages need no restore to be seen).
    DAMAGE["no state item"][0](str(workdir / "checkpoints" / "4"))
    ckpt = Checkpointer(str(workdir), every=EVERY, keep=2)
    try:
        with pytest.raises(CheckpointError, match="no intact checkpoint .*Refusing to start "
                                                  "from scratch"):
            ckpt.restore_latest(None, None)
    finally:
        ckpt.finish()
    assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "6"]
    assert not os.path.exists(workdir / "corrupt_checkpoints")


# ---- non-finite steps ---------------------------------------------------------------------

def test_nonfinite_steps_skip_their_update_and_too_many_stop_the_run(corpus, reference,
                                                                     tmp_path):
    """NaN targets in the batches of steps 3, 4 (two in a row: skipped, run goes on) and
    6, 7, 8 (three in a row with run.max_nonfinite_steps=3: skipped, then the run stops)."""
    bad = (3, 4, 6, 7, 8)
    workdir = tmp_path / "nan"
    proc = fh.run(fh.command(fh.train_args(
        corpus, workdir, "run.num_steps=10", "run.ckpt_every=1", "run.keep_checkpoints=100",
        "run.max_nonfinite_steps=3"), nan_steps=bad))
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert ("3 consecutive steps (6..8) had a non-finite loss or gradient norm "
            "(run.max_nonfinite_steps=3)") in proc.stdout
    assert "the parameters are those of step 5" in proc.stdout and "records" in proc.stdout

    rows = fh.metrics(workdir)
    assert [r["step"] for r in rows] == list(range(1, 8))  # step 8 stopped the run
    assert [r["nonfinite_steps"] for r in rows] == [float(s in bad) for s in range(1, 8)]
    assert all(np.isnan(r["loss"]) == (r["step"] in bad) for r in rows)
    assert rows[:2] == reference["metrics"][:2]
    assert fh.differences(fh.saved_state(workdir, 2), reference["states"][2]) == []
    unchanged = 0
    for before, skipped in ((2, (3, 4)), (5, (6, 7))):
        kept = fh.saved_state(workdir, before)
        for step in skipped:
            after = fh.saved_state(workdir, step)
            for key in ("params", "opt_state", "ema_params"):
                assert fh.differences(kept[key], after[key]) == [], (step, key)
            assert int(after["step"]) == step
            assert not np.array_equal(after["rng"], kept["rng"])  # the PRNG moves on
            unchanged += 1
    assert fh.differences(fh.saved_state(workdir, 2)["params"],
                          fh.saved_state(workdir, 5)["params"]) != [], "step 5 trained"
    fh.report("nonfinite", injected_steps=len(bad), skipped_and_counted=len(bad),
              params_optimizer_ema_unchanged=unchanged, stopped_after_consecutive=3)


# ---- a full disk -----------------------------------------------------------------------------



def test_disk_full_during_a_save_keeps_the_previous_checkpoint(
        corpus, reference, small_disk):  # noqa: F811 — a fixture
    workdir = small_disk / "run"
    fh.fill(small_disk, 2_600_000)  # one checkpoint (1.8 MB) fits, the second does not
    args = fh.train_args(corpus, workdir, "run.num_steps=6", f"run.ckpt_every={EVERY}",
                         "run.keep_checkpoints=2")
    proc = fh.run(fh.command(args))
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "no space left on device writing" in proc.stdout
    assert "the newest checkpoint, step 2, is intact" in proc.stdout
    assert training_steps.uncommitted(str(workdir)) == [], "the failed save is removed"
    assert training_steps.valid_steps(str(workdir)) == [2]
    assert _same_as_reference(reference, workdir, 2) == []

    os.remove(small_disk / "ballast")
    fh.ok(fh.run(fh.command(args)))
    assert _same_as_reference(reference, workdir, 6) == []
    assert fh.metrics(workdir) == reference["metrics"][:6]
    fh.report("enospc_checkpoint", clean_error=1, previous_intact=1, rerun_completed=1)
