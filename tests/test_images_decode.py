"""unialign_jax.images: every kind of input decoded to RGB, checked against numpy references.

Each file is built here from known pixel values; the expected RGB is computed independently
with numpy arithmetic on those values (never from the decoder's own earlier output).
"""

from __future__ import annotations

import ast
import io
import pickle
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from image_files import (BG, ORIENT, UPRIGHT, chunk, cmyk_reference, composite, exif,
                         gif_frames, grey3, png, save, u16)
from unialign_jax import images
from unialign_jax.images import DecodeOptions, ImageError, check_size, decode_image, to_rgb

RNG = np.random.default_rng(1234)


# ---------------------------------------------------------------- helpers

def _rgb(decoded) -> np.ndarray:
    assert decoded.image.mode == "RGB"
    return np.asarray(decoded.image)


def _decode(data: bytes, **options):
    d = decode_image(data, "test", DecodeOptions(**options))
    return _rgb(d), d.notes


# ---------------------------------------------------------------- high bit depth

@pytest.mark.parametrize("fmt,mode", [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B"),
                                      ("PNG-hand", "I;16")])
def test_16bit_grey_is_scaled_not_clipped(fmt, mode):
    v = u16(RNG, (5, 7))
    if fmt == "PNG-hand":
        data = png(v, 0)
    else:
        img = Image.frombytes(mode, (7, 5), v.astype(">u2" if mode == "I;16B" else "<u2").tobytes())
        data = save(img, fmt)
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")
    got, notes = _decode(data)
    np.testing.assert_array_equal(got, grey3(np.rint(v / 257.0).astype(np.uint8)))
    assert "scaled_16bit" in notes


@pytest.mark.parametrize("interlace", [False, True])
@pytest.mark.parametrize("color_type", [2, 6, 4])  # RGB, RGBA, LA at 16 bits
def test_16bit_colour_png_exact(color_type, interlace):
    channels = {2: 3, 6: 4, 4: 2}[color_type]
    v = u16(RNG, (9, 11, channels))
    if channels in (2, 4):  # alpha: some transparent pixels hiding a bright colour, some opaque
        v[0, :, -1] = 0
        v[0, :, 0] = 65535
        v[1, :, -1] = 65535
    data = png(v, color_type, interlace=interlace)
    got, notes = _decode(data, background=BG)
    colour = v[..., :3] if channels >= 3 else grey3(v[..., 0])
    if channels in (2, 4):
        expected = composite(colour, v[..., -1], 65535, 65535)
        np.testing.assert_array_equal(got[0], np.broadcast_to(BG, got[0].shape))
        assert "alpha_composited" in notes
    else:
        expected = np.rint(colour / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(got, expected)
    assert "scaled_16bit" in notes and "16bit_high_byte" not in notes


def test_16bit_colour_keys():
    grey = np.array([[1000, 50000, 65535]], np.uint16)
    got, notes = _decode(png(grey, 0, extra=chunk(b"tRNS", struct.pack(">H", 50000))),
                         background=BG)
    np.testing.assert_array_equal(got[0], [[4] * 3, BG, [255] * 3])
    assert "alpha_composited" in notes
    # The key matches all 16 bits: (50000, 4, 5) is transparent, (50000, 4, 6) is not.
    rgb = np.array([[[50000, 4, 5], [50000, 4, 6], [257, 514, 771]]], np.uint16)
    got, _ = _decode(png(rgb, 2, extra=chunk(b"tRNS", struct.pack(">HHH", 50000, 4, 5))),
                     background=BG)
    np.testing.assert_array_equal(got[0], [BG, np.rint(np.array([50000, 4, 6]) / 257), [1, 2, 3]])


def test_int_mode():
    small = RNG.integers(0, 65536, (4, 6)).astype(np.int32)
    data = save(Image.fromarray(small), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "I"
    got, notes = _decode(data)
    np.testing.assert_array_equal(got, grey3(np.rint(small / 257.0)))
    assert "scaled_16bit" in notes
    # Beyond 16 bits: negatives clip to 0, then scaled by the image's own maximum.
    big = np.array([[-5, 0, 70000, 1_000_000], [500_000, 250_000, 3, 999_999]], np.int32)
    got, notes = _decode(save(Image.fromarray(big), "TIFF"))
    np.testing.assert_array_equal(got, grey3(np.rint(np.clip(big, 0, None) * 255 / 1_000_000)))
    assert "scaled_by_max" in notes


def test_16bit_pgm_opens_as_int_mode():
    v = u16(RNG, (3, 5))
    data = b"P5\n5 3\n65535\n" + v.astype(">u2").tobytes()
    assert Image.open(io.BytesIO(data)).mode == "I"
    got, _ = _decode(data)
    np.testing.assert_array_equal(got, grey3(np.rint(v / 257.0)))


def test_float_mode_is_taken_as_unit_range():
    v = np.array([[0.0, 0.5, 1.0, -0.25], [1.5, np.nan, 0.3, 1e-3]], np.float32)
    data = save(Image.fromarray(v), "TIFF")
    assert Image.open(io.BytesIO(data)).mode == "F"
    got, notes = _decode(data)
    ref = np.rint(np.clip(np.nan_to_num(v.astype(np.float64)), 0, 1) * 255)
    np.testing.assert_array_equal(got, grey3(ref))
    assert "scaled_float" in notes


# ---------------------------------------------------------------- colour spaces

def test_cmyk_tiff_exact():
    cmyk = RNG.integers(0, 256, (4, 5, 4)).astype(np.uint8)
    got, notes = _decode(save(Image.frombytes("CMYK", (5, 4), cmyk.tobytes()), "TIFF"))
    np.testing.assert_array_equal(got, cmyk_reference(cmyk))
    assert "cmyk_converted" in notes


def test_cmyk_jpeg_adobe_inverted():
    # Four flat 8x8 blocks, so the JPEG is near lossless. Pillow writes CMYK JPEGs inverted with
    # an Adobe APP14 marker (as Photoshop does) and un-inverts them when it reads the marker.
    colours = np.array([[10, 200, 30, 40], [250, 5, 128, 0], [0, 0, 0, 255], [60, 60, 180, 20]],
                       np.uint8)
    cmyk = np.kron(colours.reshape(2, 2, 4), np.ones((8, 8, 1), np.uint8))
    data = save(Image.frombytes("CMYK", (16, 16), cmyk.tobytes()), "JPEG", quality=100)
    assert "adobe" in Image.open(io.BytesIO(data)).info
    got, notes = _decode(data)
    assert np.abs(got.astype(int) - cmyk_reference(cmyk)).max() <= 3
    assert "cmyk_converted" in notes


def test_ycbcr_bilevel_grey_palette_lab():
    ycc = RNG.integers(16, 240, (3, 4, 3)).astype(np.uint8)
    got = _rgb(to_rgb(Image.frombytes("YCbCr", (4, 3), ycc.tobytes())))
    y, cb, cr = (ycc[..., i].astype(np.float64) for i in range(3))  # JFIF full-range formula
    ref = np.stack([y + 1.402 * (cr - 128), y - 0.344136 * (cb - 128) - 0.714136 * (cr - 128),
                    y + 1.772 * (cb - 128)], axis=-1)
    assert np.abs(got - np.clip(ref, 0, 255)).max() <= 1.01

    bits = RNG.integers(0, 2, (5, 9)).astype(bool)
    got, _ = _decode(save(Image.fromarray(bits), "PNG"))
    np.testing.assert_array_equal(got, grey3(bits * 255))

    grey = RNG.integers(0, 256, (4, 4)).astype(np.uint8)
    got, notes = _decode(save(Image.fromarray(grey), "PNG"))
    np.testing.assert_array_equal(got, grey3(grey))
    assert notes == ()

    table = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    idx = RNG.integers(0, 256, (4, 6)).astype(np.uint8)
    pal = Image.fromarray(idx, "P")
    pal.putpalette(table.tobytes())
    got, _ = _decode(save(pal, "PNG"))
    np.testing.assert_array_equal(got, table[idx])

    # CIELab TIFF, neutral greys (raw a = b = 0, signed as in TIFF) -> sRGB grey of lightness L*.
    lstar = np.array([20.0, 50.0, 80.0])
    lab = np.stack([np.rint(lstar * 255 / 100), [0] * 3, [0] * 3], -1).astype(np.uint8)
    got, notes = _decode(save(Image.frombytes("LAB", (3, 1), lab.tobytes()), "TIFF"))
    got = got[0]
    assert "lab_converted" in notes
    lq = lab[:, 0] * 100.0 / 255
    y = ((lq + 16) / 116) ** 3  # CIE L* -> Y (all three above the linear segment)
    srgb = np.where(y <= 0.0031308, 12.92 * y, 1.055 * y ** (1 / 2.4) - 0.055) * 255
    assert np.abs(got - srgb[:, None]).max() <= 2


# ---------------------------------------------------------------- transparency

def test_rgba_hidden_colour_never_shows():
    rgba = RNG.integers(0, 256, (6, 8, 4)).astype(np.uint8)
    rgba[:, :4, 3] = 0  # transparent left half, hiding random colours
    rgba[0, 4:, 3] = 255
    got, notes = _decode(save(Image.fromarray(rgba, "RGBA"), "PNG"), background=BG)
    np.testing.assert_array_equal(got, composite(rgba[..., :3], rgba[..., 3], 255, 255))
    np.testing.assert_array_equal(got[:, :4], np.broadcast_to(BG, (6, 4, 3)))
    assert "alpha_composited" in notes
    white, _ = _decode(save(Image.fromarray(rgba, "RGBA"), "PNG"))
    np.testing.assert_array_equal(white[:, :4], np.full((6, 4, 3), 255))


def test_opaque_rgba_is_not_composited():
    rgba = RNG.integers(0, 256, (3, 3, 4)).astype(np.uint8)
    rgba[..., 3] = 255
    got, notes = _decode(save(Image.fromarray(rgba, "RGBA"), "PNG"), background=BG)
    np.testing.assert_array_equal(got, rgba[..., :3])
    assert notes == ()


def test_la_and_pa_and_premultiplied():
    la = RNG.integers(0, 256, (4, 5, 2)).astype(np.uint8)
    la[0, :, 1] = 0
    got, _ = _decode(save(Image.fromarray(la, "LA"), "PNG"), background=BG)
    np.testing.assert_array_equal(got, composite(grey3(la[..., 0]), la[..., 1], 255, 255))

    table = RNG.integers(0, 256, (256, 3)).astype(np.uint8)
    pa = np.stack([RNG.integers(0, 256, (3, 4)), RNG.integers(0, 256, (3, 4))], -1)
    img = Image.frombytes("PA", (4, 3), pa.astype(np.uint8).tobytes())
    img.putpalette(table.tobytes())
    got = _rgb(to_rgb(img, DecodeOptions(background=BG)))
    np.testing.assert_array_equal(got, composite(table[pa[..., 0]], pa[..., 1], 255, 255))

    # Premultiplied "RGBa" (alpha 255 or 0 only, so un-premultiplying is exact).
    rgba = RNG.integers(0, 256, (2, 3, 4)).astype(np.uint8)
    rgba[..., 3] = [[255, 0, 255], [0, 255, 255]]
    rgba[..., :3][rgba[..., 3] == 0] = 0
    got = _rgb(to_rgb(Image.frombytes("RGBa", (3, 2), rgba.tobytes()),
                      DecodeOptions(background=BG)))
    np.testing.assert_array_equal(got, composite(rgba[..., :3], rgba[..., 3], 255, 255))


@pytest.mark.parametrize("kind", ["index", "bytes"])
def test_palette_transparency(kind):
    table = RNG.integers(0, 256, (16, 3)).astype(np.uint8)
    idx = RNG.integers(0, 16, (5, 6)).astype(np.uint8)
    idx[0, 0] = 3
    img = Image.fromarray(idx, "P")
    img.putpalette(table.tobytes())
    if kind == "index":
        trns, alpha_table = 3, np.where(np.arange(16) == 3, 0, 255)
    else:
        alpha_table = RNG.integers(0, 256, 16)
        alpha_table[3] = 0
        trns = bytes(alpha_table.astype(np.uint8))
    got, notes = _decode(save(img, "PNG", transparency=trns), background=BG)
    np.testing.assert_array_equal(got, composite(table[idx], alpha_table[idx], 255, 255))
    assert tuple(got[0, 0]) == BG and "alpha_composited" in notes


def test_palette_with_rgba_palette():
    table = RNG.integers(0, 256, (4, 4)).astype(np.uint8)
    idx = RNG.integers(0, 4, (3, 3)).astype(np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette(table.tobytes(), "RGBA")
    got = _rgb(to_rgb(img, DecodeOptions(background=BG)))
    np.testing.assert_array_equal(got, composite(table[idx, :3], table[idx, 3], 255, 255))


def test_colour_keys_rgb_and_grey():
    rgb = RNG.integers(0, 256, (3, 4, 3)).astype(np.uint8)
    rgb[1, 2] = (7, 8, 9)
    got, _ = _decode(save(Image.fromarray(rgb), "PNG", transparency=(7, 8, 9)), background=BG)
    key = np.all(rgb == (7, 8, 9), axis=-1)
    np.testing.assert_array_equal(got, np.where(key[..., None], BG, rgb))
    grey = RNG.integers(0, 256, (3, 4)).astype(np.uint8)
    grey[0, 0] = 42
    got, _ = _decode(save(Image.fromarray(grey), "PNG", transparency=42), background=BG)
    np.testing.assert_array_equal(got, np.where((grey == 42)[..., None], BG, grey3(grey)))


# ---------------------------------------------------------------- EXIF orientation

@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("TIFF", {}), ("WEBP", {"lossless": True})])
def test_exif_orientation_lossless(orientation, fmt, kw):
    data = save(Image.fromarray(ORIENT), fmt, exif=exif(orientation), **kw)
    got, notes = _decode(data)
    np.testing.assert_array_equal(got, UPRIGHT[orientation](ORIENT))
    assert ("exif_transposed" in notes) == (orientation != 1)
    kept, notes = _decode(data, exif_orientation=False)
    np.testing.assert_array_equal(kept, ORIENT)
    assert ("exif_orientation_kept" in notes) == (orientation != 1)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_jpeg(orientation):
    big = np.kron(ORIENT, np.ones((8, 8, 1), np.uint8))  # 8x8 flat blocks: near lossless
    data = save(Image.fromarray(big), "JPEG", quality=100, subsampling=0,
                 exif=exif(orientation))
    got, _ = _decode(data)
    expected = UPRIGHT[orientation](big)
    assert got.shape == expected.shape
    assert np.abs(got.astype(int) - expected).max() <= 8


def test_decoding_again_is_a_no_op():
    data = save(Image.fromarray(ORIENT), "PNG", exif=exif(6))
    first = decode_image(data)
    again = to_rgb(first.image)
    np.testing.assert_array_equal(_rgb(again), _rgb(first))
    assert again.notes == ()


# ---------------------------------------------------------------- animations

def test_animated_gif_first_frame():
    frames, tables, idxs = gif_frames(RNG)
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50,
                 loop=0, optimize=False)
    got, notes = _decode(data)
    np.testing.assert_array_equal(got, tables[0][idxs[0]])
    assert "first_frame_of_3" in notes
    # to_rgb goes back to the first frame of an image left on another frame.
    img = Image.open(io.BytesIO(data))
    img.seek(2)
    np.testing.assert_array_equal(_rgb(to_rgb(img)), tables[0][idxs[0]])


def test_animated_gif_transparent_first_frame():
    frames, tables, idxs = gif_frames(RNG)
    idxs[0][0, :] = 5
    frames[0] = Image.fromarray(idxs[0], "P")
    frames[0].putpalette(tables[0].tobytes())
    data = save(frames[0], "GIF", save_all=True, append_images=frames[1:], transparency=5,
                 optimize=False, disposal=2)
    got, _ = _decode(data, background=BG)
    expected = np.where((idxs[0] == 5)[..., None], BG, tables[0][idxs[0]])
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("fmt,kw", [("PNG", {}), ("WEBP", {"lossless": True})])
def test_animated_png_webp_first_frame(fmt, kw):
    arrays = [RNG.integers(0, 256, (4, 5, 3)).astype(np.uint8) for _ in range(3)]
    frames = [Image.fromarray(a) for a in arrays]
    data = save(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **kw)
    got, notes = _decode(data)
    np.testing.assert_array_equal(got, arrays[0])
    assert "first_frame_of_3" in notes


# ---------------------------------------------------------------- errors

def _noise_file(fmt: str) -> bytes:
    return save(Image.fromarray(RNG.integers(0, 256, (64, 64, 3)).astype(np.uint8)), fmt)


@pytest.mark.parametrize("data,reason", [
    (b"", "empty_image"),
    (b"<!DOCTYPE html><html><body>404 Not Found</body></html>", "not_an_image"),
    (bytes(range(256)) * 4, "not_an_image"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", "corrupt_image"),
    (b"\xff\xd8\xff\xe0\x00", "corrupt_image"),
])
def test_errors_for_non_images(data, reason):
    with pytest.raises(ImageError) as e:
        decode_image(data, "x.png")
    assert e.value.reason == reason and "x.png" in str(e.value)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP", "TIFF", "BMP"])
def test_truncated_files_are_corrupt(fmt):
    data = _noise_file(fmt)
    _decode(data)  # whole file decodes
    with pytest.raises(ImageError) as e:
        decode_image(data[: len(data) // 2], "cut")
    assert e.value.reason == "corrupt_image"


def test_decompression_bomb_and_max_pixels():
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
            + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b""))
    assert len(bomb) < 200
    with pytest.raises(ImageError) as e:
        decode_image(bomb)
    assert e.value.reason == "image_too_large"
    data = save(Image.new("RGB", (10, 12)), "PNG")
    _decode(data, max_pixels=120)  # exactly at the limit: accepted
    for call in (lambda o: decode_image(data, options=o),
                 lambda o: to_rgb(Image.open(io.BytesIO(data)), o)):
        with pytest.raises(ImageError) as e:
            call(DecodeOptions(max_pixels=119))
        assert e.value.reason == "image_too_large"


def test_image_error_contract():
    e = ImageError("corrupt_image", "a.jpg: cut")
    assert isinstance(e, ValueError) and str(e) == "corrupt_image: a.jpg: cut"
    back = pickle.loads(pickle.dumps(e))
    assert (back.reason, back.detail) == ("corrupt_image", "a.jpg: cut")
    with pytest.raises(ValueError):
        ImageError("nope", "x")
    assert {"not_an_image", "corrupt_image", "image_too_large", "image_too_small",
            "bad_aspect_ratio"} <= set(images.REASONS)


def test_options_validation():
    with pytest.raises(ValueError):
        DecodeOptions(background=(0, 0, 256))
    with pytest.raises(ValueError):
        DecodeOptions(max_pixels=0)
    assert DecodeOptions().max_pixels == 89_478_485


# ---------------------------------------------------------------- size filters

def test_check_size_boundaries():
    check_size((256, 300), min_side=256, max_aspect=3.0)
    check_size((300, 256), min_side=256, max_aspect=3.0)
    for size in [(255, 300), (300, 255), (0, 0)]:
        with pytest.raises(ImageError) as e:
            check_size(size, min_side=256, max_aspect=3.0, name="s.jpg")
        assert e.value.reason == "image_too_small" and "s.jpg" in e.value.detail
    check_size((300, 100), min_side=1, max_aspect=3.0)
    check_size((100, 300), min_side=1, max_aspect=3.0)
    check_size((110, 100), min_side=1, max_aspect=1.1)
    for size, limit in [((301, 100), 3.0), ((100, 301), 3.0), ((111, 100), 1.1)]:
        with pytest.raises(ImageError) as e:
            check_size(size, min_side=1, max_aspect=limit)
        assert e.value.reason == "bad_aspect_ratio"


# ---------------------------------------------------------------- to_rgb == decode_image

def _sample_files() -> dict:
    rgba = RNG.integers(0, 256, (5, 6, 4)).astype(np.uint8)
    rgba[0, :, 3] = 0
    frames, _, _ = gif_frames(RNG)
    return {
        "grey16": png(u16(RNG, (4, 5)), 0),
        "rgb16": png(u16(RNG, (4, 5, 3)), 2),
        "rgba16": png(u16(RNG, (4, 5, 4)), 6, interlace=True),
        "la16": png(u16(RNG, (4, 5, 2)), 4),
        "rgba": save(Image.fromarray(rgba, "RGBA"), "PNG"),
        "exif6": save(Image.fromarray(ORIENT), "JPEG", exif=exif(6)),
        "cmyk": save(Image.frombytes("CMYK", (2, 2), bytes(range(16))), "TIFF"),
        "float": save(Image.fromarray(RNG.random((3, 3)).astype(np.float32)), "TIFF"),
        "gif": save(frames[0], "GIF", save_all=True, append_images=frames[1:]),
    }


@pytest.mark.parametrize("name", list(_sample_files()))
def test_to_rgb_matches_decode_image(name, tmp_path):
    data = _sample_files()[name]
    ref = decode_image(data, options=DecodeOptions(background=BG))
    opened = to_rgb(Image.open(io.BytesIO(data)), DecodeOptions(background=BG))
    path = tmp_path / "f"
    path.write_bytes(data)
    with Image.open(path) as img:  # a file PIL closes after loading
        from_path = to_rgb(img, DecodeOptions(background=BG))
    for other in (opened, from_path):
        np.testing.assert_array_equal(_rgb(other), _rgb(ref))
        assert other.notes == ref.notes


def test_to_rgb_in_memory_matches_png_bytes():
    rgba = Image.fromarray(RNG.integers(0, 256, (4, 4, 4)).astype(np.uint8), "RGBA")
    grey16 = Image.fromarray(u16(RNG, (4, 4)))
    for img in (rgba, grey16):
        a, b = to_rgb(img), decode_image(save(img, "PNG"))
        np.testing.assert_array_equal(_rgb(a), _rgb(b))
        assert a.notes == b.notes


def test_module_imports_only_stdlib_numpy_pil():
    tree = ast.parse(open(images.__file__).read())
    roots = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            roots.add(node.module.split(".")[0])
    assert roots <= {"__future__", "dataclasses", "io", "warnings", "numpy", "PIL"}, roots
