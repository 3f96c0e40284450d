"""Atomic writes: complete or absent, with ordinary permissions."""

import os
import stat

import pytest

from mmskip.io import atomic_dir, atomic_path, read_json, write_json


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_outputs_get_umask_permissions_not_private_ones(tmp_path):
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("y")
    finally:
        os.umask(umask)
    assert read_json(tmp_path / "a.json") == {"x": 1}
    assert _mode(tmp_path / "a.json") == 0o644
    assert _mode(tmp_path / "d") == 0o755


def test_a_failed_write_leaves_neither_the_target_nor_a_temporary(tmp_path):
    (tmp_path / "keep.json").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "keep.json") as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "out") as tmp:
            (tmp / "part").write_text("half")
            raise RuntimeError("killed")
    assert (tmp_path / "keep.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.json"]
