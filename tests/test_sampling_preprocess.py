"""Pipeline inputs and outputs: image loading from every accepted form, sizes, [-1, 1]."""

import numpy as np
import pytest
from PIL import Image

from unialign_jax.sampling.preprocess import (InputError, check_prompts, check_resolution,
                                              load_image, preprocess, to_pil)


def test_arrays_of_every_accepted_layout_become_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    assert np.array_equal(np.asarray(load_image(gray))[..., 1], gray)
    assert load_image(gray[..., None]).mode == "RGB"
    rgba = np.zeros((3, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255   # opaque: its colour; transparent: the background, never the hidden red
    assert np.asarray(load_image(rgba))[0, 0].tolist() == [200, 0, 0]
    assert np.asarray(load_image(rgba))[0, 1].tolist() == [255, 255, 255]
    assert np.asarray(load_image(rgba, background=(0, 0, 9)))[0, 1].tolist() == [0, 0, 9]
    floats = np.array([[[0.0, 0.5, 1.0]]], np.float32)
    assert np.asarray(load_image(floats))[0, 0].tolist() == [0, 128, 255]


@pytest.mark.parametrize("bad, message", [
    (np.zeros((2, 2, 2), np.uint8), "an image array must be"),
    (np.zeros((0, 4, 3), np.uint8), "an image array must be"),
    (np.zeros((2, 2, 3), np.int32), "uint8 or float"),
    ("/definitely/not/here.png", "cannot read image"),
])
def test_bad_images_raise_input_error(bad, message):
    with pytest.raises(InputError, match=message):
        load_image(bad)


def test_empty_file_is_reported(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty"):
        load_image(str(tmp_path / "empty.png"))


def test_preprocess_is_square_channels_last_in_model_range():
    white = Image.new("RGB", (90, 60), (255, 255, 255))
    black = Image.new("RGB", (60, 90), (0, 0, 0))
    out = preprocess([white, black], 32)
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], 1.0, atol=1e-6)
    np.testing.assert_allclose(out[1], -1.0, atol=1e-6)


def test_to_pil_converts_as_the_release_clamping_and_truncating():
    """The release: (clamp(x * 0.5 + 0.5, 0, 1) * 255).astype(uint8) — truncation, so 0.0
    gives 127 (not 128) and 0.999 gives 254."""
    x = np.array([[[[-1.0, 0.0, 1.0], [-3.0, 0.004, 7.0], [0.999, -0.999, 0.5]]]], np.float32)
    assert np.asarray(to_pil(x)[0]).tolist() == [[[0, 127, 255], [0, 128, 255],
                                                  [254, 0, 191]]]


@pytest.mark.parametrize("height, width, message", [
    (500, 512, "height must be a positive multiple of 16"),
    (512, 0, "width must be"),
    (512, 512.0, "width must be"),
    (1024, 512, "exceeds"),
])
def test_resolution_checks(height, width, message):
    with pytest.raises(InputError, match=message):
        check_resolution(height, width, max_side=768)


def test_prompt_lists():
    assert check_prompts("a cat") == ["a cat"]
    with pytest.raises(InputError, match="empty"):
        check_prompts([])
    with pytest.raises(InputError, match="prompt 1 is a int"):
        check_prompts(["a", 3])
