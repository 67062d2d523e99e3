"""Atomic writes leave files with the permissions a normal write would give them."""
import os
import stat

import numpy as np
import pytest

from hematoscope import _io


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_path_gives_normal_permissions_even_when_the_writer_recreates_the_file(tmp_path):
    from safetensors.numpy import save_file

    umask = os.umask(0o022)
    try:
        with _io.atomic_path(tmp_path / "a.safetensors", ".safetensors") as tmp:
            save_file({"x": np.zeros(3, np.float32)}, str(tmp))  # deletes and recreates tmp
        _io.write_text(tmp_path / "b.txt", "b")
    finally:
        os.umask(umask)
    assert _mode(tmp_path / "a.safetensors") == 0o644
    assert _mode(tmp_path / "b.txt") == 0o644


def test_atomic_path_keeps_the_old_file_when_the_block_fails(tmp_path):
    target = tmp_path / "kept.txt"
    target.write_text("old")
    try:
        with _io.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    except RuntimeError:
        pass
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["kept.txt"]


def test_atomic_path_refuses_a_folder_or_a_file_in_the_way_before_the_work(tmp_path):
    """`--out results.csv` that is a folder, or `--out notes.txt/x.csv` below a file, is said
    when the writer opens, so a long run is not done first and lost at the rename."""
    (tmp_path / "results.csv").mkdir()
    (tmp_path / "notes.txt").write_text("keep me")
    ran = []
    with pytest.raises(IsADirectoryError, match="is a folder"):
        with _io.atomic_path(tmp_path / "results.csv"):
            ran.append(True)
    with pytest.raises(NotADirectoryError, match="notes.txt is a file"):
        with _io.atomic_path(tmp_path / "notes.txt" / "deeper" / "x.csv"):
            ran.append(True)
    assert not ran and (tmp_path / "notes.txt").read_text() == "keep me"
    assert (tmp_path / "results.csv").is_dir() and not any((tmp_path / "results.csv").iterdir())
