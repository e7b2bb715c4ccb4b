"""Synthetic corpus: captions and instructions say exactly what is drawn, the palette scorer,
held-out split, determinism, and the real builder reading it through the CLI."""

import json
import re

import numpy as np
import pytest
from PIL import Image

from unialign_jax.data import cli
from unialign_jax.data.build import synth
from unialign_jax.data.format.records import read_summary

CAPTION = re.compile(r"^a (\w+) (square|circle|triangle)$")
EDIT = re.compile(r"^make the (\w+) (square|circle|triangle) (\w+)$")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("s") / "synth"
    info = synth.generate(str(out), 40, seed=11, size=48, heldout=0.25)
    lines = {}
    for name in info["files"]:
        lines[name] = [json.loads(x) for x in open(out / name)]
    return out, info, lines


def _rgb(root, rel):
    return np.asarray(Image.open(root / rel).convert("RGB")).astype(int)


def _only(pixels, colour):
    return np.all(pixels == colour, axis=-1)


def test_files_and_heldout_split(corpus):
    out, info, lines = corpus
    assert info["files"] == {"t2i_train.jsonl": 30, "t2i_heldout.jsonl": 10,
                             "edit_train.jsonl": 30, "edit_heldout.jsonl": 10,
                             "compose_train.jsonl": 30, "compose_heldout.jsonl": 10}
    assert json.load(open(out / "synth.json"))["seed"] == 11
    train = {x["image"][0] for x in lines["t2i_train.jsonl"]}
    assert not train & {x["image"][0] for x in lines["t2i_heldout.jsonl"]}


def test_captions_name_the_only_colour_drawn(corpus):
    out, _, lines = corpus
    colours = set()
    for line in lines["t2i_train.jsonl"] + lines["t2i_heldout.jsonl"]:
        colour, _ = CAPTION.match(line["conversations"][0]["value"]).groups()
        pixels = _rgb(out, line["image"][0])
        shape = _only(pixels, synth.PALETTE[colour])
        assert shape.sum() > 0.05 * shape.size  # a visible shape of the named colour
        assert np.all(shape | _only(pixels, synth.BACKGROUND))  # and nothing else
        assert synth.dominant_colour(pixels.astype(np.uint8)) == colour
        colours.add(colour)
    assert len(colours) >= 4


def test_edit_pairs_recolour_exactly_the_named_shape_and_masks_cover_it(corpus):
    out, _, lines = corpus
    kinds = set()
    for line in lines["edit_train.jsonl"]:
        source, target = (_rgb(out, p) for p in line["image"])
        background = _only(source, synth.BACKGROUND)
        if line["instruction"] == synth.MASK_INSTRUCTION:
            kinds.add("mask")
            assert np.array_equal(_only(target, synth.MASK_ON), ~background)
            assert np.all(_only(target, synth.MASK_ON) | _only(target, synth.MASK_OFF))
            assert line["conversations"][0]["value"].startswith("the mask of a ")
            continue
        kinds.add("edit")
        old, kind, new = EDIT.match(line["instruction"]).groups()
        assert old != new and line["conversations"][0]["value"] == f"a {new} {kind}"
        assert np.array_equal(_only(source, synth.PALETTE[old]), ~background)
        assert np.array_equal(_only(target, synth.PALETTE[new]), ~background)
        assert np.array_equal(_only(target, synth.BACKGROUND), background)
    assert kinds == {"mask", "edit"}


def test_compositions_put_each_source_shape_where_it_was(corpus):
    """Release layout; K sources of one shape each, in distinct colours; the target is the
    scene of them all, pixel for pixel where the sources have them, captioned in full."""
    out, info, lines = corpus
    assert info["compose_sources"] == 3
    for line in lines["compose_train.jsonl"]:
        assert line["edit_prompt"] == synth.COMPOSE_INSTRUCTION
        sources = [_rgb(out, p) for p in line["original_images"]]
        (target_path,) = line["generated_images"]
        target = _rgb(out, target_path)
        parts = [CAPTION.match(p).groups() for p in line["caption"].split(" and ")]
        assert len(sources) == len(parts) == 3 and len({c for c, _ in parts}) == 3
        for source, (colour, _) in zip(sources, parts):
            shape = _only(source, synth.PALETTE[colour])
            assert shape.sum() > 0 and np.all(shape | _only(source, synth.BACKGROUND))
            assert np.array_equal(_only(target, synth.PALETTE[colour]), shape)


def test_dominant_colour_scores_noisy_float_images():
    rng = np.random.default_rng(0)
    img = np.full((32, 32, 3), synth.BACKGROUND, np.float32)
    img[4:20, 4:20] = synth.PALETTE["blue"]
    img[24:28, 24:28] = synth.PALETTE["yellow"]
    model_range = img / 127.5 - 1 + rng.normal(0, 0.25, img.shape).astype(np.float32)
    assert synth.dominant_colour(model_range) == "blue"
    assert synth.dominant_colour(Image.fromarray(img.astype(np.uint8))) == "blue"
    assert synth.dominant_colour(np.full((8, 8, 3), 128, np.uint8)) is None


def test_multi_shape_scenes_list_shapes_largest_first():
    rng = np.random.default_rng(5)
    for _ in range(10):
        scene = synth.random_scene(rng, 64, max_shapes=3)
        pixels = np.asarray(synth.render(scene, 64)).astype(int)
        areas = [_only(pixels[y0:y1 + 1, x0:x1 + 1], synth.PALETTE[s.colour]).sum()
                 for s in scene for x0, y0, x1, y1 in [s.box]]  # boxes never overlap
        assert areas == sorted(areas, reverse=True) and min(areas) > 0
        assert len({(s.colour, s.kind) for s in scene}) == len(scene)
        assert sum(areas) == (~_only(pixels, synth.BACKGROUND)).sum()
        assert synth.caption(scene).count(" and ") == len(scene) - 1


def test_generation_is_deterministic_and_texts_are_covered(tmp_path, corpus):
    _, _, lines = corpus
    for name in ("a", "b"):
        synth.generate(str(tmp_path / name), 6, seed=3, size=32)
    for f in ("t2i_train.jsonl", "edit_train.jsonl", "images/edit_000003_target.png",
              "compose_train.jsonl", "images/compose_000003_source2.png"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    texts = set(synth.corpus_texts())
    for line in lines["edit_train.jsonl"] + lines["t2i_train.jsonl"]:
        assert line["conversations"][0]["value"] in texts
        assert line.get("instruction", synth.MASK_INSTRUCTION) in texts
    words = {w for t in texts for w in t.split()}
    for line in lines["compose_train.jsonl"]:
        assert line["edit_prompt"] in texts and set(line["caption"].split()) <= words
    # Composition samples draw from their own stream: the other kinds are the same
    # whether they are written or not (the seed's corpus as before they existed).
    synth.generate(str(tmp_path / "c"), 6, seed=3, size=32, compose_sources=1)
    for f in ("t2i_train.jsonl", "edit_train.jsonl"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "c" / f).read_bytes()
    with pytest.raises(FileExistsError):
        synth.generate(str(tmp_path / "a"), 6)


def test_cli_writes_a_corpus_the_builder_reads(tmp_path, capsys):
    assert cli.main(["synth", "--out", str(tmp_path / "s"), "--n", "5", "--size", "32"]) == 0
    assert cli.main(["build", "--jsonl", str(tmp_path / "s" / "edit_train.jsonl"),
                     "--kind", "edit", "--out", str(tmp_path / "b"), "--resolution", "16"]) == 0
    summary = read_summary(str(tmp_path / "b"))
    assert (summary["records"], summary["skipped"], summary["num_sources"]) == (5, {}, 1)
    assert '"records": 5' in capsys.readouterr().out
    assert cli.main(["build", "--jsonl", str(tmp_path / "s" / "compose_train.jsonl"),
                     "--kind", "compose", "--out", str(tmp_path / "c"),
                     "--resolution", "16"]) == 0
    summary = read_summary(str(tmp_path / "c"))
    assert (summary["records"], summary["skipped"], summary["num_sources"]) == (5, {}, 3)
