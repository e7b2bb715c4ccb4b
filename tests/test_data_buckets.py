"""Aspect-ratio buckets (`unialign-data build --buckets`, `data.buckets`): the builder keeps
each target's aspect in the nearest bucket of the sampler's table (`images.bucket_size`),
its sources at the same size; the training iterator forms every batch from one bucket,
deterministically and resumably; each bucket shape compiles the train step once; a bucket
beyond the transformer's position table is refused before anything is built.
"""

import dataclasses
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

from unialign_jax import images

from test_train_resume import (_assert_same_state, _command, _data_state, _env, _metrics,
                               _restore_state)

RESOLUTION = 32
# Width × height of the corpus' images by aspect, and the bucket each lands in at 32 px
# (sides multiples of 16 nearest to 32·√r × 32/√r: 4:3 rounds to the square).
ASPECTS = {"1:1": ((64, 64), (32, 32)), "4:3": ((64, 48), (32, 32)),
           "16:9": ((64, 36), (48, 32)), "9:16": ((36, 64), (32, 48))}
PER_ASPECT = 10


def _line(images_, caption, **extra):
    return json.dumps({"image": images_, "conversations": [
        {"from": "human", "value": caption}, {"from": "gpt", "value": "<image>"}], **extra})


def _gradient(size, seed):
    """An RGB image whose pixels differ everywhere (so a crop or a resize shows)."""
    w, h = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    pixels = np.stack([x * 255 // max(1, w - 1), y * 255 // max(1, h - 1),
                       rng.integers(0, 256, (h, w))], -1)
    return Image.fromarray(pixels.astype(np.uint8))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Text-to-image and editing JSONL corpora of mixed aspects (editing sources square,
    targets of every aspect), built with --buckets at 32 px (and the text-to-image one
    without, into square/), and a tiny tokenizer."""
    from unialign_jax.data import cli as data_cli
    from unialign_jax.data.build.synth import corpus_texts
    from unialign_jax.text.tokenizer import train_tiny_tokenizer

    root = tmp_path_factory.mktemp("buckets")
    os.makedirs(root / "img")
    t2i, edit, expected = [], [], []
    for a, (aspect, (size, bucket)) in enumerate(ASPECTS.items()):
        for i in range(PER_ASPECT):
            name = f"img/{a}_{i}.png"
            _gradient(size, 100 * a + i).save(root / name)
            _gradient((40, 40), 1000 + 100 * a + i).save(root / f"img/s{a}_{i}.png")
            t2i.append(_line([name], f"a red square {aspect}"))
            edit.append(_line([f"img/s{a}_{i}.png", name], "a red square",
                              instruction="make the red square blue"))
            expected.append(bucket)
    for kind, lines in (("t2i", t2i), ("edit", edit)):
        (root / f"{kind}.jsonl").write_text("\n".join(lines) + "\n")
        assert data_cli.main(["build", "--jsonl", str(root / f"{kind}.jsonl"), "--kind", kind,
                              "--out", str(root / kind), "--resolution", str(RESOLUTION),
                              "--image-format", "raw", "--threads", "1", "--buckets",
                              "--records-per-shard", "7"]) == 0
    # The same corpus without --buckets: the release's square crops, as before.
    assert data_cli.main(["build", "--jsonl", str(root / "t2i.jsonl"), "--kind", "t2i",
                          "--out", str(root / "square"), "--resolution", str(RESOLUTION),
                          "--image-format", "raw", "--threads", "1"]) == 0
    train_tiny_tokenizer(corpus_texts(), root / "tokenizer", vocab_size=60)
    return {"root": root, "expected": expected, "cache": str(root / "jax_cache")}


def test_bucket_table_is_the_samplers_sizes():
    """At 512 px: each ratio's sides are the multiples of 16 nearest to 512·√r and
    512/√r (hand-computed), in ASPECT_BUCKETS order; at 32 px several ratios share a size."""
    assert images.bucket_table(512) == (
        (368, 720), (384, 688), (416, 624), (448, 592), (512, 512), (592, 448), (624, 416),
        (688, 384), (720, 368))
    assert images.bucket_table(32) == ((16, 48), (32, 48), (32, 32), (48, 32), (48, 16))
    for ratio in images.ASPECT_BUCKETS:
        assert images.bucket_size((ratio * 1000, 1000), 512) in images.bucket_table(512)


@pytest.mark.parametrize("size", [(64, 64), (61, 37), (37, 61), (40, 41)])
def test_rectangle_crop_is_the_release_crop_for_squares(size):
    img = _gradient(size, 0)
    np.testing.assert_array_equal(np.asarray(images.resize_and_center_crop_to(img, (32, 32))),
                                  np.asarray(images.resize_and_center_crop(img, 32)))


def test_rectangle_crop_covers_then_crops_the_centre():
    """Already at the bucket's aspect: a plain resize. Wider: resized to the bucket's
    height, then the centre columns (offset round((100 − 80) / 2) = 10)."""
    at_aspect, wider = _gradient((160, 96), 1), _gradient((200, 96), 2)
    np.testing.assert_array_equal(
        np.asarray(images.resize_and_center_crop_to(at_aspect, (80, 48))),
        np.asarray(at_aspect.resize((80, 48), Image.BICUBIC)))
    np.testing.assert_array_equal(
        np.asarray(images.resize_and_center_crop_to(wider, (80, 48))),
        np.asarray(wider.resize((100, 48), Image.BICUBIC))[:, 10:90])


def test_bucketed_build_keeps_each_aspect_and_sources_take_the_targets_size(corpus):
    from unialign_jax.data.format.records import decode_record
    from unialign_jax.data.format.records import read_summary
    from unialign_jax.data.format.stored_images import decode_stored
    from unialign_jax.data.read.shard_source import ShardSource

    root = corpus["root"]
    for kind in ("t2i", "edit"):
        summary = read_summary(str(root / kind))
        table = [tuple(s) for s in summary["bucket_table"]]
        assert table == list(images.bucket_table(RESOLUTION)) and summary["buckets"] is True
        assert summary["bucket_counts"] == {"32x32": 2 * PER_ASPECT, "48x32": PER_ASPECT,
                                            "32x48": PER_ASPECT}
        source = ShardSource([str(root / kind)])
        assert [table[b] for b in source.record_buckets] == corpus["expected"]
        for index, bucket in enumerate(corpus["expected"]):
            fields, blobs = decode_record(source[index]["record"])
            assert tuple(fields["size"]) == bucket
            for blob in blobs:  # editing: the square source at the target's size
                assert decode_stored(blob, "raw", bucket).shape == (bucket[1], bucket[0], 3)
    # Without --buckets the same corpus builds as before: square crops, no bucket fields.
    square = str(root / "square")
    summary = read_summary(square)
    assert "buckets" not in summary and "bucket_table" not in summary
    assert not os.path.exists(os.path.join(square, "buckets.npy"))


def _pipeline(corpus, **kw):
    from unialign_jax.data.read.grain_pipeline import PipelineConfig

    return PipelineConfig(**{"batch_size": 4, "tokenizer": str(corpus["root"] / "tokenizer"),
                             "max_length": 8, "process_index": 0, "process_count": 1,
                             "seed": 5, "buckets": True, **kw})


def test_every_batch_is_one_bucket_deterministic_and_resumable(corpus):
    from unialign_jax.data.read.grain_pipeline import training_iterator
    from unialign_jax.data.read.shard_source import ShardSource

    root = corpus["root"]
    corpora = {"t2i": [str(root / "t2i")], "edit": [str(root / "edit")]}
    buckets = {task: ShardSource(f).record_buckets for task, f in corpora.items()}
    table = images.bucket_table(RESOLUTION)
    it = training_iterator(corpora, _pipeline(corpus))
    seen, batches = set(), []
    for _ in range(16):
        batch = next(it)
        task = "edit" if "sources" in batch else "t2i"
        h, w = batch["target"].shape[1:3]
        assert (w, h) in table
        # Every row's record is of that bucket.
        assert {table[b] for b in buckets[task][batch["index"]]} == {(w, h)}
        if task == "edit":
            assert batch["sources"].shape[2:4] == (h, w)
        seen.add((task, w, h))
        batches.append(batch)
    assert seen == {(task, *size) for task in corpora for size in
                    [(32, 32), (48, 32), (32, 48)]}
    # Deterministic from the seed; exact resume from a saved position.
    again = training_iterator(corpora, _pipeline(corpus))
    for batch in batches[:6]:
        np.testing.assert_array_equal(next(again)["index"], batch["index"])
    state = again.get_state()
    resumed = training_iterator(corpora, _pipeline(corpus))
    resumed.set_state(state)
    for batch in batches[6:]:
        got = next(resumed)
        np.testing.assert_array_equal(got["index"], batch["index"])
        np.testing.assert_array_equal(got["target"], batch["target"])
    # Another seed, another order.
    other = training_iterator(corpora, _pipeline(corpus, seed=6))
    assert any(not np.array_equal(next(other)["index"], b["index"]) for b in batches)


def test_buckets_setting_must_match_the_build(corpus):
    from unialign_jax.data.read.grain_pipeline import training_iterator

    root = corpus["root"]
    with pytest.raises(ValueError, match="built with aspect-ratio buckets but data.buckets"):
        training_iterator({"t2i": [str(root / "t2i")]},
                          dataclasses.replace(_pipeline(corpus), buckets=False))
    with pytest.raises(ValueError, match="built without aspect-ratio buckets"):
        training_iterator({"t2i": [str(root / "square")]}, _pipeline(corpus))


def test_a_bucket_beyond_the_position_table_is_refused():
    """tiny: positions for 16 patches of 2 × 2 (VAE) px = 64 px a side; at 64 px the 4:3
    bucket is 80 px wide."""
    from unialign_configs import load
    from unialign_jax import configlib
    from unialign_jax.training.buckets import check_bucket_sizes

    cfg = configlib.apply_overrides(load("tiny"), ["data.buckets=True", "data.resolution=64"])
    with pytest.raises(ValueError, match=re.escape("buckets 48x96, 48x80, 80x48, 96x48 are "
                                                   "more than 16 patches of 4 px")):
        check_bucket_sizes(cfg)
    check_bucket_sizes(configlib.apply_overrides(cfg, ["data.resolution=32"]))
    check_bucket_sizes(configlib.apply_overrides(cfg, ["data.buckets=False"]))


def _bucket_train(corpus, workdir, steps):
    import subprocess

    overrides = ["data.buckets=True", f"data.resolution={RESOLUTION}",
                 "data.tasks=" + repr({"t2i": (str(corpus["root"] / "t2i"),),
                                       "edit": (str(corpus["root"] / "edit"),)}),
                 f"run.num_steps={steps}", "run.ckpt_every=3"]
    env = dict(_env(corpus), JAX_LOG_COMPILES="1")
    proc = subprocess.run(_command(corpus, workdir, *overrides), env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def test_bucketed_training_compiles_once_per_shape_and_resumes_exactly(corpus, tmp_path):
    """`unialign-train` with data.buckets: the step compiles once per (task, bucket) shape
    the batches bring (as the data pipeline yields them), never more; a run stopped at
    step 3 and resumed equals the straight run, state and metrics."""
    from unialign_jax.data.read.grain_pipeline import training_iterator

    steps = 6
    straight = _bucket_train(corpus, tmp_path / "straight", steps)
    compiles = re.findall(r"Compiling jit\(step\) with", straight.stdout + straight.stderr)
    corpora = {"t2i": [str(corpus["root"] / "t2i")], "edit": [str(corpus["root"] / "edit")]}
    it = training_iterator(corpora, dataclasses.replace(  # the run's data settings
        _pipeline(corpus), batch_size=8, seed=0, task_weights=(1.0, 1.0)))
    shapes = {tuple(b.get("sources", b["target"]).shape) + b["target"].shape
              for b in (next(it) for _ in range(steps))}
    assert len(shapes) >= 3  # the run saw several buckets
    assert len(compiles) == len(shapes), (compiles, shapes)

    _bucket_train(corpus, tmp_path / "resumed", 3)
    _bucket_train(corpus, tmp_path / "resumed", steps)
    _assert_same_state(_restore_state(tmp_path / "straight", steps),
                       _restore_state(tmp_path / "resumed", steps))
    assert _metrics(tmp_path / "straight") == _metrics(tmp_path / "resumed")
    assert _data_state(tmp_path / "straight", steps) == _data_state(tmp_path / "resumed", steps)
