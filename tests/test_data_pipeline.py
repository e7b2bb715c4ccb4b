"""Grain pipeline: batch contents, task alternation, host sharding, exact resume (in-process
and with worker processes through Orbax), and images equal to PIL's resize + crop."""

import json

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from unialign_jax.data.build import synth
from unialign_jax.data.build.shards import BuildOptions, build
from unialign_jax.data.read import batch_spec
from unialign_jax.data.read.grain_pipeline import PipelineConfig, TASK_IDS, training_iterator
from unialign_jax.text.tokenizer import decode, train_tiny_tokenizer

N = 24
SIZE = 32
L = 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    synth.generate(str(root / "synth"), N, seed=3, size=SIZE)
    folders = {}
    for kind in ("t2i", "edit"):
        folders[kind] = str(root / kind)
        build([str(root / "synth" / f"{kind}_train.jsonl")], folders[kind],
              BuildOptions(kind=kind, resolution=SIZE, records_per_shard=7))
    tok_dir = str(root / "tok")
    tok = train_tiny_tokenizer(synth.corpus_texts(), tok_dir, vocab_size=60)
    lines = {k: [json.loads(x) for x in open(root / "synth" / f"{k}_train.jsonl")]
             for k in folders}
    return {"root": root / "synth", "folders": folders, "tok_dir": tok_dir, "tok": tok,
            "lines": lines}


def _config(corpus, **kw):
    return PipelineConfig(**{"batch_size": 4, "tokenizer": corpus["tok_dir"], "max_length": L,
                             "process_index": 0, "process_count": 1, **kw})


def _take(it, n):
    return [next(it) for _ in range(n)]


def test_task_weights_interleave_a_fixed_cycle_of_tasks(corpus):
    """(3, 1): three text-to-image batches, then one editing batch, every cycle; each task
    still walks its own records in its own order."""
    corpora = {"t2i": [corpus["folders"]["t2i"]], "edit": [corpus["folders"]["edit"]]}
    mixed = _take(training_iterator(corpora, _config(corpus, task_weights=(3.0, 1.0))), 8)
    t2i, edit = TASK_IDS["t2i"], TASK_IDS["edit"]
    assert [int(b["task"][0]) for b in mixed] == [t2i, t2i, t2i, edit] * 2
    alternating = _take(training_iterator(corpora, _config(corpus)), 4)
    by_task = lambda batches, task: [b["index"].tolist() for b in batches  # noqa: E731
                                     if b["task"][0] == task]
    assert by_task(mixed, edit) == by_task(alternating, edit)
    with pytest.raises(ValueError, match="1 task weights for 2 corpora"):
        training_iterator(corpora, _config(corpus, task_weights=(1.0,)))


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), np.float32) / 127.5 - 1


def test_batches_alternate_tasks_and_match_the_corpus(corpus):
    it = training_iterator({"t2i": [corpus["folders"]["t2i"]],
                            "edit": [corpus["folders"]["edit"]]}, _config(corpus))
    batches = _take(it, 4)
    assert [int(b["task"][0]) for b in batches] == [TASK_IDS["t2i"], TASK_IDS["edit"]] * 2
    tok = corpus["tok"]
    for b in batches:
        kind = "t2i" if b["task"][0] == TASK_IDS["t2i"] else "edit"
        assert b["target"].shape == (4, SIZE, SIZE, 3) and b["target"].dtype == np.float32
        assert b["caption_ids"].shape == b["instruction_ids"].shape == (4, L)
        assert b["caption_ids"].dtype == np.int32 and b["index"].dtype == np.int64
        assert np.all(b["task"] == b["task"][0])
        assert ("sources" in b) == (kind == "edit") and not any(k.startswith("teacher") for k in b)
        for row, index in enumerate(b["index"]):
            line = corpus["lines"][kind][index]
            caption = line["conversations"][0]["value"]
            instruction = line.get("instruction", caption)
            for key, text in (("caption_ids", caption), ("instruction_ids", instruction)):
                want = tok(text, padding="max_length", max_length=L)["input_ids"]
                np.testing.assert_array_equal(b[key][row], want)
                assert b[key][row][-1] == 1  # padded with </s>
            assert decode(tok, b["caption_ids"][row][None])[0] == caption
            np.testing.assert_allclose(b["target"][row],
                                       _pixels(corpus["root"] / line["image"][-1]), atol=1e-6)
            if kind == "edit":
                assert b["sources"].shape == (4, 1, SIZE, SIZE, 3)
                np.testing.assert_allclose(b["sources"][row, 0],
                                           _pixels(corpus["root"] / line["image"][0]), atol=1e-6)


def test_every_batch_is_what_the_batch_spec_describes(corpus):
    """Names, shapes and dtypes of the pipeline's batches are `batch_spec.shapes`' (with the
    bookkeeping fields); the stored rows beside the shards fill fields the spec names."""
    it = training_iterator({"t2i": [corpus["folders"]["t2i"]],
                            "edit": [corpus["folders"]["edit"]]}, _config(corpus))
    for b, num_sources in zip(_take(it, 2), (0, 1)):
        want = batch_spec.shapes(batch_size=4, resolution=SIZE, max_length=L,
                                 num_sources=num_sources, model_only=False)
        want.pop("skipped")  # only with skip_corrupt
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == want
    assert set(batch_spec.TEACHER_KEYS + batch_spec.MOMENT_KEYS) <= set(batch_spec.BY_NAME)
    with pytest.raises(KeyError, match="not a batch field"):
        batch_spec.example({"pixels": np.zeros(3)})


def _indices(corpus, batch_size, **kw):
    cfg = _config(corpus, batch_size=batch_size, **{"num_epochs": 1, **kw})
    return [b["index"].tolist() for b in training_iterator({"t2i": [corpus["folders"]["t2i"]]}, cfg)]


def test_hosts_read_disjoint_samples_that_cover_the_set(corpus):
    hosts = [_indices(corpus, 3, process_index=p, process_count=2, seed=5) for p in range(2)]
    seen = [sum(h, []) for h in hosts]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(N))
    # Each step's host batches together are the single-host global batch of that step.
    single = _indices(corpus, 6, seed=5)
    assert [sorted(a + b) for a, b in zip(*hosts)] == [sorted(s) for s in single]
    assert sum(single, []) != sorted(sum(single, []))  # and it is shuffled


def test_shuffle_is_seeded_and_reshuffles_each_epoch(corpus):
    order = lambda **kw: sum(_indices(corpus, 4, **kw), [])
    assert order(seed=1) == order(seed=1) != order(seed=2)
    assert order(shuffle=False) == list(range(N))
    two = sum(_indices(corpus, 4, seed=1, num_epochs=2), [])
    assert sorted(two[:N]) == sorted(two[N:]) == list(range(N)) and two[:N] != two[N:]


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])


def test_restored_state_yields_exactly_the_following_batches(corpus):
    corpora = {"t2i": [corpus["folders"]["t2i"]], "edit": [corpus["folders"]["edit"]]}
    cfg = _config(corpus, batch_size=5)  # 5 does not divide 24: batches straddle epochs
    expected = _take(training_iterator(corpora, cfg), 14)
    it = training_iterator(corpora, cfg)
    _take(it, 9)
    state = json.loads(json.dumps(it.get_state()))
    resumed = training_iterator(corpora, cfg)
    resumed.set_state(state)
    for want, got in zip(expected[9:], _take(resumed, 5)):
        _assert_same(want, got)


def test_worker_processes_resume_exactly_through_an_orbax_checkpoint(corpus, tmp_path):
    corpora = {"t2i": [corpus["folders"]["t2i"]], "edit": [corpus["folders"]["edit"]]}
    cfg = _config(corpus, num_workers=2, seed=7)
    expected = _take(training_iterator(corpora, _config(corpus, seed=7)), 7)
    it = training_iterator(corpora, cfg)
    for want, got in zip(expected[:3], _take(it, 3)):
        _assert_same(want, got)  # workers change where batches are made, not what they hold
    with ocp.CheckpointManager(str(tmp_path / "ckpt")) as manager:
        manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
        manager.wait_until_finished()
        it.close()
        resumed = training_iterator(corpora, cfg)
        manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
    for want, got in zip(expected[3:], _take(resumed, 4)):
        _assert_same(want, got)
    resumed.close()


def test_images_equal_pil_bicubic_resize_and_center_crop(corpus, tmp_path):
    """Independent reference: torchvision's Resize(int) + CenterCrop geometry, done in PIL."""
    res, rng = 24, np.random.default_rng(0)
    sizes = [(37, 61), (61, 37), (24, 24), (100, 41), (25, 90)]
    lines, sources = [], []
    for i, (w, h) in enumerate(sizes):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        img = img.convert(["RGB", "RGBA", "L", "P", "RGB"][i])
        img.save(tmp_path / f"{i}.png")
        sources.append(img)
        lines.append(json.dumps({"image": [f"{i}.png"], "conversations": [{"value": "a red square"}]}))
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    build([str(tmp_path / "c.jsonl")], str(tmp_path / "s"), BuildOptions(kind="t2i", resolution=res))
    cfg = _config(corpus, batch_size=len(sizes), shuffle=False, num_epochs=1)
    (batch,) = list(training_iterator({"t2i": [str(tmp_path / "s")]}, cfg))

    for img, got in zip(sources, batch["target"]):
        w, h = img.size
        new = (res, res * h // w) if w < h else (res * w // h, res)
        ref = img.convert("RGB").resize(new, Image.BICUBIC)
        left, top = round((new[0] - res) / 2), round((new[1] - res) / 2)
        ref = np.asarray(ref.crop((left, top, left + res, top + res)), np.float32)
        assert np.abs((got + 1) * 127.5 - ref).max() <= 1.0


def test_composition_batches_carry_every_source_in_order(corpus, tmp_path):
    root = corpus["root"]
    lines = [json.dumps({"image": [str(root / f"images/t2i_{i + k:06d}.png") for k in range(4)],
                         "conversations": [{"value": "a red square"}], "instruction": "combine"})
             for i in range(3)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    build([str(tmp_path / "c.jsonl")], str(tmp_path / "s"),
          BuildOptions(kind="compose", resolution=SIZE))
    cfg = _config(corpus, batch_size=3, shuffle=False, num_epochs=1)
    (batch,) = list(training_iterator({"compose": [str(tmp_path / "s")]}, cfg))
    assert batch["sources"].shape == (3, 3, SIZE, SIZE, 3)
    assert batch["task"].tolist() == [TASK_IDS["compose"]] * 3
    for i in range(3):
        for k in range(3):
            np.testing.assert_allclose(batch["sources"][i, k],
                                       _pixels(root / f"images/t2i_{i + k:06d}.png"), atol=1e-6)
        np.testing.assert_allclose(batch["target"][i], _pixels(root / f"images/t2i_{i + 3:06d}.png"),
                                   atol=1e-6)


def test_configuration_errors_are_clear(corpus, tmp_path):
    folders = corpus["folders"]
    with pytest.raises(ValueError, match="hold 'edit' records, not 't2i'"):
        training_iterator({"t2i": [folders["edit"]]}, _config(corpus))
    with pytest.raises(ValueError, match="built at 32 px, not 64"):
        training_iterator({"t2i": [folders["t2i"]]}, _config(corpus, resolution=64))
    with pytest.raises(ValueError, match="unknown tasks"):
        training_iterator({"caption": [folders["t2i"]]}, _config(corpus))
    with pytest.raises(ValueError, match="differs from"):
        training_iterator({"t2i": [folders["t2i"], folders["edit"]]}, _config(corpus))
    with pytest.raises(FileNotFoundError, match="not a finished shard folder"):
        training_iterator({"t2i": [str(tmp_path)]}, _config(corpus))
    with pytest.raises(ValueError, match="process index 2"):
        training_iterator({"t2i": [folders["t2i"]]}, _config(corpus, process_index=2))
