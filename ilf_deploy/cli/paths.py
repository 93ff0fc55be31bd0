"""Output paths, checked before any work: a bad one is one line up front, not a traceback after
minutes of work, nor a first output written and a second refused.

The --force rule lives here (docs/cli-guide.md, "Outputs and --force"): an output that exists is
refused, naming it and --force, unless the command was given --force; then it is replaced."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ilf_deploy.core.errors import ConfigError


def refuse_existing(flag: str, there: Iterable[str | Path], force: bool) -> None:
    """The --force rule: `there`, what `flag` names that exists already, is replaced only with
    `force` (the command's --force)."""
    there = [str(p) for p in there]
    if there and not force:
        it = "it" if len(there) == 1 else "them"
        raise ConfigError(f"{flag} {', '.join(there)} exists; pass --force to replace {it}")


def _writable_dir(directory: Path, flag: str, path: Path) -> None:
    if not directory.is_dir():
        raise ConfigError(f"{flag} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {directory} (permission denied)")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link is replaced as a file would be


def output_file(path: Path | None, flag: str, suffixes: Iterable[str] = (), *, force: bool) -> Path | None:
    """`path` as a file this process can write, in an existing directory, with one of `suffixes`
    (any, if none are given); an existing file only with `force` (the command's --force)."""
    if path is None:
        return None
    allowed = tuple(suffixes)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    if allowed and path.suffix.lower() not in allowed:
        named = ", ".join(allowed[:3]) + (" or another of Pillow's formats" if len(allowed) > 3 else "")
        raise ConfigError(f"{flag} {path}: the file name must end in {named}")
    _writable_dir(path.parent, flag, path)
    refuse_existing(flag, [path] if _exists(path) else [], force)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path}: the file is not writable")
    return path


def output_dir(
    path: Path | None, flag: str, *, force: bool, files: Iterable[str] | None = None
) -> Path | None:
    """`path` as a directory that exists or can be made: not a file, and the nearest existing
    directory above it (or itself) writable. What the --force rule protects: the directory itself
    when it holds anything (`files` None), else the `files` in it that the command writes (none:
    a directory the command adds to, and whose writer checks its own files)."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a directory")
    if files is not None:
        refuse_existing(flag, [path / name for name in files if _exists(path / name)], force)
    elif path.is_dir() and any(path.iterdir()):
        refuse_existing(flag, [path], force)
    existing = path
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, not a directory")
    _writable_dir(existing, flag, path)
    return path


def image_suffixes() -> tuple[str, ...]:
    """The file endings Pillow can write, the usual ones first."""
    from PIL import Image

    Image.init()
    writable = {ext for ext, kind in Image.registered_extensions().items() if kind in Image.SAVE}
    usual = [ext for ext in (".png", ".jpg", ".webp") if ext in writable]
    return (*usual, *sorted(writable - set(usual)))
