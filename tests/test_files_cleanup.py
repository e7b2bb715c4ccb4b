"""Removing a failed write's temporary while a writer still writes into it (as Orbax leaves
TensorStore writes running after the first failed one): the temporary is gone for good once
the writer stopped, or the failure says what is left. Writers here are threads that hold a
file open across the removal, so the outcome does not depend on timing."""

import errno
import os
import threading
import types

import pytest

from unialign_jax import files
from unialign_jax.checkpoints import training_steps
from unialign_jax.training.checkpointing import Checkpointer


class LateWriter(threading.Thread):
    """Opens a file in `folder`, waits until `folder` was removed, then makes it (or `again`)
    with a new file (TensorStore creates parent folders) and only then closes the first."""

    def __init__(self, folder: str, again: str | None = None):
        super().__init__(daemon=True)
        self.folder, self.again = folder, again or folder
        self.opened, self.removed_once = threading.Event(), False
        os.makedirs(os.path.join(folder, "d"), exist_ok=True)

    def run(self):
        with open(os.path.join(self.folder, "d", "first"), "wb") as first:
            self.opened.set()
            while os.path.exists(self.folder):
                threading.Event().wait(0.001)
            self.removed_once = True
            os.makedirs(os.path.join(self.again, "d"))
            with open(os.path.join(self.again, "d", "late"), "wb") as late:
                late.write(b"x")
            first.write(b"x")


def _temporaries(parent) -> list[str]:
    return [n for n in os.listdir(parent) if ".partial-" in n]


def test_a_failed_folder_stays_removed_when_a_writer_outlives_the_error(tmp_path):
    writer = None
    with pytest.raises(OSError) as failed:
        with files.atomic_output_dir(str(tmp_path / "out")) as tmp:
            writer = LateWriter(tmp)
            writer.start()
            writer.opened.wait()
            raise OSError(errno.ENOSPC, "No space left on device")
    writer.join(10)
    assert writer.removed_once and not writer.is_alive()
    assert files.is_disk_full(failed.value)
    assert _temporaries(tmp_path) == [] and not (tmp_path / "out").exists()


def test_remove_tree_waits_for_open_files_and_removes_what_comes_back(tmp_path):
    folder = tmp_path / "step.orbax-checkpoint-tmp"
    writer = LateWriter(str(folder))
    writer.start()
    writer.opened.wait()
    files.remove_tree(str(folder))
    assert writer.removed_once and not folder.exists()
    writer.join(10)
    assert not folder.exists()


def test_discarding_failed_saves_removes_one_a_late_writer_makes_after_the_listing(tmp_path):
    folder = tmp_path / training_steps.CHECKPOINT_DIR
    writer = LateWriter(str(folder / f"4{training_steps.TMP_SUFFIX}"),
                        again=str(folder / f"6{training_steps.TMP_SUFFIX}"))
    writer.start()
    writer.opened.wait()
    # only `workdir` is used: no Orbax manager needed
    Checkpointer.discard_unfinished(types.SimpleNamespace(workdir=str(tmp_path)))
    writer.join(10)
    assert writer.removed_once and training_steps.uncommitted(str(tmp_path)) == []


def test_a_partial_that_cannot_be_removed_is_reported_not_ignored(tmp_path, monkeypatch):
    def refuse(path, *args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied", path)

    monkeypatch.setattr(files.shutil, "rmtree", refuse)
    monkeypatch.setattr(files, "REMOVE_TIMEOUT_S", 0.3)
    with pytest.raises(files.PartialLeftBehind, match="could not remove the partial") as left:
        with files.atomic_output_dir(str(tmp_path / "out")):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert isinstance(left.value.__cause__, OSError) and left.value.__cause__.errno == errno.ENOSPC
    assert not files.is_disk_full(left.value), "a left partial is no clean disk-full failure"


def test_remove_tree_gives_up_after_its_timeout(tmp_path, monkeypatch):
    (tmp_path / "kept").mkdir()
    monkeypatch.setattr(files.shutil, "rmtree", lambda *a, **k: None)
    with pytest.raises(files.PartialLeftBehind, match="could not remove the partial"):
        files.remove_tree(str(tmp_path / "kept"), timeout_s=0.2)
