"""A training run whose work dir is a GCS bucket, as on a TPU pod (scripts/tpu_launch.sh),
with the bucket emulated on 127.0.0.1 (tests/gcs_emulator.py says how each library is
pointed at it): the config, metrics.jsonl, TensorBoard events, Orbax checkpoints (array
data through TensorStore's gcs driver, metadata and Grain's iterator state through gcsfs),
old checkpoints deleted (max_to_keep), a SIGKILL during an asynchronous save, and the
resume — bit for bit the checkpoint and metrics of an uninterrupted run in the same bucket.

What an emulator cannot show (real GCS latency, throttling, IAM, a preempted VM) is listed
in the README's section on the pod's work dir.
"""

import os

import pytest
from etils import epath

import fault_harness as fh
from gcs_emulator import gcs_bucket  # noqa: F401 — a fixture
from unialign_jax import files
from unialign_jax.checkpoints import training_steps

STEPS, EVERY, KEEP = 6, 2, 2

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return fh.build_corpus(tmp_path_factory.mktemp("corpus"))


def _train(corpus, bucket, workdir, kill_at=None):
    """The tiny config with TensorBoard on, as a pod run writes it."""
    return fh.run(fh.command(fh.train_args(corpus, workdir, f"run.num_steps={STEPS}",
                                           f"run.ckpt_every={EVERY}",
                                           f"run.keep_checkpoints={KEEP}",
                                           "run.tensorboard=True"), kill_at=kill_at),
                  environ=fh.env(**bucket.env))


def test_a_run_in_a_bucket_survives_sigkill_during_a_save_and_resumes_bit_identically(
        gcs_bucket, corpus):  # noqa: F811 — a fixture (first: it skips without gcsfs)
    reference, killed = gcs_bucket.url("reference"), gcs_bucket.url("killed")
    fh.ok(_train(corpus, gcs_bucket, reference))
    assert training_steps.valid_steps(reference) == [4, 6], "step 2 deleted (keep 2)"

    proc = _train(corpus, gcs_bucket, killed, kill_at="save:4")
    assert proc.returncode == -9, proc.stdout[-4000:]
    # Step 4's arrays were in flight: its folder has no commit marker, so it is no step.
    assert training_steps.valid_steps(killed) == [2]
    assert training_steps.committed_steps(killed) == [2]
    assert [p.name for p in training_steps.uncommitted(killed)] == ["4"]
    assert fh.metrics(killed) == fh.metrics(reference)[:4]  # logged before the kill

    proc = fh.ok(_train(corpus, gcs_bucket, killed))
    assert "resuming from step 2" in proc.stdout, proc.stdout[-4000:]
    assert "skipping damaged" not in proc.stdout
    assert training_steps.valid_steps(killed) == [4, 6]
    assert training_steps.uncommitted(killed) == []
    for step in (4, 6):
        assert fh.differences(fh.saved_state(reference, step),
                              fh.saved_state(killed, step)) == [], step
        assert fh.data_state(killed, step) == fh.data_state(reference, step)
    assert fh.metrics(killed) == fh.metrics(reference)
    assert [r["step"] for r in fh.metrics(killed)] == list(range(1, STEPS + 1))
    assert files.read_json(f"{reference}/config.json")["run"]["num_steps"] == STEPS
    assert files.read_json(f"{killed}/config.json") == files.read_json(
        f"{reference}/config.json")
    for workdir in (reference, killed):
        root = epath.Path(workdir)
        assert any(f.name.startswith("events.out.tfevents")
                   for f in (root / "tensorboard").iterdir())
        # Written as single uploads: no temporary object was made, none is left.
        assert not [f.name for f in root.iterdir() if "partial" in f.name
                    or f.name.endswith(".tmp")]
    assert not os.path.exists(os.path.join(fh.REPO, "gs:")), "a gs:// path used as local"
    fh.report("gcs_workdir", kills_during_save=1, resumed_bit_identical=1)
