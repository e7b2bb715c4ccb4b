"""JSONL readers, image decoding faults, record layout and skip accounting, unit by unit."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from unialign_jax.data.build.faults import (SkipLog, SkipSample, TooManySkipped,
                                            check_skipped_fraction)
from unialign_jax import images
from unialign_jax.images import to_model_range
from unialign_jax.data.build.jsonl import LineRules, parse_line, read_jsonl
from unialign_jax.data.format.records import decode_record, encode_record


def _conv(caption):
    return [{"from": "human", "value": caption}, {"from": "gpt", "value": "<image>"}]


def test_text_to_image_line_resolves_paths_and_uses_the_caption_as_instruction():
    line = json.dumps({"image": ["sub/a.png"], "conversations": _conv(" a cat "),
                       "img_w": 3, "img_h": 4})
    s = parse_line(line, "t2i", "/data/corpus", "c.jsonl:1")
    assert s.images == ("/data/corpus/sub/a.png",)
    assert (s.caption, s.instruction, s.where) == ("a cat", "a cat", "c.jsonl:1")
    for location in ("/abs/x.png", "http://h/x.png", "https://h/x.png?a=1"):
        line = json.dumps({"image": [location], "conversations": _conv("c")})
        assert parse_line(line, "t2i", "/data", "w").target == location


def test_editing_and_composition_lines():
    edit = json.dumps({"image": ["s.png", "t.png"], "conversations": _conv("a blue cup"),
                       "instruction": "make the cup blue"})
    s = parse_line(edit, "edit", "/d", "w")
    assert (s.sources, s.target) == (("/d/s.png",), "/d/t.png")
    assert (s.caption, s.instruction) == ("a blue cup", "make the cup blue")
    compose = json.dumps({"image": ["1.png", "2.png", "3.png", "t.png"],
                          "conversations": _conv("all"), "instruction": "put them together"})
    assert len(parse_line(compose, "compose", "/d", "w").sources) == 3
    assert len(parse_line(compose.replace('"3.png", ', ""), "compose", "/d", "w",
                          LineRules(compose_sources=2)).sources) == 2


def test_release_composition_layout():
    """`FlexibleInternalData_compose`: original_images[0..K-1] are the sources,
    generated_images[0] the target, edit_prompt stripped of ' \\"' the instruction."""
    line = {"original_images": ["1.png", "2.png", "3.png", "4.png"],
            "generated_images": ["t.png", "u.png"], "edit_prompt": ' \\"put them together"\\ ',
            "caption": "a cup and a plate", "other": 1}
    s = parse_line(json.dumps(line), "compose", "/d", "w")
    assert s.sources == ("/d/1.png", "/d/2.png", "/d/3.png") and s.target == "/d/t.png"
    assert (s.instruction, s.caption) == ("put them together", "a cup and a plate")
    for rules, reason in ((LineRules(exact_images=True), "wrong_image_count"),
                          (LineRules(compose_sources=5), "wrong_image_count")):
        with pytest.raises(SkipSample) as err:
            parse_line(json.dumps(line), "compose", "/d", "w", rules)
        assert err.value.reason == reason
    assert parse_line(json.dumps({**line, "edit_prompt": ""}), "compose", "/d", "w"
                      ).instruction == ""
    for missing in ("original_images", "generated_images", "edit_prompt", "caption"):
        with pytest.raises(SkipSample) as err:
            parse_line(json.dumps({k: v for k, v in line.items() if k != missing}), "compose",
                       "/d", "w")
        assert err.value.reason == "missing_field"


def test_default_rules_are_the_releases():
    """As `dataset/data_unify.py` reads lines: image[0] (and image[1]) with extra images
    ignored, empty captions and instructions trained on; the strict rules skip both."""
    strict = LineRules(exact_images=True, keep_empty_text=False)
    t2i = json.dumps({"image": ["a.png", "b.png"], "conversations": _conv("")})
    s = parse_line(t2i, "t2i", "/d", "w")
    assert (s.images, s.caption, s.instruction) == (("/d/a.png",), "", "")
    edit = json.dumps({"image": ["s.png", "t.png", "x.png"], "conversations": _conv("c"),
                       "instruction": ""})
    s = parse_line(edit, "edit", "/d", "w")
    assert (s.sources, s.target, s.instruction) == (("/d/s.png",), "/d/t.png", "")
    for line, kind in ((t2i, "t2i"), (edit, "edit")):
        with pytest.raises(SkipSample) as err:
            parse_line(line, kind, "/d", "w", strict)
        assert err.value.reason == "wrong_image_count"
    for line, kind in ((t2i.replace('"b.png"', '"a.png"').replace(', "a.png"', ""), "t2i"),
                       (edit.replace(', "x.png"', ""), "edit")):
        with pytest.raises(SkipSample) as err:
            parse_line(line, kind, "/d", "w", strict)
        assert err.value.reason == "missing_field"
    # Composition in the `image` layout (target last) cannot drop extras: always exact.
    compose = json.dumps({"image": ["1", "2", "3", "4", "t"], "conversations": _conv("c"),
                          "instruction": "i"})
    with pytest.raises(SkipSample) as err:
        parse_line(compose, "compose", "/d", "w")
    assert err.value.reason == "wrong_image_count"


@pytest.mark.parametrize("line, kind, reason", [
    ('{"image": ["a.png"]', "t2i", "bad_json"),
    ("[1, 2]", "t2i", "bad_json"),
    (b'{"image": ["\xff.png"]}', "t2i", "bad_json"),
    ('{"conversations": [{"value": "c"}]}', "t2i", "missing_field"),
    ('{"image": [], "conversations": [{"value": "c"}]}', "t2i", "missing_field"),
    ('{"image": [3], "conversations": [{"value": "c"}]}', "t2i", "missing_field"),
    ('{"image": ["a.png"]}', "t2i", "missing_field"),
    ('{"image": ["a.png"], "conversations": []}', "t2i", "missing_field"),
    ('{"image": ["a.png"], "conversations": [{"from": "human"}]}', "t2i", "missing_field"),
    ('{"image": ["a", "b"], "conversations": [{"value": "c"}]}', "edit", "missing_field"),
    ('{"image": ["a", "b"], "conversations": [{"value": "c"}], "instruction": 5}', "edit",
     "missing_field"),
    ('{"image": ["a"], "conversations": [{"value": "c"}], "instruction": "i"}', "edit",
     "wrong_image_count"),
])
def test_malformed_lines_are_skipped_with_their_reason(line, kind, reason):
    for rules in (LineRules(), LineRules(exact_images=True, keep_empty_text=False)):
        with pytest.raises(SkipSample) as err:
            parse_line(line, kind, "/d", "w", rules)
        assert err.value.reason == reason


def test_read_jsonl_numbers_lines_and_ignores_blank_ones(tmp_path):
    good = json.dumps({"image": "a.png", "conversations": _conv("c")})
    (tmp_path / "c.jsonl").write_text(f"{good}\n\n  \nnot json\n{good}")
    out = list(read_jsonl(str(tmp_path / "c.jsonl"), "t2i"))
    assert [w.rsplit(":", 1)[1] for w, _ in out] == ["1", "4", "5"]
    assert [type(x).__name__ for _, x in out] == ["Sample", "SkipSample", "Sample"]
    assert out[0][1].target == os.path.join(str(tmp_path), "a.png")
    rooted = list(read_jsonl(str(tmp_path / "c.jsonl"), "t2i", LineRules(image_root="/root/x")))
    assert rooted[0][1].target == "/root/x/a.png"
    with pytest.raises(FileNotFoundError):
        list(read_jsonl(str(tmp_path / "missing.jsonl"), "t2i"))
    with pytest.raises(ValueError, match="unknown corpus kind"):
        list(read_jsonl(str(tmp_path / "c.jsonl"), "video"))


def _png_bytes(mode="RGB"):
    buf = io.BytesIO()
    Image.new(mode, (5, 3), 7).save(buf, format="PNG")
    return buf.getvalue()


def test_decoding_converts_every_mode_to_rgb_and_faults_become_skip_reasons():
    for mode in ("RGB", "RGBA", "L", "P", "I;16"):
        img = images.decode_image(_png_bytes(mode)).image
        assert (img.mode, img.size) == ("RGB", (5, 3))
    data = _png_bytes()
    for bad, reason in ((data[:len(data) // 2], "corrupt_image"), (b"hello", "not_an_image")):
        with pytest.raises(images.ImageError) as err:
            images.decode_image(bad, "x.png")
        assert err.value.reason == reason and "x.png" in err.value.detail
        assert reason in SkipSample.REASONS   # the builder counts it under the same reason


def test_model_range_maps_0_and_255_to_minus_one_and_one():
    out = to_model_range(np.array([0, 51, 255], np.uint8))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [-1.0, 51 / 127.5 - 1.0, 1.0], atol=1e-7)


def test_record_layout_round_trips_texts_and_image_bytes():
    images = [b"\x00\x01", b"", "é".encode() * 3]
    fields = {"caption": "un chat é", "instruction": "x", "where": "f:1"}
    data = encode_record(fields, images)
    got_fields, got_images = decode_record(data)
    assert got_fields == fields and [bytes(b) for b in got_images] == images
    with pytest.raises(ValueError, match="corrupt record"):
        decode_record(data + b"junk")


def test_skip_log_counts_merges_and_enforces_the_threshold():
    a, b = SkipLog(), SkipLog()
    for i in range(12):
        a.add(f"f:{i}", SkipSample("missing_image", "gone"))
    b.add("g:1", SkipSample("url_error", "HTTP 500"))
    a.merge(b)
    assert a.counts == {"missing_image": 12, "url_error": 1} and len(a.examples) == 10
    assert SkipLog.from_json(json.loads(json.dumps(a.to_json()))) == a
    check_skipped_fraction(a, 260, 0.05, "ok")  # exactly 5%
    with pytest.raises(TooManySkipped, match="13 of 259"):
        check_skipped_fraction(a, 259, 0.05, "run")
    with pytest.raises(ValueError):
        SkipSample("no_such_reason", "x")
