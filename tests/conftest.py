"""Shared test fixtures: the PyTorch reference outputs in ../shared and small converted models."""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

from unialign_jax import compilation_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures")
TINY_UNIALIGNMENT = os.path.join(SHARED_FIXTURES, "unialignment_tiny")


# The cache folder this file chose: a pytest-xdist worker inherits its controller's
# environment, and replaces a folder chosen here, never one the user's environment names.
CHOSEN_CACHE = "UNIALIGN_JAX_TEST_CACHE"


def pytest_configure(config):
    """Command lines run in-process use the persistent compilation cache, by default in the
    user's ~/.cache. A test run gets its own per pytest-xdist worker instead, removed at the
    end: tests write nothing into the home folder, and two workers never share a cache (JAX
    writes an entry in place, so one could read what the other is still writing). A cache
    the environment names is kept."""
    named = os.environ.get(compilation_cache.ENV_VAR)
    if named is not None and named != os.environ.get(CHOSEN_CACHE):
        return
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    folder = tempfile.mkdtemp(prefix=f"unialign_jax_test_cache_{worker}_")
    os.environ[compilation_cache.ENV_VAR] = os.environ[CHOSEN_CACHE] = folder
    config.test_compilation_cache = folder


def pytest_unconfigure(config):
    folder = getattr(config, "test_compilation_cache", None)
    if folder:
        shutil.rmtree(folder, ignore_errors=True)


def shared_fixture(*parts: str) -> str:
    """Path of a file in ../shared/fixtures; skips the test with the reason when it is absent."""
    path = os.path.join(SHARED_FIXTURES, *parts)
    if not os.path.exists(path):
        pytest.skip(f"reference fixture {path} is absent (../shared is not checked out next to "
                    "the repository)")
    return path


@pytest.fixture(scope="session")
def tiny_transformer_dir(tmp_path_factory) -> str:
    """The released-layout tiny UniAlignment transformer, converted once per session."""
    from unialign_convert.transformer import convert_transformer

    src = shared_fixture("unialignment_tiny", "config.json")
    dst = str(tmp_path_factory.mktemp("converted") / "unialignment_tiny")
    convert_transformer(os.path.dirname(src), dst)
    return dst
