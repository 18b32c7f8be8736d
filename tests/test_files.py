"""Atomic writes (drnb.files): a failed write keeps the old file and leaves nothing behind."""

import os

import numpy as np
import pytest

from drnb.files import atomic_path, write_atomically, write_json


def test_atomic_path_replaces_the_file_when_the_block_succeeds(tmp_path):
    path = tmp_path / "sub" / "table.csv"
    with atomic_path(path) as temporary:
        assert temporary.parent == path.parent and temporary != path
        assert not path.exists()  # the reader sees nothing until the block ends
        temporary.write_text("new")
    assert path.read_text() == "new"
    assert [p.name for p in path.parent.iterdir()] == ["table.csv"]


def test_atomic_path_keeps_the_old_file_and_removes_the_temporary_one_on_error(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_path(path) as temporary:
            temporary.write_text("half")
            raise RuntimeError("disk full")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_atomic_path_ends_the_temporary_name_with_the_suffix_a_writer_needs(tmp_path):
    path = tmp_path / "images.npy"
    with atomic_path(path) as temporary:  # the target's own suffix by default
        assert temporary.name.endswith(".npy")
        np.save(temporary, np.arange(3))  # would append .npy to any other name
    np.testing.assert_array_equal(np.load(path), np.arange(3))
    with atomic_path(tmp_path / "encoder", suffix=".keras") as temporary:
        assert temporary.name.endswith(".keras")
        temporary.write_bytes(b"model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["encoder", "images.npy"]


@pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")
def test_written_files_get_the_umasks_permissions_not_a_temporary_files(tmp_path):
    """Others in a shared run folder or cache can read what drnb writes, as with any file."""
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "metrics.json", {"qw_kappa": 0.5})
        with atomic_path(tmp_path / "images.npy") as temporary:
            np.save(temporary, np.zeros(2))
    finally:
        os.umask(umask)
    for name in ("metrics.json", "images.npy"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name


def test_write_atomically_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "features.npz"
    write_json(path, {"old": 1})

    def fail(file):
        file.write(b"partial")
        raise OSError("no space left")

    with pytest.raises(OSError, match="no space"):
        write_atomically(path, fail)
    assert path.read_text() == '{\n  "old": 1\n}'
    assert [p.name for p in tmp_path.iterdir()] == ["features.npz"]
