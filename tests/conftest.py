"""Shared test fixtures: the PyTorch reference outputs in ../shared and small converted models."""

from __future__ import annotations

import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_FIXTURES = os.path.join(os.path.dirname(REPO), "shared", "fixtures")
TINY_UNIALIGNMENT = os.path.join(SHARED_FIXTURES, "unialignment_tiny")


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
