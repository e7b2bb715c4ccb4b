"""Real-world image files end to end: the pixels the builder stores and the pipeline feeds
the model equal a numpy reference, the size filters skip exactly the files that break them,
and the pipeline refuses tiny inputs and warns about large upscales.

Every file is written here from known pixel values. The reference is numpy arithmetic on
those values, then the release's geometry done here with PIL on the reference array: a
bicubic resize of the short side to R and a centred R×R slice. Sources are 24×16 (or 16×24
when their EXIF turns them) and R = 8, so the resize is exactly 2:1 and the slice starts 2
pixels in.
"""

from __future__ import annotations

import collections
import json
import logging

import jax
import numpy as np
import pytest
from PIL import Image

from image_files import (BG, UPRIGHT, cmyk_reference, composite, exif, gif_frames, grey3, png,
                         save, u16)
from unialign_jax.data import cli
from unialign_jax.data.format.records import decode_record, read_summary, record_files
from unialign_jax.data.format.stored_images import decode_stored
from unialign_jax.sampling.preprocess import InputError, load_image, preprocess

R = 8
H, W = 16, 24
RNG = np.random.default_rng(14)


def _release_geometry(rgb: np.ndarray) -> np.ndarray:
    """Short side to R (bicubic, as torchvision's Resize), then the centred R×R slice."""
    h, w = rgb.shape[:2]
    short = min(h, w)
    assert (h * R) % short == 0 and (w * R) % short == 0  # sizes chosen for exact geometry
    small = np.asarray(Image.fromarray(rgb).resize((w * R // short, h * R // short),
                                                   Image.BICUBIC))
    top, left = (small.shape[0] - R) // 2, (small.shape[1] - R) // 2
    return small[top:top + R, left:left + R]


def _cases() -> dict[str, tuple[bytes, np.ndarray]]:
    """name -> (file bytes, the upright RGB a correct decoder gives, by numpy)."""
    cases = {}
    grey = u16(RNG, (H, W))
    cases["grey16_png"] = png(grey, 0), grey3(np.rint(grey / 257.0))
    cases["grey16_tiff"] = (save(Image.frombytes("I;16", (W, H), grey.astype("<u2").tobytes()),
                                 "TIFF"), grey3(np.rint(grey / 257.0)))
    rgb16 = u16(RNG, (H, W, 3))
    cases["rgb16_png"] = png(rgb16, 2), np.rint(rgb16 / 257.0)
    rgba16 = u16(RNG, (H, W, 4))
    rgba16[0, :, 3] = 0
    cases["rgba16_png"] = png(rgba16, 6), composite(rgba16[..., :3], rgba16[..., 3], 65535, 65535)

    ints = RNG.integers(0, 65536, (H, W)).astype(np.int32)
    cases["int_16bit_range"] = save(Image.fromarray(ints), "TIFF"), grey3(np.rint(ints / 257.0))
    big = RNG.integers(-1000, 2_000_000, (H, W)).astype(np.int32)
    big[0, 0] = 2_000_000  # the maximum, so the scale is known exactly
    cases["int_beyond_16bit"] = (save(Image.fromarray(big), "TIFF"),
                                 grey3(np.rint(np.clip(big, 0, None) * 255.0 / 2_000_000)))
    floats = RNG.uniform(-0.3, 1.3, (H, W)).astype(np.float32)
    floats[1, :3] = np.nan
    cases["float"] = (save(Image.fromarray(floats), "TIFF"),
                      grey3(np.rint(np.clip(np.nan_to_num(floats.astype(np.float64)), 0, 1)
                                    * 255)))

    cmyk = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    cases["cmyk_tiff"] = (save(Image.frombytes("CMYK", (W, H), cmyk.tobytes()), "TIFF"),
                          cmyk_reference(cmyk))
    la = RNG.integers(0, 256, (H, W, 2)).astype(np.uint8)
    la[:, :4, 1] = 0
    cases["la"] = (save(Image.fromarray(la, "LA"), "PNG"),
                   composite(grey3(la[..., 0]), la[..., 1], 255, 255))
    rgba = RNG.integers(0, 256, (H, W, 4)).astype(np.uint8)
    rgba[:4, :, 3] = 0
    cases["rgba"] = (save(Image.fromarray(rgba, "RGBA"), "PNG"),
                     composite(rgba[..., :3], rgba[..., 3], 255, 255))
    table = RNG.integers(0, 256, (16, 3)).astype(np.uint8)
    alpha_table = RNG.integers(0, 256, 16)
    alpha_table[:3] = (0, 255, 128)
    idx = RNG.integers(0, 16, (H, W)).astype(np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette(table.tobytes())
    cases["palette_transparency"] = (save(pal, "PNG", transparency=bytes(alpha_table.astype(
        np.uint8))), composite(table[idx], alpha_table[idx], 255, 255))

    photo = RNG.integers(0, 256, (H, W, 3)).astype(np.uint8)
    for o in range(1, 9):
        cases[f"exif_{o}"] = (save(Image.fromarray(photo), "PNG", exif=exif(o)),
                              UPRIGHT[o](photo))
    frames, tables, idxs = gif_frames(RNG, (H, W))
    cases["animated_gif"] = (save(frames[0], "GIF", save_all=True, append_images=frames[1:],
                                  duration=50, optimize=False), tables[0][idxs[0]])
    return {k: (data, np.ascontiguousarray(ref, dtype=np.uint8))
            for k, (data, ref) in cases.items()}


CASES = _cases()


def _jsonl(path, names: list[str], folder) -> str:
    path.write_text("".join(json.dumps({"image": [str(folder / name)], "conversations": [
        {"from": "human", "value": name}, {"from": "gpt", "value": "<image>"}]}) + "\n"
        for name in names))
    return str(path)


def _stored(out: str, fmt: str, resolution: int) -> dict[str, np.ndarray]:
    """caption -> the stored target image of every record in the shard folder."""
    from array_record.python.array_record_module import ArrayRecordReader

    stored = {}
    for path in record_files(out, read_summary(out)):
        reader = ArrayRecordReader(path)
        for record in reader.read_all():
            fields, images = decode_record(record)
            stored[fields["caption"]] = decode_stored(images[-1], fmt, resolution)
        reader.close()
    return stored


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    for name, (data, _) in CASES.items():
        (folder / name).write_bytes(data)
    return folder


def _build(files, d, names: list[str], *flags) -> dict[str, np.ndarray]:
    """`unialign-data build` of the named cases in raw format at resolution R."""
    out = str(d / "shards")
    assert cli.main(["build", "--jsonl", _jsonl(d / "c.jsonl", names, files), "--kind", "t2i",
                     "--out", out, "--resolution", str(R), "--image-format", "raw",
                     "--threads", "4", *flags]) == 0
    summary = read_summary(out)
    assert summary["records"] == len(names) and summary["skipped"] == {}
    return _stored(out, "raw", R)


@pytest.fixture(scope="module")
def built(files, tmp_path_factory):
    """Every case built on a non-white background."""
    return _build(files, tmp_path_factory.mktemp("build"), list(CASES),
                  "--background", *map(str, BG))


@pytest.mark.parametrize("name", list(CASES))
def test_builder_stores_the_reference_pixels(built, name):
    np.testing.assert_array_equal(built[name], _release_geometry(CASES[name][1]))


def test_builder_can_keep_the_stored_orientation(files, tmp_path):
    """--exif-orientation keep (the release's reading): the pixels as stored, not turned."""
    kept = _build(files, tmp_path, [f"exif_{o}" for o in range(1, 9)],
                  "--exif-orientation", "keep")
    for o in range(1, 9):
        np.testing.assert_array_equal(kept[f"exif_{o}"], _release_geometry(CASES["exif_1"][1]))


@pytest.mark.parametrize("name", list(CASES))
def test_pipeline_input_is_the_reference_pixels(files, name):
    pixels = preprocess([load_image(str(files / name), background=BG)], R)
    expected = _release_geometry(CASES[name][1]).astype(np.float64) / 127.5 - 1.0
    assert pixels.shape == (1, R, R, 3)
    np.testing.assert_allclose(pixels[0], expected, rtol=0, atol=1e-6)


def test_reference_geometry_sees_orientation_and_transparency():
    """The cases are not vacuous: each transpose and the compositing change the stored
    square (a wrong decoder could not pass by chance)."""
    squares = {o: _release_geometry(CASES[f"exif_{o}"][1]) for o in range(1, 9)}
    assert len({sq.tobytes() for sq in squares.values()}) == 8
    assert (CASES["rgba"][1][:4] == BG).all() and (CASES["la"][1][:, :4] == BG).all()


# ---------------------------------------------------------------- size filters

SIZES = [(16, 16), (8, 8), (7, 20), (20, 7), (32, 8), (8, 32), (33, 8), (8, 33), (40, 50),
         (41, 50), (12, 12), (11, 30), (24, 12), (25, 12), (30, 50)]


def _expected_reason(size, *, min_side, max_aspect, max_pixels) -> str | None:
    """The rules in the order the builder applies them: pixel limit (at decode), then
    short side, then aspect ratio."""
    w, h = size
    if w * h > max_pixels:
        return "image_too_large"
    if min(w, h) < min_side:
        return "image_too_small"
    if max(w, h) / min(w, h) > max_aspect:
        return "bad_aspect_ratio"
    return None


@pytest.mark.parametrize("flags, rules, exercised", [
    # The defaults are the release's: every readable image, PIL's own pixel refusal.
    ([], dict(min_side=None, max_aspect=None, max_pixels=2 * 89_478_485), 0),
    (["--min-side", "8", "--max-aspect", "4"],  # half the resolution, 4:1
     dict(min_side=8, max_aspect=4.0, max_pixels=2 * 89_478_485), 2),
    (["--min-side", "12", "--max-aspect", "2", "--max-pixels", "2000"],
     dict(min_side=12, max_aspect=2.0, max_pixels=2000), 3),
])
def test_size_filters_skip_and_count_exactly_the_files_that_break_them(tmp_path, flags, rules,
                                                                        exercised):
    names = []
    for w, h in SIZES:
        name = f"{w}x{h}.png"
        Image.fromarray(RNG.integers(0, 256, (h, w, 3)).astype(np.uint8)).save(tmp_path / name)
        names.append(name)
    out = tmp_path / "out"
    assert cli.main(["build", "--jsonl", _jsonl(tmp_path / "c.jsonl", names, tmp_path),
                     "--kind", "t2i", "--out", str(out), "--resolution", "16",
                     "--image-format", "png", "--max-skip-fraction", "1", *flags]) == 0
    reasons = {name: _expected_reason(size, min_side=rules["min_side"] or 1,
                                      max_aspect=rules["max_aspect"] or float("inf"),
                                      max_pixels=rules["max_pixels"])
               for name, size in zip(names, SIZES)}
    expected = collections.Counter(r for r in reasons.values() if r)
    summary = read_summary(str(out))
    assert summary["skipped"] == dict(expected)
    assert len(expected) == exercised  # every rule is exercised
    assert (summary["min_side"], summary["max_aspect"], summary["max_pixels"]) == (
        rules["min_side"], rules["max_aspect"], rules["max_pixels"])
    kept = _stored(str(out), "png", 16)
    assert sorted(kept) == sorted(n for n, r in reasons.items() if r is None)
    assert summary["records"] == len(kept)


# ---------------------------------------------------------------- pipeline input sizes

@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from test_sampling_pipeline import tiny_components

    from unialign_jax.sampling.unialign_pipeline import UniAlignPipeline

    return UniAlignPipeline(tiny_components(tmp_path_factory.mktemp("tok")), batch_size=1,
                            progress=False)


@pytest.fixture
def no_compiles():
    compiles = []

    def listener(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(event)

    jax.monitoring.register_event_duration_secs_listener(listener)
    yield compiles
    jax.monitoring.unregister_event_duration_listener(listener)
    assert compiles == []


def _picture(w, h):
    return Image.fromarray(RNG.integers(0, 256, (h, w, 3)).astype(np.uint8))


@pytest.mark.parametrize("task", ["edit", "caption", "compose"])
def test_pipeline_refuses_tiny_inputs_before_compiling(pipe, no_compiles, task, tmp_path):
    # A 40x31 photo whose EXIF turns it to 31x40: the upright short side counts.
    path = tmp_path / "tiny.png"
    _picture(40, 31).save(path, exif=exif(6))
    calls = {"edit": lambda im: pipe.edit([im], "x", resolution=64),
             "caption": lambda im: pipe.caption([im], resolution=64),
             "compose": lambda im: pipe.compose([[_picture(64, 64), im]], "x", resolution=64)}
    with pytest.raises(InputError, match=r"31x40: its short side is below 32 px"):
        calls[task](str(path))


def test_pipeline_accepts_the_minimum_size(pipe, no_compiles):
    # 32 px passes the size check; the invalid step count then stops the call.
    with pytest.raises(InputError, match="num_steps"):
        pipe.edit([_picture(32, 45)], "x", resolution=64, num_steps=0)


def _warnings_for(pipe, caplog, w, h) -> str:
    """What `edit` at resolution 256 logs for a w×h input; the invalid step count stops the
    call right after the input checks, before anything compiles."""
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unialign_jax.sampling.preprocess"), \
            pytest.raises(InputError, match="num_steps"):
        pipe.edit([_picture(w, h)], "x", resolution=256, num_steps=0)
    return caplog.text


def test_pipeline_warns_when_it_upscales_more_than_4x(pipe, no_compiles, caplog):
    assert "(40x40) is upscaled 6.4× to 256x256" in _warnings_for(pipe, caplog, 40, 40)
    assert "upscaled" not in _warnings_for(pipe, caplog, 64, 80)  # 256 / 64: exactly 4×
