"""Downloads that cannot hurt a build: a byte cap (Content-Length and while reading) and a
deadline per image, against a local HTTP server that streams without end or drips bytes."""

import http.server
import json
import threading
import time
import tracemalloc

import numpy as np
import pytest
from PIL import Image

from unialign_jax.data import cli
from unialign_jax.data.build.faults import REASONS, SkipSample
from unialign_jax.data.build.fetch import MIB, FetchOptions, download
from unialign_jax.data.format.records import read_summary

STREAM_BOUND = 256 * MIB  # what the endless stream sends at most if nobody cuts it
DRIP_BOUND = 10.0         # seconds a drip lasts at most if nobody cuts it
DRIP_EVERY = 0.05         # seconds between dripped bytes
_BLOCK = b"\0" * (64 * 1024)


class _Handler(http.server.BaseHTTPRequestHandler):
    """/file/NAME (?nolength: no Content-Length, the body ends at the close), /endless (no
    length), /drip (the body a byte at a time), /claims-huge (Content-Length 10 GB, then a
    drip), /drip-headers (the headers a byte at a time), /status/CODE."""

    files: dict = {}
    hits: dict = {}
    sent: dict = {}

    def log_message(self, *args):
        pass

    def do_GET(self):
        path, _, query = self.path.partition("?")
        kind, _, name = path.strip("/").partition("/")
        self.hits[path] = self.hits.get(path, 0) + 1
        try:
            if kind == "drip-headers":
                self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Drip: ")
            else:
                self._headers(kind, name, query)
            if kind == "file":
                self.wfile.write(self.files[name])
            elif kind == "endless":
                self._stream(path)
            elif kind in ("drip", "drip-headers", "claims-huge"):
                self._drip(path)
        except OSError:  # the client hung up: what the limits are for
            pass

    def _headers(self, kind, name, query):
        self.send_response(int(name) if kind == "status" else 200)
        if kind == "file" and query != "nolength":
            self.send_header("Content-Length", str(len(self.files[name])))
        elif kind == "claims-huge":
            self.send_header("Content-Length", str(10 ** 10))
        elif kind == "drip":
            self.send_header("Content-Length", str(10 ** 6))
        self.end_headers()

    def _stream(self, path):
        self.sent[path] = 0
        while self.sent[path] < STREAM_BOUND:
            self.wfile.write(_BLOCK)
            self.sent[path] += len(_BLOCK)

    def _drip(self, path):
        self.sent[path] = 0
        end = time.monotonic() + DRIP_BOUND
        while time.monotonic() < end:
            self.wfile.write(b"x")
            self.sent[path] += 1
            time.sleep(DRIP_EVERY)


@pytest.fixture(scope="module")
def url():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _reason(call) -> str:
    with pytest.raises(SkipSample) as e:
        call()
    return e.value.reason


@pytest.mark.parametrize("query", ["", "?nolength"])
def test_byte_cap_is_exact_from_the_header_and_while_reading(url, query):
    body = bytes(range(256)) * 1000 + b"end"
    _Handler.files["body"] = body
    at_cap = FetchOptions(max_bytes=len(body))
    assert download(f"{url}/file/body{query}", at_cap) == body
    below = FetchOptions(max_bytes=len(body) - 1, retries=3)
    hits = _Handler.hits.get("/file/body", 0)
    assert _reason(lambda: download(f"{url}/file/body{query}", below)) == "url_too_large"
    assert _Handler.hits["/file/body"] - hits == 1  # not retried: it would not get smaller


def test_endless_stream_is_cut_at_the_cap_with_bounded_memory(url):
    opts = FetchOptions(max_bytes=MIB)
    tracemalloc.start()
    try:
        assert _reason(lambda: download(f"{url}/endless", opts)) == "url_too_large"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * MIB, peak  # the cap plus one buffer copy, not the 256 MiB stream
    # A large Content-Length is refused at once: reading its drip would end in url_too_slow.
    assert _reason(lambda: download(f"{url}/claims-huge", opts)) == "url_too_large"


@pytest.mark.parametrize("what", ["drip", "drip-headers"])
def test_drip_is_cut_at_the_deadline(url, what):
    opts = FetchOptions(timeout=0.5, deadline=1.0)
    start = time.monotonic()
    assert _reason(lambda: download(f"{url}/{what}", opts)) == "url_too_slow"
    took = time.monotonic() - start
    # The deadline, not the drip's 10 s (bounds wide enough for a loaded CI machine).
    assert 1.0 <= took < DRIP_BOUND / 2, took
    # Each byte arrives well within the per-read timeout: only the deadline can stop it.
    assert DRIP_EVERY < opts.timeout


def test_https_goes_through_the_same_limits(url):
    """An https URL uses the watched TLS connection: here the server speaks plain HTTP, so
    the handshake fails, as a url_error and without a traceback."""
    https = url.replace("http://", "https://")
    with pytest.raises(SkipSample) as e:
        download(f"{https}/file/x", FetchOptions(retries=0))
    assert e.value.reason == "url_error" and "SSL" in e.value.detail, e.value.detail


def test_deadline_covers_retries_and_pauses(url):
    opts = FetchOptions(retries=5, backoff=0.4, deadline=1.0)
    hits = _Handler.hits.get("/status/503", 0)
    start = time.monotonic()
    assert _reason(lambda: download(f"{url}/status/503", opts)) == "url_error"
    # Tries at 0 s and 0.4 s; the next would start at 1.2 s, past the deadline.
    assert _Handler.hits["/status/503"] - hits == 2
    assert time.monotonic() - start < DRIP_BOUND / 2


@pytest.mark.parametrize("bad", [dict(max_bytes=0), dict(deadline=0), dict(timeout=-1),
                                 dict(retries=-1)])
def test_options_are_checked(bad):
    with pytest.raises(ValueError):
        FetchOptions(**bad)


def test_build_counts_cut_downloads_and_finishes_with_bounded_memory(url, tmp_path):
    """`unialign-data build` with the new flags: the endless stream, the 10 GB
    Content-Length and the drip are each skipped with their reason, the rest is kept."""
    from array_record.python import array_record_module  # noqa: F401 (imported before measuring)

    good = []
    for i in range(3):
        buf = tmp_path / f"g{i}.png"
        Image.fromarray(np.full((24, 20, 3), 60 * i, np.uint8)).save(buf)
        _Handler.files[f"g{i}.png"] = buf.read_bytes()
        good.append(f"{url}/file/g{i}.png")
    locations = good + [f"{url}/endless", f"{url}/claims-huge", f"{url}/drip"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"image": [loc], "conversations": [
        {"from": "human", "value": f"caption {i}"}, {"from": "gpt", "value": "<image>"}]}) + "\n"
        for i, loc in enumerate(locations)))
    out = tmp_path / "out"
    args = ["build", "--jsonl", str(corpus), "--kind", "t2i", "--out", str(out),
            "--resolution", "16", "--threads", "6", "--max-skip-fraction", "0.6",
            "--url-timeout", "0.5", "--url-deadline", "1", "--max-download-mib", "1"]
    start = time.monotonic()
    tracemalloc.start()
    try:
        assert cli.main(args) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    took = time.monotonic() - start
    summary = read_summary(str(out))
    assert summary["skipped"] == {"url_too_large": 2, "url_too_slow": 1}
    assert summary["records"] == 3
    assert {"url_too_large", "url_too_slow"} <= set(REASONS)
    assert peak < 4 * MIB, peak  # the 1 MiB cap and one copy; the stream was 256 MiB
    assert took < DRIP_BOUND / 2, took  # the drip's 1 s deadline plus the build, not 10 s
    assert _Handler.sent["/endless"] < STREAM_BOUND
