import errno
import os

import pytest

from edgeres.errors import EdgeresError
from edgeres.io import (
    OutputError,
    atomic_dir,
    atomic_write,
    check_output_dir,
    check_output_file,
    made_by_edgeres,
    sweep_stale,
    write_marker,
)


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


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_killed_runs_temp_folders_are_swept_by_the_next_write(tmp_path):
    dead = _dead_pid()
    stale_dir = tmp_path / f".export.edgeres-{dead}-abc.tmp"
    stale_dir.mkdir()
    (stale_dir / "model.onnx").write_text("half")
    stale_file = tmp_path / f".export.edgeres-{dead}-xyz.tmp"
    stale_file.write_text("half")
    live = tmp_path / f".export.edgeres-{os.getppid()}-live.tmp"  # a running process's: left alone
    live.mkdir()
    users = tmp_path / ".export.mine.tmp"  # not edgeres's name: never touched
    users.write_text("mine")
    with atomic_dir(tmp_path / "export") as d:
        (d / "model.onnx").write_text("v1")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["export", live.name, users.name])
    assert made_by_edgeres(tmp_path / "export")


def test_a_parked_folder_comes_back_when_the_replacement_was_killed(tmp_path):
    with atomic_dir(tmp_path / "export") as d:
        (d / "model.onnx").write_text("v1")
    parked = tmp_path / f".export.edgeres-{_dead_pid()}-old"
    os.replace(tmp_path / "export", parked)  # killed between the two renames
    assert sweep_stale(tmp_path / "export") == [parked]
    assert (tmp_path / "export" / "model.onnx").read_text() == "v1"


@pytest.mark.parametrize("kind", ["foreign", "file"])
def test_output_folder_rule(tmp_path, kind):
    out = tmp_path / "out"
    if kind == "foreign":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
    else:
        out.write_text("mine")
    with pytest.raises(OutputError, match="did not make" if kind == "foreign" else "is a file"):
        check_output_dir(out)
    with pytest.raises(OutputError), atomic_dir(out) as _d:
        pass
    assert (out / "notes.txt").read_text() == "mine" if kind == "foreign" else out.read_text() == "mine"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_empty_and_own_folders_may_be_replaced(tmp_path):
    (tmp_path / "empty").mkdir()
    assert check_output_dir(tmp_path / "empty") == tmp_path / "empty"
    (tmp_path / "mine").mkdir()
    write_marker(tmp_path / "mine", "export")
    (tmp_path / "mine" / "model.onnx").write_text("x")
    assert check_output_dir(tmp_path / "mine") == tmp_path / "mine"


def test_plot_files_are_replaced_only_when_edgeres_wrote_them(tmp_path):
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo

    ours, theirs = tmp_path / "ours.png", tmp_path / "theirs.png"
    info = PngInfo()
    info.add_text("Software", "edgeres")
    Image.new("RGB", (2, 2)).save(ours, pnginfo=info)
    Image.new("RGB", (2, 2)).save(theirs)
    assert check_output_file(ours) == ours
    with pytest.raises(OutputError, match="did not write"):
        check_output_file(theirs)


def test_a_failed_write_leaves_no_new_parent_folders(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "a" / "b" / "export") as _d:
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_export_folders_made_before_markers_are_recognised_by_their_manifest(tmp_path):
    old = tmp_path / "old-export"
    old.mkdir()
    (old / "manifest.json").write_text('{"format": "edgeres-export/1"}')
    (old / "model.onnx").write_text("x")
    assert check_output_dir(old) == old
    with pytest.raises(OutputError, match="holds an export folder edgeres made"):
        check_output_dir(old, kind="train-run")
    (old / "manifest.json").write_text('{"format": "someone-else/1"}')
    with pytest.raises(OutputError, match="did not make"):
        check_output_dir(old)


# ---------------------------------------------------------------- one writer per output

_HOLD = """
import sys, time
from edgeres.io import atomic_dir
with atomic_dir(sys.argv[1]) as d:
    print("writing", flush=True)
    time.sleep(120)
"""


def _writer(out):
    """Another real process in the middle of writing `out` (inside atomic_dir), once this returns."""
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.stdout.readline().strip() == "writing"
    return proc


def test_a_second_writer_stops_naming_the_first(tmp_path):
    out = tmp_path / "export"
    proc = _writer(out)
    try:
        for attempt in (lambda: check_output_dir(out), lambda: atomic_dir(out).__enter__(),
                        lambda: atomic_write(out).__enter__()):
            with pytest.raises(OutputError, match=rf"is being written by edgeres process {proc.pid} \(-c "):
                attempt()
        assert not out.exists()  # nothing of the first touched, nothing of the second made
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_of_a_killed_writer_is_taken_over(tmp_path):
    out = tmp_path / "export"
    proc = _writer(out)
    proc.kill()  # SIGKILL: no cleanup ran; the kernel dropped its flock
    proc.wait()
    assert (tmp_path / ".export.edgeres.lock").is_file()  # left behind, naming a dead pid
    with atomic_dir(out) as d:
        (d / "model.onnx").write_text("mine now")
    assert (out / "model.onnx").read_text() == "mine now"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # its temp folder swept, the lock file gone


def test_a_write_inside_the_own_locked_folder_is_fine(tmp_path):
    out = tmp_path / "export"
    with atomic_dir(out) as d:
        assert (tmp_path / ".export.edgeres.lock").is_file()
        check_output_dir(out)  # this process's own lock: no error
        with atomic_write(d / "model.onnx") as f:
            f.write_text("x")
        with atomic_write(tmp_path / "plot.png") as f:  # another output, another lock
            f.write_bytes(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export", "plot.png"]
    assert sorted(p.name for p in out.iterdir()) == [".edgeres", "model.onnx"]
