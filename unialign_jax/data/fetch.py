"""Reads an image's bytes from a local path or an http(s) URL.

Downloads use a timeout and a few retries with exponential backoff: timeouts, refused
connections, 429 and 5xx answers are worth another try, other 4xx answers are not. Every
failure ends as a `SkipSample` with a reason, never as an exception that stops the run.
"""

from __future__ import annotations

import dataclasses
import http.client
import socket
import time
import urllib.error
import urllib.request

from unialign_jax.data.faults import SkipSample
from unialign_jax.data.jsonl import is_url

USER_AGENT = "unialign-data/0.1"


@dataclasses.dataclass(frozen=True)
class FetchOptions:
    timeout: float = 10.0     # seconds per try (connect and each read)
    retries: int = 2          # extra tries after the first
    backoff: float = 0.5      # seconds before the first retry, doubling after each


def _is_timeout(err: BaseException) -> bool:
    reason = getattr(err, "reason", err)
    return isinstance(reason, (TimeoutError, socket.timeout))


def _download_once(url: str, timeout: float) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def download(url: str, options: FetchOptions = FetchOptions()) -> bytes:
    fault = None
    for attempt in range(options.retries + 1):
        if attempt:
            time.sleep(options.backoff * 2 ** (attempt - 1))
        try:
            return _download_once(url, options.timeout)
        except urllib.error.HTTPError as e:
            fault = SkipSample("url_error", f"{url}: HTTP {e.code}")
            if e.code != 429 and e.code < 500:
                break
        except (OSError, http.client.HTTPException, ValueError) as e:  # URLError is an OSError
            if _is_timeout(e):
                fault = SkipSample("url_timeout", f"{url}: no answer within {options.timeout}s")
            else:
                fault = SkipSample("url_error", f"{url}: {getattr(e, 'reason', e)}")
    raise fault


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
