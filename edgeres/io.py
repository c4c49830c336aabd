"""Artifacts appear whole or not at all, and never over a user's own files.

`atomic_write` / `atomic_dir` write beside the output under a temp name that says edgeres made it and which
process (`.NAME.edgeres-PID-<random>.tmp`), then rename. `check_output_dir` / `check_output_file` are the one rule
for every output a command is given: a folder is replaced (or filled) only when it is empty or edgeres made it
(its `.edgeres` marker, or an export's manifest.json), a file only when edgeres wrote it; anything else is an
error naming the path and the way out, before any work and with nothing touched. Temp files and folders left
beside an output by a process that was killed (SIGKILL cannot be caught) are removed by the next write there,
or reported while their process still runs. One writer per output: `output_lock` holds an flock on
`.NAME.edgeres.lock` beside it while it is written (`atomic_write`, `atomic_dir`, a training run), and a second
edgeres process stops with one line naming the first; the kernel drops the lock when its process dies, however.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from edgeres.errors import EdgeresError

try:
    import fcntl
except ImportError:  # not POSIX: outputs are written without the one-writer lock
    fcntl = None

log = logging.getLogger("edgeres")
MARKER = ".edgeres"  # JSON inside every folder edgeres made: {"made_by": "edgeres", "kind": ...}
TEMP_TAG = "edgeres"
_EXPORT_FORMAT = "edgeres-export/"
_KINDS = {"export": "an export folder", "train-run": "a training run"}


class OutputError(EdgeresError):
    """An output location edgeres may not write: a user's own folder or file, or an unwritable place."""


def _disk_error(path: Path, exc: OSError) -> EdgeresError:
    if exc.errno == errno.ENOSPC:
        return OutputError(f"no space left on the device writing {path}; free some space and retry")
    if exc.errno == errno.EROFS:
        return OutputError(f"cannot write {path}: read-only file system; pass another --out")
    return OutputError(f"cannot write {path}: {exc.strerror or exc}; pass another location")


# ---------------------------------------------------------------- what edgeres made


def write_marker(folder: Path, kind: str) -> None:
    """Mark `folder` as made by edgeres (an export, a training run), so a later run may replace or fill it."""
    (Path(folder) / MARKER).write_text(json.dumps({"made_by": "edgeres", "kind": kind}) + "\n")


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None


def edgeres_kind(folder: str | os.PathLike) -> str | None:
    """What edgeres made `folder` as ("export", "train-run"), from its marker or an export's manifest; else None."""
    folder = Path(folder)
    marker = _json(folder / MARKER)
    if isinstance(marker, dict) and marker.get("made_by") == "edgeres":
        return str(marker.get("kind") or "folder")
    manifest = _json(folder / "manifest.json")  # export folders made before markers
    if isinstance(manifest, dict) and str(manifest.get("format", "")).startswith(_EXPORT_FORMAT):
        return "export"
    return None


def made_by_edgeres(folder: str | os.PathLike, kind: str | None = None) -> bool:
    """True for a folder edgeres made (as `kind`, when given)."""
    made = edgeres_kind(folder)
    return made is not None and (kind is None or made == kind)


def file_made_by_edgeres(path: str | os.PathLike) -> bool:
    """True for a file edgeres wrote and can recognise: a PNG whose Software text is edgeres, an edgeres JSON."""
    path = Path(path)
    if path.suffix.lower() == ".png":
        try:
            from PIL import Image

            with Image.open(path) as im:
                return str(getattr(im, "text", {}).get("Software", "")).startswith("edgeres")
        except Exception:  # noqa: BLE001  (not a readable PNG: not ours)
            return False
    doc = _json(path) if path.suffix.lower() == ".json" else None
    return isinstance(doc, dict) and str(doc.get("format", "")).startswith("edgeres")


# ---------------------------------------------------------------- the rule for output locations


def _sample(folder: Path, n: int = 3) -> str:
    names = sorted(p.name for p in folder.iterdir())
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def _refuse_special(path: Path, option: str) -> None:
    resolved = path.resolve()
    cwd, home = Path.cwd().resolve(), Path.home().resolve()
    if resolved == Path(resolved.anchor):
        raise OutputError(f"{option} {path} is the file-system root; pass a new folder")
    if cwd == resolved or resolved in cwd.parents:
        raise OutputError(f"{option} {path} is the working folder (or holds it); pass a new folder, e.g. "
                          f"{option} out/NAME")
    if home == resolved or resolved in home.parents:
        raise OutputError(f"{option} {path} is the home folder (or holds it); pass a new folder")


def _probe_writable(path: Path, option: str) -> None:
    """Create and remove a temp folder where `path` will go: the only honest test (root ignores mode bits)."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{option} {path}: {parent} is a file, not a folder; pass another location")
    try:
        probe = tempfile.mkdtemp(prefix=f".{path.name}.{TEMP_TAG}-{os.getpid()}-", suffix=".tmp", dir=parent)
        os.rmdir(probe)
    except OSError as exc:
        reason = "read-only file system" if exc.errno == errno.EROFS else (exc.strerror or str(exc))
        raise OutputError(f"{option} {path}: cannot write in {parent} ({reason}); pass another location") from exc


def check_output_dir(path: str | os.PathLike, *, option: str = "--out", kind: str = "export",
                     ours: Callable[[Path], bool] | None = None) -> Path:
    """`path` if edgeres may create, replace or fill that folder; else OutputError naming it and the way out.

    Allowed: a new path, an empty folder, a folder edgeres made as `kind` (its marker or manifest, or
    `ours(path)` for a command's own older records). Refused: a file, a symlink, a folder with anyone else's
    files or another kind of edgeres output (an export never replaces a training run), the working or home
    folder or the root, a place that cannot be written. Nothing is touched either way.
    """
    path = Path(path).expanduser()
    if path.is_symlink():
        raise OutputError(f"{option} {path} is a symbolic link; pass the folder itself or a new one")
    if path.exists() and not path.is_dir():
        raise OutputError(f"{option} {path} is a file, not a folder; pass another {option} "
                          "(edgeres never replaces a file with a folder)")
    _refuse_special(path, option)
    _not_being_written(path, option)
    if path.is_dir():
        try:
            empty = not any(path.iterdir())
        except OSError as exc:
            raise OutputError(f"{option} {path} cannot be read ({exc.strerror}); pass another {option}") from exc
        made = None if empty else edgeres_kind(path)
        if not empty and made != kind and not (ours and ours(path)):
            if made is not None:
                raise OutputError(f"{option} {path} holds {_KINDS.get(made, made)} edgeres made, and this writes "
                                  f"{_KINDS.get(kind, kind)}; pass another {option}, or remove the folder yourself")
            raise OutputError(f"{option} {path} holds files edgeres did not make ({_sample(path)}); pass another "
                              f"{option}, or remove the folder yourself")
    _probe_writable(path, option)
    return path


def check_output_file(path: str | os.PathLike, *, option: str = "--out") -> Path:
    """`path` if edgeres may create or replace that file (a new path, or a file edgeres wrote); else OutputError."""
    path = Path(path).expanduser()
    if path.is_symlink():
        raise OutputError(f"{option} {path} is a symbolic link; pass the file itself or a new one")
    if path.is_dir():
        raise OutputError(f"{option} {path} is a folder; pass a file path")
    if path.exists() and not file_made_by_edgeres(path):
        raise OutputError(f"{option} {path} exists and edgeres did not write it; pass another {option}, "
                          "or remove the file yourself")
    _not_being_written(path, option)
    _probe_writable(path, option)
    return path


# ---------------------------------------------------------------- temp names and what killed runs left


def _temp_prefix(name: str) -> str:
    return f".{name}.{TEMP_TAG}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def sweep_stale(path: str | os.PathLike) -> list[Path]:
    """Remove the temp files and folders a killed edgeres process left beside `path`; report live ones.

    A replaced folder parked as `.NAME.edgeres-PID-old` goes back to `path` if `path` is missing (the process
    died between the two renames). Returns what was removed or restored.
    """
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{TEMP_TAG}-(\d+)-.+")
    done: list[Path] = []
    try:
        entries = list(parent.iterdir()) if parent.is_dir() else []
    except OSError:
        return done
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if m is None or int(m.group(1)) == os.getpid():
            continue
        pid = int(m.group(1))
        if _pid_alive(pid):
            log.warning("%s was left by edgeres process %d, which is still running; it is left alone", entry, pid)
            continue
        try:
            if entry.name.endswith("-old") and entry.is_dir() and not path.exists():
                os.replace(entry, path)
                log.warning("restored %s from %s (a replacement was interrupted)", path, entry.name)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
                log.warning("removed %s, left by an edgeres process (%d) that was killed", entry, pid)
            else:
                entry.unlink()
                log.warning("removed %s, left by an edgeres process (%d) that was killed", entry, pid)
            done.append(entry)
        except OSError as exc:
            log.warning("could not remove %s (left by a killed edgeres process): %s", entry, exc.strerror)
    return done


def _make_parent(path: Path) -> list[Path]:
    """Create the missing folders above `path`; returns them, innermost first, for `_remove_made`."""
    made = []
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        made.append(parent)
        parent = parent.parent
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_made(made)
        raise _disk_error(path, exc) from exc
    return made


def _remove_made(folders: list[Path]) -> None:
    """Remove folders `_make_parent` created, if still empty: a failed write leaves no empty folders behind."""
    for folder in folders:
        try:
            folder.rmdir()
        except OSError:
            return


# ---------------------------------------------------------------- one writer per output


def _lock_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{TEMP_TAG}.lock")


def _holder_text(lock: Path) -> tuple[int | None, str]:
    """The pid holding `lock` and who it is, from what the holder wrote inside ("edgeres process 12 (...)")."""
    info = _json(lock)
    if not isinstance(info, dict) or not isinstance(info.get("pid"), int):
        return None, "another edgeres process"
    return info["pid"], f"edgeres process {info['pid']} ({info.get('command', '?')}, since {info.get('since', '?')})"


def _busy(fd: int, patience: float = 1.0) -> bool:
    """Take the lock on `fd`: False once it is ours, True while another holds it for `patience` seconds (a
    `check_output_*` probe holds it for microseconds; a writer for the whole write)."""
    if fcntl is None:
        raise OSError(errno.ENOSYS, "no flock here")
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return False
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return True
            time.sleep(0.05)


def _not_being_written(path: Path, option: str) -> None:
    """OutputError when another process holds `path`'s write lock (checked before any work; nothing is taken)."""
    try:
        fd = os.open(_lock_path(path), os.O_RDONLY)
    except OSError:  # no lock file (or none readable): nobody writes it now
        return
    try:
        busy = _busy(fd)
    except OSError:  # a file system without flock
        busy = False
    finally:
        os.close(fd)  # and with it the probe's own lock, if it got one
    if not busy:
        return
    pid, holder = _holder_text(_lock_path(path))
    if pid != os.getpid():
        raise OutputError(f"{option} {path} is being written by {holder}; wait for it to finish or pass another "
                          f"{option}")


def _acquire(path: Path) -> int | None:
    """The fd holding `path`'s write lock, or None where this process holds it already or flock is unsupported.

    Interrupted (Ctrl-C, SIGTERM) at any point, it leaves no lock file that it took behind.
    """
    lock = _lock_path(path)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _disk_error(lock, exc) from exc
        try:
            busy = _busy(fd)
        except OSError:  # a file system without flock (ENOLCK, EOPNOTSUPP): write unguarded, as before
            os.close(fd)
            return None
        except BaseException:  # interrupted: remove the file only if it is ours to remove (nobody holds it)
            if not _busy(fd, patience=0):
                _release(path, fd)
            else:
                os.close(fd)
            raise
        if busy:
            os.close(fd)
            pid, holder = _holder_text(lock)
            if pid == os.getpid():  # a write inside this process's own (a file inside its folder)
                return None
            raise OutputError(f"{path} is being written by {holder}; wait for it to finish or write elsewhere")
        try:
            if _same_file(lock, fd):  # not a file its last holder removed meanwhile: ours
                command = " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]) if sys.argv and sys.argv[0] else "python"
                record = {"pid": os.getpid(), "command": command[:160], "since": time.strftime("%Y-%m-%d %H:%M:%S")}
                os.ftruncate(fd, 0)
                os.write(fd, (json.dumps(record) + "\n").encode())
                return fd
        except BaseException:
            _release(path, fd)
            raise
        os.close(fd)


def _same_file(lock: Path, fd: int) -> bool:
    try:
        return os.stat(lock).st_ino == os.fstat(fd).st_ino
    except FileNotFoundError:
        return False


def _release(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it (a taker waiting on it then sees another inode), then let go.

    Only the holder removes it, and only while the name still is its file, so no one else's lock is removed."""
    if _same_file(_lock_path(path), fd):
        with contextlib.suppress(OSError):
            os.unlink(_lock_path(path))
    os.close(fd)


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold the write lock of `path` (an flock on `.NAME.edgeres.lock` beside it) for the block.

    Another process holding it: OutputError naming it (pid, command, since when), before anything is written.
    The kernel drops an flock when its process dies, even by SIGKILL, so the lock file of a dead process is
    simply taken over. Re-entrant within one process; the holder removes the lock file when it is done.
    """
    path = Path(path)
    made = _make_parent(path)
    fd = None
    try:
        fd = _acquire(path)
        yield path
    finally:
        if fd is not None:
            _release(path, fd)
        _remove_made(made)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `path`; on success fsync it and rename it over `path`.

    On any failure (including KeyboardInterrupt) the temp file is removed and `path` is untouched. The write
    holds `path`'s `output_lock`.
    """
    with output_lock(path), _atomic_write(path) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    path = Path(path)
    _make_parent(path)
    sweep_stale(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise _disk_error(path, exc) from exc
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        os.chmod(tmp_path, 0o666 & ~_umask())  # mkstemp makes 0600; artifacts follow the umask like any file
        yield tmp_path
        with open(tmp_path, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as exc:
        tmp_path.unlink(missing_ok=True)
        raise _disk_error(path, exc) from exc
    except Exception as exc:
        full = _out_of_space(tmp_path.parent)  # writers such as torch.save report a full disk as RuntimeError
        tmp_path.unlink(missing_ok=True)
        if full:
            raise _disk_error(path, OSError(errno.ENOSPC, "No space left on device")) from exc
        raise
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _out_of_space(folder: Path, slack: int = 64 * 1024) -> bool:
    try:
        st = os.statvfs(folder)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < slack


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike, *, kind: str = "export") -> Iterator[Path]:
    """Yield a fresh temp directory beside `path`; on success it replaces `path` whole.

    `path` must pass `check_output_dir` (checked again here, so a folder that appeared meanwhile is safe too).
    The new folder carries edgeres's marker. A failure or Ctrl-C leaves any previous `path` exactly as it was.
    The whole block holds `path`'s `output_lock`: a second edgeres process writing `path` stops naming this one.
    """
    with output_lock(path), _atomic_dir(path, kind=kind) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic_dir(path: str | os.PathLike, *, kind: str = "export") -> Iterator[Path]:
    path = Path(path)
    check_output_dir(path, kind=kind)
    made = _make_parent(path)
    sweep_stale(path)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent))
    except OSError as exc:
        _remove_made(made)
        raise _disk_error(path, exc) from exc
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
        yield tmp
        write_marker(tmp, kind)
        check_output_dir(path, kind=kind)  # still empty or ours after the work
        old = None
        if path.exists():
            old = path.with_name(f"{_temp_prefix(path.name)}old")
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise _disk_error(path, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_made(made)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def sha256sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def md5sum(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
