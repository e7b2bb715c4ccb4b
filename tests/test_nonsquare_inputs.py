"""Non-square inputs to edit / perceive / compose / caption (`resize="crop" | "fit" | "pad"`):
the output size, and the pixels the model is fed, checked by value against references
computed here from PIL and the documented geometry (torchvision's Resize + CenterCrop for
"crop", a bicubic resize to the aspect bucket for "fit", a centred letterbox for "pad")."""

import numpy as np
import pytest
from PIL import Image

import unialign_jax.sampling.unialign_pipeline as pipeline_module
from test_sampling_pipeline import pipe  # noqa: F401  (module fixture: tiny random pipeline)
from unialign_jax.images import bucket_size

RES = 64
GREY = 128


def striped(width, height, seed=0):
    """Noise over horizontal and vertical gradients: every crop, shift or stretch changes it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([255 * x / width, 255 * y / height, 127 + 100 * np.sin(x / 3.0)], -1)
    noise = rng.integers(-40, 40, (height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def model_range(image):
    return np.asarray(image, np.float64) / 127.5 - 1.0


# (input size, resolution) → bucket (width, height), worked by hand: the ratio among
# 1:2 9:16 2:3 3:4 1 4:3 3:2 16:9 2 nearest in log scale to the input's, then
# side = 16·round(resolution·√ratio / 16) (width) and 16·round(resolution / √ratio / 16).
BUCKETS = [
    ((160, 96), 64, (80, 48)),      # 1.667 → 16:9: 64·1.333/16 = 5.33 → 80; 64/1.333/16 = 3 → 48
    ((96, 160), 64, (48, 80)),      # 0.6 → 9:16
    ((200, 120), 512, (688, 384)),  # 16:9: 42.67 → 43·16; 24 → 24·16
    ((400, 100), 512, (720, 368)),  # 4 → 2: 45.25 → 45·16; 22.63 → 23·16
    ((300, 300), 512, (512, 512)),
    ((180, 240), 512, (448, 592)),  # 0.75 → 3:4: 27.71 → 28·16; 36.95 → 37·16
]


@pytest.mark.parametrize("size, resolution, expected", BUCKETS)
def test_bucket_sizes(size, resolution, expected):
    assert bucket_size(size, resolution) == expected


def reference(image, size, resize):
    """The model input of `image` at (width, height) `size`, computed independently."""
    width, height = size
    if resize == "fit":
        return model_range(image.resize(size, Image.BICUBIC))
    if resize == "pad":
        scale = min(width / image.width, height / image.height)
        inner_w, inner_h = round(image.width * scale), round(image.height * scale)
        canvas = np.full((height, width, 3), GREY, np.uint8)
        left, top = (width - inner_w) // 2, (height - inner_h) // 2
        canvas[top:top + inner_h, left:left + inner_w] = np.asarray(
            image.resize((inner_w, inner_h), Image.BICUBIC))
        return model_range(canvas)
    # torchvision Resize(side) on a PIL image: the short side becomes `side`, the long one
    # int(side · long / short); CenterCrop(side): offsets int(round((length - side) / 2)).
    side = width
    if image.width <= image.height:
        resized = image.resize((side, int(side * image.height / image.width)), Image.BICUBIC)
    else:
        resized = image.resize((int(side * image.width / image.height), side), Image.BICUBIC)
    left = int(round((resized.width - side) / 2.0))
    top = int(round((resized.height - side) / 2.0))
    return model_range(np.asarray(resized)[top:top + side, left:left + side])


def test_pad_reference_is_a_letterbox():
    """The pad reference itself: grey bars above and below a wide input, image between."""
    ref = reference(striped(160, 80), (80, 48), "pad")  # 2:1 into 80×48: 80×40, 4 px bars
    np.testing.assert_array_equal(ref[:4], GREY / 127.5 - 1)
    np.testing.assert_array_equal(ref[-4:], GREY / 127.5 - 1)
    assert np.abs(ref[4:-4] - (GREY / 127.5 - 1)).max() > 0.5


@pytest.fixture
def fed(monkeypatch):
    """Every batch of pixels the pipeline feeds its VAE encoder, as (array, resize mode)."""
    seen = []
    original = pipeline_module.preprocess

    def recording(images, size, resize="crop"):
        out = original(images, size, resize)
        seen.append((out, resize))
        return out

    monkeypatch.setattr(pipeline_module, "preprocess", recording)
    return seen


def check_fed(seen, images, size, resize):
    """The first (real) rows of each fed batch equal the references of `images`."""
    rows = [row for batch, mode in seen for row in batch[:1] if mode == resize]
    assert len(rows) == len(images)
    for row, image in zip(rows, images):
        assert row.shape == (size[1], size[0], 3)
        np.testing.assert_allclose(row, reference(image, size, resize), atol=1e-6)


@pytest.mark.parametrize("resize", ["fit", "pad", "crop"])
def test_edit_and_perceive_follow_the_inputs_aspect(pipe, fed, resize):  # noqa: F811
    wide, tall = striped(160, 96, 1), striped(96, 160, 2)
    for image, task in ((wide, pipe.edit), (tall, pipe.perceive)):
        size = (RES, RES) if resize == "crop" else bucket_size(image.size, RES)
        out = task([image], "make it blue", resolution=RES, resize=resize, num_steps=1)
        assert [im.size for im in out] == [size]
        check_fed(fed, [image], size, resize)
        fed.clear()


@pytest.mark.parametrize("resize", ["fit", "pad"])
def test_compose_takes_its_size_from_the_first_image(pipe, fed, resize):  # noqa: F811
    first, second = striped(160, 96, 3), striped(120, 120, 4)
    out = pipe.compose([[first, second]], "put them together", resolution=RES,
                       resize=resize, num_steps=1)
    assert out[0].size == (80, 48)
    check_fed(fed, [first, second], (80, 48), resize)


@pytest.mark.parametrize("resize", ["fit", "pad"])
def test_caption_reads_the_bucketed_input(pipe, fed, resize):  # noqa: F811
    image = striped(96, 160, 5)
    captions = pipe.caption([image], resolution=RES, resize=resize, length=8, num_steps=2)
    assert len(captions) == 1 and isinstance(captions[0], str)
    check_fed(fed, [image], (48, 80), resize)
