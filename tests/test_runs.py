"""The run folder's atomic writes: a failed write keeps the old file and leaves nothing behind."""

import numpy as np
import pytest

from drnb.runs import atomic_path, write_atomically, write_json


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
    with atomic_path(path, suffix=".npy") as temporary:
        assert temporary.name.endswith(".npy")
        np.save(temporary, np.arange(3))  # would append .npy to any other name
    np.testing.assert_array_equal(np.load(path), np.arange(3))
    assert [p.name for p in tmp_path.iterdir()] == ["images.npy"]


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
