"""File helpers shared by the commands that write models and bundles."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it: set and restore
    os.umask(mask)
    return mask


def make_readable(path: Path) -> None:
    """Give `path` (a file, or every file under a directory) the mode a plain `open()` would give.

    safetensors writes its files 0600; models meant to be shared, copied into bundles or served by
    another user must not be readable by their author alone."""
    mode = 0o666 & ~_umask()
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    for file in files:
        file.chmod(mode)


# -- temporary directories that a killed writer leaves behind --------------------------------------
# A writer (build beside the bundle, quantize/calibrate/build-engines inside it) stages new files in a
# temporary directory `PREFIX-XXXX`, locked for the writer's lifetime by an flock on `PREFIX-XXXX.lock`
# beside it. The next writer removes every such directory whose lock no live process holds: a kill -9
# leaves nothing for longer than until the next write.

# A temp dir without a lock file is from a writer killed before it locked it (microseconds after
# creating it) or from an older version of this tool: it is taken for dead once this old.
UNLOCKED_GRACE_S = 3600.0


def lock_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".lock")


@contextlib.contextmanager
def locked_tempdir(parent: Path, prefix: str) -> Iterator[Path]:
    """A new directory `parent/PREFIX-XXXX`, locked while the block runs and removed on the way
    out (unless it was renamed into place)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = None
    try:
        fd = _lock(tmp)
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if fd is not None:
            with contextlib.suppress(OSError):
                lock_path(tmp).unlink()
            os.close(fd)


def _lock(tmp: Path) -> int | None:
    """Take the lock that tells other writers this one is alive. The lock file is created and locked
    inside `tmp`, then renamed beside it: no one ever sees it unlocked while its owner lives."""
    if fcntl is None:
        return None
    staged = tmp / ".lock"
    fd = os.open(staged, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # a file system without locks: the temp dir counts as unlocked (UNLOCKED_GRACE_S)
        os.close(fd)
        staged.unlink()
        return None
    try:
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        os.rename(staged, lock_path(tmp))
    except BaseException:
        os.close(fd)
        raise
    return fd


def owner_alive(tmp: Path) -> bool:
    """Whether the writer that made `tmp` may still be running (when in doubt, it is)."""
    try:
        fd = os.open(lock_path(tmp), os.O_RDWR)
    except FileNotFoundError:
        try:
            return time.time() - tmp.stat().st_mtime < UNLOCKED_GRACE_S
        except OSError:
            return True
    except OSError:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the kernel dropped a dead owner's lock
    except OSError:
        return True
    finally:
        os.close(fd)
    return False


def remove_dead_tempdirs(parent: Path, pattern: str) -> tuple[list[Path], bool]:
    """Remove the temp dirs `parent/PATTERN` (a glob) whose writers are dead, and their stray locks;
    returns (what was removed, whether a live writer's dir was seen)."""
    removed, running = [], False
    if fcntl is None:
        return removed, True
    for path in sorted(parent.glob(pattern)):
        if path.name.endswith(".lock"):
            tmp = path.with_name(path.name.removesuffix(".lock"))
            if not tmp.exists() and not owner_alive(tmp):  # a lock whose dir went
                with contextlib.suppress(OSError):
                    path.unlink()
            continue
        if not path.is_dir() or path.is_symlink():
            continue
        if owner_alive(path):
            running = True
            continue
        shutil.rmtree(path, ignore_errors=True)
        with contextlib.suppress(OSError):
            lock_path(path).unlink()
        removed.append(path)
    return removed, running
