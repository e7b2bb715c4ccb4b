"""The quickstart's shape scorer: right on real renders (clean and degraded), its IoU equal to
a brute-force search over rendered masks, and no better than chance on images without a
shape (blank, noise). About 5 s."""

import numpy as np
import pytest
from PIL import Image, ImageFilter

from unialign_jax.apps.shape_score import (best_shapes, composition_score, foreground,
                                           shape_accuracy, shapes_present)
from unialign_jax.data.build import synth

SIZE = 32


def _renders(n, seed, size=SIZE):
    rng = np.random.default_rng(seed)
    scenes = [synth.random_scene(rng, size) for _ in range(n)]
    return [synth.render(s, size) for s in scenes], [s[0].kind for s in scenes]


def _degrade(image, rng, blur=1.5, noise=30.0):
    blurred = np.asarray(image.filter(ImageFilter.GaussianBlur(blur)), np.float32)
    return np.clip(blurred + rng.normal(0, noise, blurred.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("size", [SIZE, 48])
def test_clean_renders_match_their_own_template_exactly(size):
    images, kinds = _renders(150, seed=size, size=size)
    assert {"square", "circle", "triangle"} == set(kinds)
    found = best_shapes(images)
    assert [k for k, _ in found] == kinds
    assert [iou for _, iou in found] == [1.0] * len(images)


def test_degraded_renders_are_still_recognised():
    images, kinds = _renders(300, seed=1)
    rng = np.random.default_rng(2)
    degraded = [_degrade(im, rng) for im in images]
    # Degraded enough that the foreground differs from the clean one...
    changed = np.mean([(foreground(d) != foreground(im)).mean()
                       for d, im in zip(degraded, images)])
    assert changed > 0.01
    # ...and still scored (measured 1.000; blur 2 px: 0.99; an 8 × 8 round trip: 0.96).
    assert shape_accuracy(degraded, kinds) >= 0.97
    scaled = [im.resize((8, 8), Image.BILINEAR).resize((SIZE, SIZE), Image.BILINEAR)
              for im in images]
    assert shape_accuracy(scaled, kinds) >= 0.9


def test_best_iou_equals_a_brute_force_search_over_rendered_masks():
    images, _ = _renders(2, seed=3)
    rng = np.random.default_rng(4)
    for image in images:
        degraded = _degrade(image, rng, blur=2.0)
        mask = foreground(degraded)
        best = {}
        for kind in synth.SHAPES:
            for side in synth.side_range(SIZE):
                for x in range(SIZE - side + 1):
                    for y in range(SIZE - side + 1):
                        box = (x, y, x + side - 1, y + side - 1)
                        t = np.asarray(synth.render_mask([synth.Shape("red", kind, box)],
                                                         SIZE))[..., 0] > 0
                        iou = (t & mask).sum() / (t | mask).sum()
                        best[kind] = max(best.get(kind, 0.0), iou)
        kind, iou = best_shapes([degraded])[0]
        assert kind == max(best, key=best.get)
        assert iou == pytest.approx(max(best.values()), abs=1e-6)


def test_blank_images_have_no_shape():
    blank = [synth.render([], SIZE)] * 3
    assert best_shapes(blank) == [(None, 0.0)] * 3
    assert shape_accuracy(blank, ["circle"] * 3) == 0.0


def test_noise_scores_at_chance():
    rng = np.random.default_rng(5)
    n = 300
    noise = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(n)]
    wanted = [str(k) for k in rng.choice(synth.SHAPES, n)]
    accuracy = shape_accuracy(noise, wanted)
    spread = 4 * np.sqrt((1 / 3) * (2 / 3) / n)  # four binomial standard deviations
    assert abs(accuracy - 1 / 3) < spread


def test_mismatched_lengths_and_non_square_images_fail_clearly():
    images, kinds = _renders(2, seed=6)
    with pytest.raises(ValueError, match="2 images but 1 wanted"):
        shape_accuracy(images, kinds[:1])
    with pytest.raises(ValueError, match="square images"):
        best_shapes([np.zeros((SIZE, SIZE + 2, 3), np.uint8)])


def _compositions(n, seed, count):
    rng = np.random.default_rng(seed)
    scenes = [synth.random_scene(rng, SIZE, count=count, distinct_colours=True)
              for _ in range(n)]
    scenes = [s for s in scenes if len(s) == count]
    return scenes, [[(shape.colour, shape.kind) for shape in s] for s in scenes]


@pytest.mark.parametrize("count", [2, 3])
def test_composition_score_finds_every_shape_of_a_composed_scene(count):
    """Clean and degraded composed scenes: all shapes present; one source alone (a copy
    of the first input): only its own shape; another kind in the right colour and place:
    not present; a blank image: nothing."""
    scenes, wanted = _compositions(60, seed=10 + count, count=count)
    assert len(scenes) > 40
    rendered = [synth.render(s, SIZE) for s in scenes]
    assert composition_score(rendered, wanted) == {"all_present": 1.0, "shape_recall": 1.0}
    rng = np.random.default_rng(7)
    assert composition_score([_degrade(im, rng, blur=0.7, noise=20.0) for im in rendered],
                             wanted)["all_present"] >= 0.9
    first_only = shapes_present([synth.render(s[:1], SIZE) for s in scenes], wanted)
    assert first_only[:, 0].all() and not first_only[:, 1:].any()
    other = {"square": "circle", "circle": "triangle", "triangle": "square"}
    swapped = [[synth.Shape(x.colour, other[x.kind], x.box) for x in s] for s in scenes]
    assert composition_score([synth.render(s, SIZE) for s in swapped], wanted
                             )["shape_recall"] <= 0.1
    blank = [synth.render([], SIZE)] * len(scenes)
    assert composition_score(blank, wanted)["shape_recall"] == 0.0
    with pytest.raises(ValueError, match="one scene"):
        shapes_present(rendered[:1], wanted[:2])


def test_every_quickstart_text_fits_its_prompt_length(tmp_path):
    """The quickstart's tokenizer keeps the corpus' texts — two-shape composition captions
    and the composition instruction included — within `data.max_length` (8) with `</s>`."""
    from unialign_configs import load

    from unialign_jax.apps.quickstart import make_tokenizer

    tok = make_tokenizer(str(tmp_path))
    rng = np.random.default_rng(0)
    pairs = [synth.caption(synth.random_scene(rng, SIZE, count=2, distinct_colours=True))
             for _ in range(50)]
    texts = synth.corpus_texts() + pairs
    lengths = [len(tok(text).input_ids) for text in texts]
    assert max(lengths) <= load("quickstart").data.max_length
    assert len(tok(synth.COMPOSE_INSTRUCTION).input_ids) < max(lengths)
