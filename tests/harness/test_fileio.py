"""muse.fileio: atomic writes with the user's umask, and exclusive names."""

import os
import stat

import pytest

from muse.fileio import atomic_write_text, current_umask


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_open_would_give(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert current_umask() == umask
        atomic_write_text(tmp_path / "a.json", "{}")
        with open(tmp_path / "b.json", "w") as f:  # the reference: what open() gives
            f.write("{}")
    finally:
        os.umask(old)
    assert mode(tmp_path / "a.json") == mode(tmp_path / "b.json") == 0o666 & ~umask


def test_exclusive_write_never_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "run.json"
    atomic_write_text(path, "first", exclusive=True)
    with pytest.raises(FileExistsError):
        atomic_write_text(path, "second", exclusive=True)
    assert path.read_text() == "first"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json"]
    atomic_write_text(path, "third")  # not exclusive: replaced
    assert path.read_text() == "third"
