import errno

import pytest

from edgeres.errors import EdgeresError
from edgeres.io import atomic_dir, atomic_write


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "a.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("boom")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_atomic_write_replaces_on_success(tmp_path):
    target = tmp_path / "a.bin"
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"


def test_disk_full_is_a_clear_error(tmp_path):
    with pytest.raises(EdgeresError, match="no space left"), atomic_write(tmp_path / "f") as _tmp:
        raise OSError(errno.ENOSPC, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_previous_on_interrupt(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as d:
        (d / "model.onnx").write_text("v1")
    with pytest.raises(KeyboardInterrupt), atomic_dir(out) as d:
        (d / "model.onnx").write_text("v2-partial")
        raise KeyboardInterrupt
    assert (out / "model.onnx").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["export"]
    with atomic_dir(out) as d:
        (d / "model.onnx").write_text("v2")
    assert (out / "model.onnx").read_text() == "v2"
