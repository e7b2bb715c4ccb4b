"""Data under faults: shards damaged after their build (flipped bits, cut or lost files, a
lost teacher file) fail naming the shard and record, or are skipped and counted with
data.skip_corrupt; a crashed data worker fails at once and a hung one times out;
`unialign-data build` resumes after SIGKILL into byte-identical shards, reruns change
nothing, and a full disk fails cleanly and resumes once space is freed.
"""

import os
import random
import re
import shutil
import signal
import time

import grain
import numpy as np
import pytest

import fault_harness as fh
from fault_harness import small_disk, small_disks  # noqa: F401 — fixtures
from unialign_jax.data.build import synth
from unialign_jax.data.build.shards import BuildOptions, build
from unialign_jax.data.build.teacher_precompute import ProjectionTeacher, precompute
from unialign_jax.data.format.records import read_summary, record_files
from unialign_jax.data.read.grain_pipeline import (DataError, PipelineConfig, next_batch,
                                                   training_iterator)
from unialign_jax.data.read.shard_source import CorruptRecord
from unialign_jax.text.tokenizer import load_tokenizer, train_tiny_tokenizer

N, SIZE, PER_SHARD = 24, 16, 6

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("data_faults")
    synth.generate(str(root / "synth"), N, seed=1, size=SIZE)
    build([str(root / "synth" / "t2i_train.jsonl")], str(root / "t2i"),
          BuildOptions(kind="t2i", resolution=SIZE, records_per_shard=PER_SHARD,
                       image_format="raw", threads=1))
    train_tiny_tokenizer(synth.corpus_texts(), str(root / "tok"), vocab_size=60)
    return {"root": root, "t2i": str(root / "t2i"), "tok": str(root / "tok")}


def _copy(corpus, tmp_path, name="shards"):
    folder = tmp_path / name
    shutil.copytree(corpus["t2i"], folder)
    return str(folder)


def _shards(folder):
    return record_files(folder, read_summary(folder))


def _unreadable(folder) -> list[int]:
    """Indices whose record ArrayRecord itself refuses to read (an independent reader per
    record, nothing of the pipeline)."""
    bad, offset = [], 0
    for path in _shards(folder):
        count = read_summary(folder)["shards"][_shards(folder).index(path)]["records"]
        hit = _records_unreadable(path)
        bad += list(range(offset, offset + count)) if hit == ["file"] else [offset + i
                                                                            for i in hit]
        offset += count
    return bad


def _records_unreadable(path) -> list[int]:
    try:
        source = grain.sources.ArrayRecordDataSource([path])
    except RuntimeError:
        return ["file"]
    bad = []
    for i in range(len(source)):
        try:
            source[i]
        except RuntimeError:
            bad.append(i)
    return bad


def _flip_inside_records(path, records=(1, 4)):
    """Flips one bit inside each of `records` (positions in the file): the byte to flip
    for each is found by trying, with ArrayRecord itself as the judge."""
    original, found = open(path, "rb").read(), {}
    for offset in range(64, len(original), 53):
        data = bytearray(original)
        data[offset] ^= 0x10
        open(path, "wb").write(bytes(data))
        hit = _records_unreadable(path)
        if len(hit) == 1 and hit[0] in records:
            found.setdefault(hit[0], offset)
        if len(found) == len(records):
            break
    data = bytearray(original)
    for offset in found.values():
        data[offset] ^= 0x10
    open(path, "wb").write(bytes(data))


def _epoch(folder, corpus, **kw):
    cfg = PipelineConfig(batch_size=4, tokenizer=corpus["tok"], max_length=8, shuffle=False,
                         num_epochs=1, process_index=0, process_count=1, **kw)
    return list(training_iterator({"t2i": [folder]}, cfg))


DAMAGE = {
    "flipped bits": lambda f: _flip_inside_records(_shards(f)[1]),
    "cut shard": lambda f: open(_shards(f)[2], "r+b").truncate(
        os.path.getsize(_shards(f)[2]) // 2),
    "lost shard": lambda f: os.remove(_shards(f)[3]),
}


@pytest.mark.parametrize("kind", DAMAGE)
def test_damaged_shard_names_shard_and_record_or_is_skipped_and_counted(corpus, tmp_path,
                                                                         kind):
    folder = _copy(corpus, tmp_path)
    DAMAGE[kind](folder)
    bad = [] if kind == "lost shard" else _unreadable(folder)
    if kind == "lost shard":
        bad = list(range(3 * PER_SHARD, 4 * PER_SHARD))
    assert bad, "the damage must hit records"
    shard = _shards(folder)[bad[0] // PER_SHARD]
    with pytest.raises(CorruptRecord) as error:
        _epoch(folder, corpus)
    message = str(error.value)
    assert shard in message
    if kind == "flipped bits":
        assert f"record {bad[0] % PER_SHARD} of shard {shard} (index {bad[0]})" in message
    else:
        assert ("truncated or corrupt" if kind == "cut shard" else "is missing") in message

    batches = _epoch(folder, corpus, skip_corrupt=True)
    used = np.concatenate([b["index"] for b in batches])
    skipped = int(sum(b["skipped"].sum() for b in batches))
    assert skipped == len(bad)
    assert not set(bad) & set(used.tolist())
    assert set(used.tolist()) == set(range(N)) - set(bad)
    fh.report("damaged_shard", kind=kind, corrupt_records=len(bad), named=1,
              skipped_and_counted=skipped)


def test_lost_or_cut_teacher_file_fails_naming_it(corpus, tmp_path):
    folder = _copy(corpus, tmp_path)
    precompute(folder, ProjectionTeacher(8, load_tokenizer(corpus["tok"])), batch_size=8)
    assert len(_epoch(folder, corpus)) == N // 4
    path = os.path.join(folder, "teacher", "text.npy")
    open(path, "r+b").truncate(os.path.getsize(path) - 64)
    with pytest.raises(ValueError, match="teacher features .*text.npy are missing or truncated"):
        _epoch(folder, corpus)
    os.remove(path)
    with pytest.raises(ValueError, match="text.npy are missing or truncated.*unialign-data "
                                         "teacher --force"):
        _epoch(folder, corpus, skip_corrupt=True)


# ---- data workers ----------------------------------------------------------------------------

def _worker_pids():
    import multiprocessing

    return [p.pid for p in multiprocessing.active_children()]


def test_a_crashed_worker_fails_at_once_and_a_hung_one_times_out(corpus):
    cfg = PipelineConfig(batch_size=4, tokenizer=corpus["tok"], max_length=8,
                         process_index=0, process_count=1, num_workers=1)
    it = training_iterator({"t2i": [corpus["t2i"]]}, cfg)
    next_batch(it, 60)
    for pid in _worker_pids():
        os.kill(pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(DataError, match="a data worker process crashed"):
        for _ in range(50):  # the batches already prefetched come first
            next_batch(it, 60)
    assert time.monotonic() - start < 30

    it = training_iterator({"t2i": [corpus["t2i"]]}, cfg)
    next_batch(it, 60)
    stopped = _worker_pids()
    for pid in stopped:
        os.kill(pid, signal.SIGSTOP)
    start = time.monotonic()
    with pytest.raises(DataError, match=r"no batch from the data pipeline in 2 s"):
        for _ in range(50):
            next_batch(it, 2)
    assert time.monotonic() - start < 30
    time.sleep(0.5)
    assert not set(stopped) & set(_worker_pids()), "the hung workers were stopped"
    fh.report("data_workers", crashed_worker_error=1, hung_worker_timeout=1)


# ---- unialign-data build: SIGKILL, reruns, full disk -----------------------------------------

@pytest.fixture(scope="module")
def build_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("build_inputs")
    synth.generate(str(root / "synth"), 60, seed=2, size=32, max_shapes=2)
    return str(root / "synth" / "t2i_train.jsonl")


def _build_args(jsonl, out, *extra):
    return ["unialign_jax.data.cli", "build", "--jsonl", jsonl, "--kind", "t2i", "--out",
            str(out), "--resolution", "24", "--records-per-shard", "5", "--threads", "1",
            *extra]


def test_build_resumes_after_sigkill_into_identical_shards_and_reruns_change_nothing(
        build_inputs, tmp_path):
    reference = tmp_path / "reference"
    proc, seconds = fh.timed(fh.command(_build_args(build_inputs, reference)))
    fh.ok(proc)
    expected = fh.files_of(reference)
    stamps = {p: os.stat(reference / p).st_mtime_ns for p in expected}
    rerun = fh.ok(fh.run(fh.command(_build_args(build_inputs, reference))))
    assert '"records": 60' in rerun.stdout
    assert fh.files_of(reference) == expected
    assert {p: os.stat(reference / p).st_mtime_ns for p in expected} == stamps
    other = fh.run(fh.command(_build_args(build_inputs, reference, "--image-format", "jpeg")))
    assert other.returncode == 2
    assert "holds a build of other inputs or options (differs in: image_format)" in other.stdout

    rng, kills = random.Random(1), fh.trials(3)
    made = attempts = chain = published = 0
    tally = {}
    while made < kills and attempts < 3 * kills:
        chain += 1
        out = tmp_path / f"out{chain}"
        for _ in range(4):
            staging = tmp_path / f".out{chain}.partial"
            done = len([n for n in os.listdir(staging) if n.endswith(".stats.json")]) \
                if staging.exists() else 0
            if made == kills or os.path.exists(out):
                break
            attempts += 1
            kind = ("time", "record", "write")[attempts % 3]
            if kind == "record" and done == 12:
                kind = "write"  # every shard is built: only the summary is left
            if kind == "time":
                point = f"time:{rng.uniform(0.2, seconds):.2f}"
                proc = fh.run(fh.command(_build_args(build_inputs, out)),
                              kill_after=float(point[5:]))
            else:
                point = (f"record:{rng.randint(1, 60 - 5 * done)}" if kind == "record" else
                         f"write:{rng.randint(1, 12 - done + 1)}")  # a shard's stats, summary
                proc = fh.run(fh.command(_build_args(build_inputs, out), kill_at=point))
            if proc.returncode == 0:  # a random time after it finished
                break
            assert proc.returncode == -9, proc.stdout[-3000:]
            made += 1
            tally[kind] = tally.get(kind, 0) + 1
            if os.path.exists(out):  # killed after publishing: it must be whole
                assert fh.files_of(out) == expected, f"{point}: a partial output is visible"
                published += 1
        fh.ok(fh.run(fh.command(_build_args(build_inputs, out))))
        assert fh.files_of(out) == expected
        assert not [n for n in os.listdir(tmp_path) if n.startswith(f".out{chain}")]
    fh.report("sigkill_build", kills=made, byte_identical=made, by_point=tally,
              killed_after_publishing=published, rerun_unchanged=1,
              different_settings_refused=1)


def test_build_on_a_full_disk_fails_cleanly_and_completes_after_freeing(
        build_inputs, tmp_path, small_disk):  # noqa: F811 — a fixture
    reference = tmp_path / "reference"
    fh.ok(fh.run(fh.command(_build_args(build_inputs, reference))))
    size = sum(len(b) for b in fh.files_of(reference).values())
    fh.fill(small_disk, size // 2)
    out = small_disk / "shards"
    proc = fh.run(fh.command(_build_args(build_inputs, out)))
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert f"no space left on device writing {out}" in proc.stdout
    assert not os.path.exists(out)
    staging = small_disk / ".shards.partial"
    assert not [n for n in os.listdir(staging) if n.endswith(".tmp")], "no partial shard"
    os.remove(small_disk / "ballast")
    fh.ok(fh.run(fh.command(_build_args(build_inputs, out))))
    assert fh.files_of(out) == fh.files_of(reference)
    fh.report("enospc_build", clean_error=1, nothing_partial=1, rerun_completed=1)


def test_training_on_a_damaged_shard_stops_naming_it_or_skips_and_counts(tmp_path):
    corpus = fh.build_corpus(tmp_path / "corpus")
    shard = _shards(corpus["t2i"])[0]
    _flip_inside_records(shard, records=(2, 9, 17))
    bad = _unreadable(corpus["t2i"])
    assert len(bad) == 3

    proc = fh.run(fh.command(fh.train_args(corpus, tmp_path / "stops", "run.num_steps=6")))
    assert proc.returncode == 2, proc.stdout[-3000:]
    named = re.search(r"unialign-train: error: record (\d+) of shard (\S+) \(index (\d+)\) is "
                      r"unreadable", proc.stdout)
    assert named and named.group(2) == shard and int(named.group(3)) in bad, proc.stdout[-3000:]

    # Six steps read every t2i record once (3 batches of 8 of 24): each bad one is skipped.
    workdir = tmp_path / "skips"
    fh.ok(fh.run(fh.command(fh.train_args(corpus, workdir, "run.num_steps=6",
                                          "data.skip_corrupt=True"))))
    assert sum(r["data_skipped"] for r in fh.metrics(workdir)) == len(bad)
    fh.report("damaged_shard_in_training", corrupt_records=len(bad), named=1,
              skipped_and_counted=len(bad))
