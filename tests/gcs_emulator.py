"""A Google Cloud Storage emulator on 127.0.0.1 for tests of `gs://` work dirs, and the one
place that says how each library is pointed at it.

`gcs_bucket` (a pytest fixture) starts `gcp-storage-emulator` (in memory, a free port,
one bucket), points this process at it for the fixture's lifetime, and stops it. Its
`env` are the variables a subprocess (`unialign-train` through tests/fault_harness.py)
needs to reach the same bucket:

    STORAGE_EMULATOR_HOST            gcsfs (etils.epath: config, metrics, Grain's iterator
                                     state, Orbax's metadata) and google-cloud-storage
                                     (tensorboardX's event files, Orbax's bucket lookup)
    TENSORSTORE_GCS_HTTP_URL         TensorStore's gcs driver (Orbax's array data)
    FSSPEC_GCS_TOKEN=anon            gcsfs sends no credentials (none exist here)
    GOOGLE_AUTH_TOKEN_FOR_TESTING    TensorStore uses this token instead of looking for
                                     credentials on the GCE metadata server
    GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false
                                     gcsfs's plain GCSFileSystem: the default one first asks
                                     the bucket's layout (zonal / hierarchical) over gRPC,
                                     which the emulator does not speak, and waits about a
                                     minute of retries per operation before falling back
    GCE_METADATA_HOST / _IP / _ROOT, NO_GCE_CHECK
                                     any credential probe goes to a closed port on
                                     127.0.0.1, never to the metadata address

Nothing leaves the machine: the emulator listens on 127.0.0.1 only.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

BUCKET = "unialign-test"
_START_TIMEOUT_S = 60
_CLOSED = "127.0.0.1:9"  # the discard port: nothing listens there


@dataclasses.dataclass(frozen=True)
class Bucket:
    port: int

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """What a process needs in its environment to use this bucket as `gs://`."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint,
                "TENSORSTORE_GCS_HTTP_URL": self.endpoint,
                "FSSPEC_GCS_TOKEN": "anon",
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator",
                "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
                "GCE_METADATA_HOST": _CLOSED, "GCE_METADATA_IP": _CLOSED,
                "GCE_METADATA_ROOT": _CLOSED, "NO_GCE_CHECK": "true"}

    def url(self, *parts: str) -> str:
        return "/".join((f"gs://{BUCKET}", *parts))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(proc: subprocess.Popen, bucket: Bucket, log) -> None:
    deadline = time.monotonic() + _START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the GCS emulator exited ({proc.returncode}):\n"
                               f"{open(log).read()[-3000:]}")
        try:
            urllib.request.urlopen(f"{bucket.endpoint}/storage/v1/b/{BUCKET}", timeout=2)
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the GCS emulator did not answer within {_START_TIMEOUT_S} s")


def _point_this_process_at(bucket: Bucket, mp: pytest.MonkeyPatch) -> None:
    """The same settings as `env`, for libraries this process already imported."""
    import fsspec

    for name, value in bucket.env.items():
        mp.setenv(name, value)
    # (read at fsspec's import) No cached listings either: this process reads runs that
    # other processes write, and gcsfs would keep answering with what it listed before.
    mp.setitem(fsspec.config.conf, "gs", {"token": "anon", "use_listings_cache": False})
    if "gcsfs" in sys.modules:  # the class was chosen at gcsfs's import
        import gcsfs

        mp.setattr(gcsfs, "GCSFileSystem", gcsfs.core.GCSFileSystem)


def _forget_filesystems() -> None:
    """Drops the gs:// filesystem objects cached for the emulator's address."""
    from etils.epath import backend

    backend.fsspec_backend._get_filesystem.cache_clear()
    if "gcsfs" in sys.modules:
        sys.modules["gcsfs"].core.GCSFileSystem.clear_instance_cache()


def _serve(port: int) -> None:
    """Runs the emulator until terminated, with what real GCS does and it does not:
    downloads carry the object's generation (`x-goog-generation`), which TensorStore's
    OCDBT store (Orbax's array data) reads back to know which manifest it read."""
    from gcp_storage_emulator import __main__ as cli
    from gcp_storage_emulator.handlers import objects
    from gcp_storage_emulator.server import HANDLERS

    plain = objects.download

    def download(request, response, storage, *args, **kwargs):
        plain(request, response, storage, *args, **kwargs)
        if response.status.value in (200, 206):
            obj = storage.get_file_obj(request.params["bucket_name"],
                                       request.params["object_id"])
            response["x-goog-generation"] = obj["generation"]
            response["x-goog-metageneration"] = obj["metageneration"]

    objects.download = download
    for _, methods in HANDLERS:
        for method, handler in methods.items():
            if handler is plain:
                methods[method] = download
    cli.main(["start", "--host", "127.0.0.1", "--port", str(port), "--in-memory",
              "--default-bucket", BUCKET, "--quiet"])


@pytest.fixture(scope="module")
def gcs_bucket(tmp_path_factory):
    """An empty emulated bucket for the module's tests (`Bucket`); stopped afterwards."""
    pytest.importorskip("gcp_storage_emulator", reason="pip install -e '.[test]' brings the "
                        "GCS emulator (gcp-storage-emulator)")
    pytest.importorskip("gcsfs", reason="pip install -e '.[test]' brings gcsfs")
    bucket = Bucket(_free_port())
    log = tmp_path_factory.mktemp("gcs_emulator") / "log.txt"
    with open(log, "w") as out:  # a file, not a pipe: a full pipe would stop the server
        proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(bucket.port)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_until_serving(proc, bucket, log)
        with pytest.MonkeyPatch.context() as mp:
            _point_this_process_at(bucket, mp)
            _forget_filesystems()
            try:
                yield bucket
            finally:
                _forget_filesystems()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
