"""File helpers shared by the commands that write models and bundles: one way to stage a directory or
a file and rename it into place, and to sweep what killed writers left."""

from __future__ import annotations

import contextlib
import errno
import glob
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


# -- staging: write aside, then rename into place ---------------------------------------------------
# Every writer of a directory (a bundle, a tiny model, a Triton model, a shipped bundle's copy, the
# installed tritonserver) stages it in `.NAME.tmp-XXXX` beside NAME and renames it into place only
# once it is complete (`staged_directory`); files inside a bundle are staged the same way
# (`staging_workspace`, runtime.bundle.staging) and single files as `.NAME.tmp-XXXX.part`
# (`atomic_file`, `write_atomic`). Hidden names: Triton, globs and `ls` pass them by.
#
# A killed writer (kill -9, a lost node) leaves its staging behind. Each writer is alive for as long
# as it holds an flock: a staging directory's on `.NAME.tmp-XXXX.lock` beside it, a staged file's on
# the file itself. The next writer removes whatever no live process holds (`sweep_staged`,
# `remove_dead_staging`): a kill -9 leaves nothing for longer than until the next write.

STAGING_MARK = ".tmp-"
PART_SUFFIX = ".part"  # a staged file (atomic_file), as opposed to a staged directory

# A staging directory without a lock file is from a writer killed before it locked it (microseconds
# after creating it) or from an older version of this tool: it is taken for dead once this old.
UNLOCKED_GRACE_S = 3600.0
# A staged file is locked microseconds after it is created: unlocked and this old, its writer is dead.
UNLOCKED_FILE_GRACE_S = 60.0


class DestinationExists(FileExistsError):
    """`staged_directory` found its destination taken (and was not asked to replace it)."""


def old_path(dest: Path) -> Path:
    """Where `staged_directory(..., replace=...)` keeps the previous `dest` until the new one is in."""
    return dest.with_name(f".{dest.name}.old")


def lock_path(tmp: Path) -> Path:
    return tmp.with_name(tmp.name + ".lock")


@contextlib.contextmanager
def staged_directory(dest: Path, replace: bool | Callable[[Path], bool] = False) -> Iterator[Path]:
    """A new directory to write `dest` into, renamed into place when the block succeeds and removed
    when it fails or is interrupted (a kill -9's: by the next writer of `dest`).

    A missing `dest` or an empty directory is simply taken. Another `dest` is replaced when `replace`
    is True, or a callable that returns True for it; the previous one is kept (as `.NAME.old`) until
    the new one is in, and given back if that rename fails. Otherwise `DestinationExists` is raised
    and the new copy dropped (a writer that finds another's complete copy there can use it)."""
    dest = Path(dest)
    sweep_staged(dest)
    with staging_workspace(dest.parent, dest.name) as tmp:
        yield tmp
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700
        _rename_into_place(tmp, dest, replace)


def _rename_into_place(tmp: Path, dest: Path, replace: bool | Callable[[Path], bool]) -> None:
    try:
        os.rename(tmp, dest)  # atomic; takes a missing destination or an empty directory
        return
    except OSError as exc:
        if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise
    if not (replace(dest) if callable(replace) else replace):
        raise DestinationExists(errno.EEXIST, "already exists", str(dest))
    old = old_path(dest)
    remove_path(old)
    os.rename(dest, old)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old, dest)  # the previous one stays
        raise
    remove_path(old)


def remove_path(path: Path) -> None:
    """Remove a directory tree, or a file or link."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@contextlib.contextmanager
def staging_workspace(parent: Path, name: str) -> Iterator[Path]:
    """A new directory `parent/.NAME.tmp-XXXX`, locked while the block runs and removed on the way
    out (unless it was renamed into place). `staged_directory` renames it onto NAME; a bundle's
    writers rename the files in it (runtime.bundle.staging)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}{STAGING_MARK}", dir=parent))
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
    """Whether the writer that made the staging directory `tmp` may still be running (when in doubt,
    it is)."""
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


def sweep_staged(dest: Path) -> list[Path]:
    """Remove what killed writers of `dest` left beside it: their staging directories (never a live
    writer's) and `.NAME.old`. A `.NAME.old` without NAME is the previous `dest` of a replacing writer
    killed between its two renames: it is renamed back, as if that writer had never started. Returns
    what was removed."""
    if fcntl is None or not dest.parent.is_dir():
        return []
    removed, running = remove_dead_staging(dest.parent, glob.escape(dest.name))
    old = old_path(dest)
    if not running and old.is_dir() and not old.is_symlink():
        if dest.exists() or dest.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
            removed.append(old)
        else:
            old.rename(dest)
    return removed


def remove_dead_staging(parent: Path, name_glob: str = "*") -> tuple[list[Path], bool]:
    """Remove the staging directories `parent/.NAME.tmp-*` (NAME matching `name_glob`) whose writers
    are dead, their stray locks, and the dead writers' staged files `.NAME.tmp-*.part`; returns (what
    was removed, whether a live writer's directory was seen)."""
    removed, running = [], False
    if fcntl is None:
        return removed, True
    for path in sorted(parent.glob(f".{name_glob}{STAGING_MARK}*")):
        if path.name.endswith(".lock"):
            tmp = path.with_name(path.name.removesuffix(".lock"))
            if not tmp.exists() and not owner_alive(tmp):  # a lock whose dir went
                with contextlib.suppress(OSError):
                    path.unlink()
            continue
        if path.name.endswith(PART_SUFFIX) and path.is_file() and not path.is_symlink():
            if _remove_if_writer_dead(path):
                removed.append(path)
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


# -- single files -----------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_file(path: Path, mode: int = 0o644) -> Iterator[Path]:
    """A staged file `.NAME.tmp-XXXX.part` beside `path` for the block to write (by name); renamed
    onto `path` when the block succeeds, removed when it fails. Readers never see half a file; a
    kill -9's staged file is removed by the next write into the directory (see `remove_dead_staging`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_files_once(path.parent)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}{STAGING_MARK}", suffix=PART_SUFFIX, dir=path.parent)
    tmp = Path(name)
    try:
        if fcntl is not None:
            with contextlib.suppress(OSError):  # no locks here: sweepers go by its age
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield tmp
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    finally:
        os.close(fd)  # after the rename: a sweeper never sees this writer's file unlocked


def write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` through `atomic_file`: readers never see half a file."""
    with atomic_file(path) as tmp, tmp.open("wb") as f:
        f.write(data)


def strict_json(value: Any) -> Any:
    """`value` with non-finite floats as the strings "inf", "-inf", "nan": a manifest is strict JSON
    (RFC 8259), readable by any parser (diffusers' DPM scheduler config has lambda_min_clipped=-inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def write_report(path: Path, value: Any) -> None:
    """Every JSON report (`--json-out`, tuning.json, eval's): strict JSON, written atomically."""
    write_atomic(path, (json.dumps(strict_json(value), indent=2, allow_nan=False) + "\n").encode())


_swept_dirs: set[str] = set()  # once per directory per process: a batch writes thousands of files


def _sweep_files_once(parent: Path) -> None:
    key = os.path.abspath(parent)
    if key in _swept_dirs or fcntl is None:
        return
    _swept_dirs.add(key)
    for path in parent.glob(f".*{STAGING_MARK}*{PART_SUFFIX}"):
        if path.is_file() and not path.is_symlink():
            _remove_if_writer_dead(path)


def _remove_if_writer_dead(path: Path) -> bool:
    """Remove the staged file `path` if no live writer holds its lock (and it is not brand new)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        info = os.fstat(fd)
        if time.time() - info.st_mtime < UNLOCKED_FILE_GRACE_S:
            return False  # created an instant ago, not locked yet
        if os.stat(path, follow_symlinks=False).st_ino != info.st_ino:
            return False
        path.unlink()
    except OSError:
        return False  # locked: its writer lives (or it went meanwhile)
    finally:
        os.close(fd)
    return True
