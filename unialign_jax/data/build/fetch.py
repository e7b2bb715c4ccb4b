"""Reads an image's bytes from a local path or an http(s) URL.

No server can hurt a build: each download try has a timeout (connect and each read), each
image a deadline over all its tries, and each body a byte cap, checked against
Content-Length before reading and again while reading. A server that streams gigabytes
costs at most the cap in memory; one that drips its body or its headers a byte at a time
(each byte within the per-read timeout) has its connection shut down at the deadline.
Timeouts, refused connections, 429 and 5xx answers are worth another try while the
deadline allows; other 4xx answers, oversized bodies and a passed deadline are not. Every
failure ends as a `SkipSample` with a reason, never as an exception that stops the run.
"""

from __future__ import annotations

import dataclasses
import functools
import http.client
import io
import socket
import threading
import time
import urllib.error
import urllib.request

from unialign_jax.data.build.faults import SkipSample
from unialign_jax.data.build.jsonl import is_url

USER_AGENT = "unialign-data/0.1"
MIB = 2 ** 20
# Far above a training image (a 12-megapixel camera JPEG is a few MiB), far below what
# hurts a worker that holds one download per thread.
DEFAULT_MAX_BYTES = 64 * MIB
# Seconds per image, all tries and backoff pauses together.
DEFAULT_DEADLINE = 60.0
_READ_SIZE = 64 * 1024  # bytes asked of the socket per read


@dataclasses.dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0     # seconds per try (connect and each read)
    retries: int = 2          # extra tries after the first
    backoff: float = 0.5      # seconds before the first retry, doubling after each
    max_bytes: int = DEFAULT_MAX_BYTES   # largest body accepted
    deadline: float = DEFAULT_DEADLINE   # seconds per image, all tries together

    def __post_init__(self):
        if not (self.timeout > 0 and self.deadline > 0 and self.max_bytes >= 1
                and self.retries >= 0 and self.backoff >= 0):
            raise ValueError("need timeout, deadline > 0, max_bytes >= 1, retries, backoff >= 0")


class _Deadline:
    """Shuts down the sockets of one download when its time is up, whatever they wait for:
    a per-read timeout never fires while a server sends a byte now and then."""

    def __init__(self, seconds: float):
        self.at = time.monotonic() + seconds
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._fired = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    @property
    def passed(self) -> bool:
        return self._fired or time.monotonic() >= self.at

    def remaining(self) -> float:
        return self.at - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self._fired:
                _shut(sock)

    def _fire(self) -> None:
        with self._lock:
            self._fired = True
            for sock in self._sockets:
                _shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()


def _shut(sock: socket.socket) -> None:
    """Wakes any thread blocked on `sock` (plain socket method: an SSL socket's own
    shutdown would also drop its TLS state under a reader)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:  # already closed
        pass


class _Watched:
    """An HTTP(S) connection that hands its socket to the download's `_Deadline`."""

    def __init__(self, *args, deadline: _Deadline, **kwargs):
        super().__init__(*args, **kwargs)
        self._deadline = deadline

    def connect(self):
        super().connect()
        self._deadline.watch(self.sock)


class _HTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _HTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def http_open(self, req):
        return self.do_open(functools.partial(_HTTPConnection, deadline=self.deadline), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline):
        super().__init__()
        self.deadline = deadline

    def https_open(self, req):  # default TLS context: certificates and host name checked
        return self.do_open(functools.partial(_HTTPSConnection, deadline=self.deadline), req)


def _is_timeout(err: BaseException) -> bool:
    reason = getattr(err, "reason", err)
    return isinstance(reason, (TimeoutError, socket.timeout))


def _too_slow(url: str, options: FetchOptions) -> SkipSample:
    return SkipSample("url_too_slow", f"{url}: not finished within {options.deadline:g}s")


def _read_body(response, url: str, options: FetchOptions, deadline: _Deadline) -> bytes:
    """The body, read in pieces so that the cap is checked as it arrives."""
    length = response.headers.get("Content-Length", "")
    if length.isdigit() and int(length) > options.max_bytes:
        raise SkipSample("url_too_large", f"{url}: Content-Length {length} bytes, above the "
                                          f"cap of {options.max_bytes}")
    body = io.BytesIO()
    while chunk := response.read1(_READ_SIZE):
        if body.tell() + len(chunk) > options.max_bytes:
            raise SkipSample("url_too_large",
                             f"{url}: more than the cap of {options.max_bytes} bytes")
        body.write(chunk)
    if deadline.passed:  # the end may be the deadline's shutdown, not the server's
        raise _too_slow(url, options)
    return body.getvalue()


def _download_once(url: str, options: FetchOptions, deadline: _Deadline) -> bytes:
    timeout = min(options.timeout, deadline.remaining())
    if timeout <= 0:
        raise _too_slow(url, options)
    opener = urllib.request.build_opener(_HTTPHandler(deadline), _HTTPSHandler(deadline))
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with opener.open(request, timeout=timeout) as response:
        return _read_body(response, url, options, deadline)


def _fault(url: str, err: BaseException, options: FetchOptions) -> tuple[SkipSample, bool]:
    """The skip reason for a failed try, and whether another try may succeed."""
    if isinstance(err, urllib.error.HTTPError):
        return (SkipSample("url_error", f"{url}: HTTP {err.code}"),
                err.code == 429 or err.code >= 500)
    if _is_timeout(err):
        return SkipSample("url_timeout", f"{url}: no answer within {options.timeout}s"), True
    return SkipSample("url_error", f"{url}: {getattr(err, 'reason', err)}"), True


def download(url: str, options: FetchOptions = FetchOptions()) -> bytes:
    deadline = _Deadline(options.deadline)
    try:
        for attempt in range(options.retries + 1):
            if attempt:
                pause = options.backoff * 2 ** (attempt - 1)
                if pause >= deadline.remaining():
                    break  # no time left for another try: the last try's fault stands
                time.sleep(pause)
            try:
                return _download_once(url, options, deadline)
            except SkipSample:  # too large or too slow: another try cannot help
                raise
            # HTTPError and URLError are OSErrors; a shut-down TLS socket may raise ValueError.
            except (OSError, http.client.HTTPException, ValueError) as e:
                if deadline.passed:
                    raise _too_slow(url, options) from None
                fault, retry = _fault(url, e, options)
                if not retry:
                    break
        raise fault
    finally:
        deadline.cancel()


def read_image_bytes(location: str, options: FetchOptions = FetchOptions()) -> bytes:
    """The raw bytes at a path or URL; raises `SkipSample` when there are none."""
    if is_url(location):
        data = download(location, options)
    else:
        try:
            with open(location, "rb") as f:
                data = f.read()
        except OSError as e:
            raise SkipSample("missing_image", f"{location}: {e.strerror or e}") from None
    if not data:
        raise SkipSample("empty_image", f"{location}: zero bytes")
    return data
