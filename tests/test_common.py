"""attnzoo.common: atomic writes (old content or the whole new one, fsynced, no temp file left, a killed writer's
leftovers finished or rolled back) and model names."""
from __future__ import annotations

import os

import pytest

import attnzoo  # noqa: F401  (registers the models)
from attnzoo.common import InputError, atomic_dir, atomic_write, check_model_name, recover


def test_atomic_write_replaces_whole_and_fsyncs_file_and_folder(tmp_path, monkeypatch):
    target = tmp_path / "out" / "metrics.json"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr("os.fsync", lambda fd: synced.append(os.path.realpath(f"/proc/self/fd/{fd}")) or
                        real_fsync(fd))
    atomic_write(target, "first")
    assert target.read_text() == "first"
    assert str(target.parent) in synced and any(p.endswith(".tmp") for p in synced)  # the folder and the file
    atomic_write(target, b"second")
    assert target.read_bytes() == b"second"
    assert os.listdir(target.parent) == ["metrics.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    target = atomic_write(tmp_path / "a.txt", "old")

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("os.fsync", full)
    with pytest.raises(OSError, match="No space"):
        atomic_write(target, "new")
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["a.txt"]


def test_atomic_dir_appears_whole_and_replaces_only_when_asked(tmp_path):
    folder = tmp_path / "hub"
    with atomic_dir(folder) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"1")
        assert not folder.exists()
    assert (folder / "sub" / "w.bin").read_bytes() == b"1"
    with pytest.raises(InputError, match="exists and is not empty"), atomic_dir(folder):
        pass
    with pytest.raises(RuntimeError), atomic_dir(folder, overwrite=True) as tmp:
        (tmp / "w.bin").write_bytes(b"2")
        raise RuntimeError("killed mid-write")
    assert (folder / "sub" / "w.bin").read_bytes() == b"1"  # the old folder is untouched
    with atomic_dir(folder, overwrite=True) as tmp:
        (tmp / "w.bin").write_bytes(b"2")
    assert sorted(p.name for p in folder.iterdir()) == ["w.bin"] and os.listdir(tmp_path) == ["hub"]


def test_check_model_name_suggests_close_names():
    assert check_model_name("davit_tiny.msft_in1k") == "davit_tiny.msft_in1k"
    with pytest.raises(InputError, match="closest registered names: davit_tiny"):
        check_model_name("davit_tiyn")


def test_recover_finishes_or_rolls_back_what_a_killed_replace_left(tmp_path):
    """The names a killed :func:`atomic_dir`/:func:`atomic_file` leaves, and what the next writer makes of them."""
    import fcntl

    def folder(name: str, content: str) -> None:
        (tmp_path / name).mkdir()
        (tmp_path / name / "w.bin").write_text(content)

    read = lambda name: (tmp_path / name / "w.bin").read_text()
    folder(".a.abcd1234.old", "old")  # killed between renaming the old one aside and the new one in
    folder(".a.abcd1234.tmp", "new")
    folder(".b.efgh5678.old", "old")  # killed after the new one was in, before the old one was deleted
    folder("b", "new")
    folder(".c.ijkl9012.old", "old")  # the new one gone too: roll back
    folder(".d.mnop3456.tmp", "part")  # never complete
    (tmp_path / ".e.json.qrst7890.tmp").write_text("{")  # a file half-written by atomic_file
    folder(".f.uvwx1234.tmp", "busy")  # a live writer's
    busy = os.open(tmp_path / ".f.uvwx1234.tmp", os.O_RDONLY)
    fcntl.flock(busy, fcntl.LOCK_EX)
    try:
        assert len(recover(tmp_path)) == 5
        assert sorted(os.listdir(tmp_path)) == [".f.uvwx1234.tmp", "a", "b", "c"]
        assert (read("a"), read("b"), read("c")) == ("new", "new", "old")
    finally:
        os.close(busy)
    assert len(recover(tmp_path)) == 1 and sorted(os.listdir(tmp_path)) == ["a", "b", "c"]


def test_atomic_dir_puts_back_a_folder_a_killed_replace_left_aside(tmp_path):
    (tmp_path / ".hub.abcd1234.old").mkdir()
    (tmp_path / ".hub.abcd1234.old" / "w.bin").write_text("old")
    with pytest.raises(InputError, match="exists and is not empty"), atomic_dir(tmp_path / "hub"):
        pass  # the old folder is back, so without overwrite it is kept
    assert (tmp_path / "hub" / "w.bin").read_text() == "old" and os.listdir(tmp_path) == ["hub"]
