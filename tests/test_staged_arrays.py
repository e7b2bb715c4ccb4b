"""The one writer of row arrays beside a shard folder (teacher features, cached latents):
resumes where it stopped for the same identity, starts over for another, refuses rows that
do not fit, publishes only a whole folder, and replaces a published one only when forced."""

import json
import os

import numpy as np
import pytest

from unialign_jax.data.build.staged_arrays import StagedArrays

ARRAYS = {"a": ((5, 2), np.float32), "b": ((5, 3, 2), np.uint16)}


def _rows(start, n):
    a = np.arange(start * 2, (start + n) * 2, dtype=np.float32).reshape(n, 2)
    return {"a": a, "b": np.repeat(a.astype(np.uint16)[:, None], 3, 1)}


def _writer(root, identity, force=False):
    return StagedArrays(str(root), "rows", "rows.json", ARRAYS, identity, force)


def test_resumes_for_the_same_identity_and_starts_over_for_another(tmp_path):
    first = _writer(tmp_path, {"model": "m"})
    first.append(_rows(0, 2))
    again = _writer(tmp_path, {"model": "m"})
    assert again.done == 2
    np.testing.assert_array_equal(again._open["a"][:2], _rows(0, 2)["a"])
    other = _writer(tmp_path, {"model": "other"})
    assert other.done == 0
    with open(tmp_path / ".rows.partial" / "progress.json") as f:
        assert json.load(f) == {"identity": {"model": "other"}, "done": 0}
    np.testing.assert_array_equal(other._open["a"], np.zeros((5, 2), np.float32))


def test_refuses_rows_that_do_not_fit_and_publishes_only_when_whole(tmp_path):
    writer = _writer(tmp_path, {"model": "m"})
    with pytest.raises(ValueError, match="do not fit"):
        writer.append({"a": _rows(0, 2)["a"]})  # an array missing
    with pytest.raises(ValueError, match="do not fit"):
        writer.append({**_rows(0, 2), "b": np.zeros((2, 4, 2), np.uint16)})
    with pytest.raises(ValueError, match="do not fit"):
        writer.append(_rows(0, 6))  # past the last record
    writer.append(_rows(0, 3))
    with pytest.raises(RuntimeError, match="only 3 of 5"):
        writer.finish({"made": 1})
    assert not os.path.exists(tmp_path / "rows")
    writer.append(_rows(3, 2))
    writer.finish({"made": 1})
    assert not os.path.exists(tmp_path / ".rows.partial")
    assert sorted(os.listdir(tmp_path / "rows")) == ["a.npy", "b.npy", "rows.json"]
    np.testing.assert_array_equal(np.load(tmp_path / "rows" / "a.npy"), _rows(0, 5)["a"])
    np.testing.assert_array_equal(np.load(tmp_path / "rows" / "b.npy"), _rows(0, 5)["b"])
    assert json.loads((tmp_path / "rows" / "rows.json").read_text()) == {"made": 1}


def test_a_published_folder_is_replaced_only_when_forced(tmp_path):
    writer = _writer(tmp_path, {"model": "m"})
    writer.append(_rows(0, 5))
    writer.finish({"made": 1})
    with pytest.raises(FileExistsError, match="--force"):
        _writer(tmp_path, {"model": "m"})
    forced = _writer(tmp_path, {"model": "m"}, force=True)
    assert forced.done == 0
    forced.append({k: v + 1 for k, v in _rows(0, 5).items()})
    forced.finish({"made": 2})
    np.testing.assert_array_equal(np.load(tmp_path / "rows" / "a.npy"), _rows(0, 5)["a"] + 1)
    assert json.loads((tmp_path / "rows" / "rows.json").read_text()) == {"made": 2}


def test_arrays_must_agree_on_the_records(tmp_path):
    with pytest.raises(ValueError, match="disagree"):
        StagedArrays(str(tmp_path), "rows", "rows.json",
                     {"a": ((5, 2), np.float32), "b": ((4, 2), np.float32)}, {})
