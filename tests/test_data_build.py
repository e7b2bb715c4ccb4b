"""Shard builder: exact skip accounting on a corpus with every kind of fault, URLs from a
local HTTP server, the failure threshold, resume after an interruption, parallel workers."""

import http.server
import json
import logging
import os
import struct
import threading
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from unialign_jax.data import cli
from unialign_jax.data.build import shards
from unialign_jax.data.build.faults import TooManySkipped
from unialign_jax.data.build.fetch import FetchOptions
from unialign_jax.data.build.jsonl import LineRules
from unialign_jax.data.build.shards import BuildOptions, build
from unialign_jax.data.format.records import decode_record, read_summary, record_files
from unialign_jax.data.format.stored_images import decode_stored

FAST_FETCH = FetchOptions(timeout=0.3, retries=1, backoff=0.0)
# Ours, not the release's: a t2i line with two images and a blank caption are faults here.
STRICT = LineRules(exact_images=True, keep_empty_text=False)


class _Handler(http.server.BaseHTTPRequestHandler):
    root = ""
    hits: dict = {}

    def log_message(self, *args):
        pass

    def _send(self, code, body=b""):
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        kind, _, name = self.path.strip("/").partition("/")
        self.hits[self.path] = self.hits.get(self.path, 0) + 1
        if kind == "status":
            self._send(int(name))
        elif kind == "slow":
            time.sleep(1.5)
            self._send(200, b"late")
        elif kind == "flaky" and self.hits[self.path] == 1:
            self._send(503)
        else:
            with open(os.path.join(self.root, name), "rb") as f:
                self._send(200, f.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    _Handler.root = str(root)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", root
    httpd.shutdown()
    httpd.server_close()


def _png(path, size, colour, mode="RGB"):
    Image.new("RGB", size, colour).convert(mode).save(path, format="PNG")


def _bomb_png(path):
    """A valid 1x1 PNG whose header claims 30000 x 30000 pixels (past PIL's bomb limit)."""
    raw = bytearray(open(path, "rb").read())
    ihdr = raw[8 + 8:8 + 8 + 13]
    ihdr[0:8] = struct.pack(">II", 30000, 30000)
    raw[16:29] = ihdr
    raw[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + bytes(ihdr)))
    open(path, "wb").write(bytes(raw))


def _line(images, caption="a photo", **extra):
    return json.dumps({"image": images, "conversations": [
        {"from": "human", "value": caption}, {"from": "gpt", "value": "<image>"}], **extra})


@pytest.fixture(scope="module")
def faulty_corpus(tmp_path_factory, server):
    """A t2i JSONL with good records (paths and URLs) and each kind of fault."""
    url, served = server
    d = tmp_path_factory.mktemp("corpus")
    os.makedirs(d / "img")
    for i, size in enumerate([(40, 60), (61, 37), (32, 32), (50, 50), (45, 80), (70, 33)]):
        _png(d / "img" / f"g{i}.png", size, (40 * i, 10, 200), mode=["RGB", "L", "RGBA"][i % 3])
    _png(served / "remote.png", (48, 36), (0, 128, 255))
    _png(served / "retry.png", (36, 48), (255, 128, 0))
    lines = [
        _line(["img/g0.png"], "good relative"),
        _line([str(d / "img" / "g1.png")], "good absolute"),
        _line("img/g2.png", "good single string path"),
        _line([f"{url}/file/remote.png"], "good url"),
        _line([f"{url}/flaky/retry.png"], "good after one 503"),
        _line(["img/g3.png"], "good 5"), _line(["img/g4.png"], "good 6"),
        _line(["img/g5.png"], "good 7"),
    ]
    good_captions = [json.loads(x)["conversations"][0]["value"] for x in lines]

    truncated = (d / "img" / "g0.png").read_bytes()
    (d / "img" / "truncated.png").write_bytes(truncated[:len(truncated) // 2])
    (d / "img" / "zero.png").write_bytes(b"")
    (d / "img" / "text.png").write_text("this is not an image\n")
    _png(d / "img" / "bomb.png", (1, 1), (0, 0, 0))
    _bomb_png(d / "img" / "bomb.png")
    expected = {"bad_json": 2, "missing_field": 3, "wrong_image_count": 1, "missing_image": 1,
                "empty_image": 1, "not_an_image": 1, "corrupt_image": 1, "image_too_large": 1,
                "url_timeout": 1, "url_error": 2}
    lines += [
        '{"image": ["img/g0.png"], "conversations": [',        # bad_json: truncated line
        '["img/g0.png"]',                                       # bad_json: not an object
        json.dumps({"image": ["img/g0.png"]}),                  # missing_field: no conversations
        _line(["img/g0.png"], caption="   "),                   # missing_field: blank caption
        json.dumps({"conversations": [{"from": "human", "value": "x"}]}),  # missing_field: image
        _line(["img/g0.png", "img/g1.png"]),                    # wrong_image_count
        _line(["img/nowhere.png"]),                             # missing_image
        _line(["img/zero.png"]),                                # empty_image
        _line(["img/text.png"]),                                # not_an_image
        _line(["img/truncated.png"]),                           # corrupt_image
        _line(["img/bomb.png"]),                                # image_too_large
        _line([f"{url}/slow/x.png"]),                           # url_timeout
        _line([f"{url}/status/404"]),                           # url_error
        _line([f"{url}/status/500"]),                           # url_error (after a retry)
    ]
    path = d / "corpus.jsonl"
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line
    return str(path), good_captions, expected


def _captions(folder):
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for path in record_files(folder, read_summary(folder)):
        reader = ArrayRecordReader(path)
        out += [decode_record(r)[0]["caption"] for r in reader.read_all()]
        reader.close()
    return out


def _records(folder):
    from array_record.python.array_record_module import ArrayRecordReader

    out = []
    for path in record_files(folder, read_summary(folder)):
        reader = ArrayRecordReader(path)
        out += list(reader.read_all())
        reader.close()
    return out


def test_every_fault_is_skipped_and_counted_exactly(faulty_corpus, tmp_path, caplog):
    path, good_captions, expected = faulty_corpus
    opts = BuildOptions(kind="t2i", resolution=16, records_per_shard=5, threads=4,
                        fetch=FAST_FETCH, max_skip_fraction=1.0, lines=STRICT)
    hits = dict(_Handler.hits)
    with caplog.at_level(logging.WARNING):
        summary = build([path], str(tmp_path / "out"), opts)

    assert summary["records"] == len(good_captions)
    assert summary["skipped"] == expected
    assert summary["lines"] == len(good_captions) + sum(expected.values())
    assert read_summary(str(tmp_path / "out")) == summary
    assert sorted(_captions(str(tmp_path / "out"))) == sorted(good_captions)
    # 5xx answers are retried (1 retry here), 4xx answers are not.
    assert _Handler.hits["/status/500"] - hits.get("/status/500", 0) == 2
    assert _Handler.hits["/status/404"] - hits.get("/status/404", 0) == 1
    # The first faults are logged with their file and line (line 10 is the truncated JSON).
    assert f"{path}:10: bad_json" in caplog.text
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".")]


def test_too_many_skips_fails_loudly_and_keeps_progress(faulty_corpus, tmp_path, monkeypatch):
    path, good_captions, _ = faulty_corpus
    out = str(tmp_path / "out")
    # Parsing alone skips 6 of 22 lines (27%); with the images it is 14 of 22 (64%).
    opts = BuildOptions(kind="t2i", resolution=16, records_per_shard=5, fetch=FAST_FETCH,
                        max_skip_fraction=0.5, lines=STRICT)
    with pytest.raises(TooManySkipped, match="14 of 22 samples skipped"):
        build([path], out, opts)
    assert not os.path.exists(out)

    calls = []
    monkeypatch.setattr(shards, "build_shard", lambda *a: calls.append(a))
    relaxed = BuildOptions(kind="t2i", resolution=16, records_per_shard=5, fetch=FAST_FETCH,
                           max_skip_fraction=0.9, lines=STRICT)
    assert build([path], out, relaxed)["records"] == len(good_captions)
    assert calls == []  # every shard was already done


def test_parse_faults_alone_fail_before_any_image_is_read(tmp_path, monkeypatch):
    (tmp_path / "c.jsonl").write_text("not json\n" * 3 + _line(["a.png"]) + "\n")
    monkeypatch.setattr(shards, "build_shard", lambda *a: pytest.fail("images were read"))
    with pytest.raises(TooManySkipped, match="parsing: 3 of 4"):
        build([str(tmp_path / "c.jsonl")], str(tmp_path / "out"), BuildOptions(kind="t2i"))


def test_by_default_the_release_lines_and_images_are_all_kept(faulty_corpus, tmp_path):
    """The release trains on a t2i line's image[0] whatever follows it, on a blank caption
    and on images of any size or shape (upscaled, centre-cropped): the default build keeps
    them all and skips only what the release cannot read."""
    path, good_captions, expected = faulty_corpus
    d = tmp_path / "sizes"
    os.makedirs(d)
    sizes = {"tiny": (3, 2), "long": (90, 9), "tall": (6, 70)}
    for name, size in sizes.items():
        _png(d / f"{name}.png", size, (200, 30, 30))
    lines = [_line([f"{name}.png"], name) for name in sizes]
    (d / "c.jsonl").write_text("\n".join(lines) + "\n")
    summary = build([path, str(d / "c.jsonl")], str(tmp_path / "out"),
                    BuildOptions(kind="t2i", resolution=16, fetch=FAST_FETCH,
                                 max_skip_fraction=1.0))
    kept = {**expected, "missing_field": expected["missing_field"] - 1}
    del kept["wrong_image_count"]
    assert summary["skipped"] == kept
    assert sorted(_captions(str(tmp_path / "out"))) == sorted(
        good_captions + ["", "a photo", *sizes])
    assert (summary["min_side"], summary["max_aspect"], summary["max_pixels"]) == (
        None, None, 2 * 89_478_485)
    assert (summary["exact_images"], summary["keep_empty_text"], summary["image_root"]) == (
        False, True, None)


def test_release_composition_jsonl_builds(tmp_path):
    """A compose corpus in the release's layout (original_images, generated_images,
    edit_prompt, caption) → records of 3 sources + the target, in that order."""
    os.makedirs(tmp_path / "img")
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    lines = []
    for i in range(3):
        names = [f"img/{i}_{k}.png" for k in range(4)]
        for name, colour in zip(names, colours):
            _png(tmp_path / name, (20, 24), colour)
        lines.append(json.dumps({"original_images": names[:3], "generated_images": names[3:],
                                 "edit_prompt": f' "put {i} together" ', "caption": f"c{i}"}))
    (tmp_path / "comp.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert cli.main(["build", "--jsonl", str(tmp_path / "comp.jsonl"), "--kind", "compose",
                     "--out", str(out), "--resolution", "16", "--image-format", "raw"]) == 0
    summary = read_summary(str(out))
    assert (summary["records"], summary["num_sources"], summary["skipped"]) == (3, 3, {})
    for i, record in enumerate(_records(str(out))):
        fields, blobs = decode_record(record)
        assert (fields["caption"], fields["instruction"]) == (f"c{i}", f"put {i} together")
        assert [tuple(decode_stored(b, "raw", 16)[8, 8]) for b in blobs] == colours


def _edit_corpus(d, n):
    os.makedirs(d / "img", exist_ok=True)
    lines = []
    for i in range(n):
        _png(d / "img" / f"s{i}.png", (30 + i, 20), (i * 9, 0, 0))
        _png(d / "img" / f"t{i}.png", (20, 30 + i), (0, i * 9, 0))
        lines.append(_line([f"img/s{i}.png", f"img/t{i}.png"], f"target {i}",
                           instruction=f"edit {i}"))
    lines.insert(3, _line(["img/s0.png", "img/missing.png"], instruction="x"))
    (d / "edit.jsonl").write_text("\n".join(lines) + "\n")
    return str(d / "edit.jsonl")


def test_interrupted_build_resumes_and_matches_a_parallel_build(tmp_path, monkeypatch):
    path = _edit_corpus(tmp_path, 11)
    opts = dict(kind="edit", resolution=16, records_per_shard=3, max_skip_fraction=0.1)
    reference = build([path], str(tmp_path / "parallel"), BuildOptions(**opts, workers=2))
    assert reference["records"] == 11 and reference["skipped"] == {"missing_image": 1}

    real, calls = shards.build_shard, []

    def crash_on_third(*args):
        calls.append(args[1])
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(*args)

    monkeypatch.setattr(shards, "build_shard", crash_on_third)
    out = str(tmp_path / "serial")
    with pytest.raises(RuntimeError, match="simulated crash"):
        build([path], out, BuildOptions(**opts))
    assert not os.path.exists(out)
    calls.clear()
    summary = build([path], out, BuildOptions(**opts))
    assert calls == ["edit-00002-of-00004", "edit-00003-of-00004"]  # only the unfinished ones
    assert summary == reference
    assert _records(out) == _records(str(tmp_path / "parallel"))
    fields, images = decode_record(_records(out)[0])
    assert (fields["caption"], fields["instruction"], len(images)) == ("target 0", "edit 0", 2)


def test_existing_output_and_changed_inputs_are_refused(tmp_path):
    path = _edit_corpus(tmp_path, 4)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli.main(["build", "--jsonl", path, "--kind", "edit", "--out", str(out),
                     "--resolution", "16"]) == 2
    assert (out / "keep.txt").exists()

    staging = shards.staging_dir(str(tmp_path / "other"))
    os.makedirs(staging)
    with open(os.path.join(staging, shards.PLAN), "w") as f:
        json.dump({"kind": "edit", "inputs": []}, f)
    opts = BuildOptions(kind="edit", resolution=16, max_skip_fraction=0.5)
    with pytest.raises(FileExistsError, match="unfinished build of other inputs"):
        build([path], str(tmp_path / "other"), opts)
    assert build([path], str(tmp_path / "other"), opts, force=True)["records"] == 4
    with pytest.raises(FileNotFoundError):
        build([str(tmp_path / "none.jsonl")], str(tmp_path / "n"), BuildOptions(kind="edit"))


def test_stored_formats_round_trip(tmp_path):
    path = _edit_corpus(tmp_path, 2)
    arrays = {}
    for fmt in ("png", "raw", "jpeg"):
        out = str(tmp_path / fmt)
        build([path], out, BuildOptions(kind="edit", resolution=16, image_format=fmt,
                                          max_skip_fraction=0.5))
        arrays[fmt] = [decode_stored(b, fmt, 16) for b in decode_record(_records(out)[0])[1]]
    for png, raw, jpeg in zip(arrays["png"], arrays["raw"], arrays["jpeg"]):
        np.testing.assert_array_equal(png, raw)
        assert np.abs(png.astype(int) - jpeg).mean() < 3
