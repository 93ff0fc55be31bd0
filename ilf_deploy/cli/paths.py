"""Output paths, checked before any work: a bad one is one line up front, not a traceback after
minutes of work, nor a first output written and a second refused."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..errors import ConfigError


def _writable_dir(directory: Path, flag: str, path: Path) -> None:
    if not directory.is_dir():
        raise ConfigError(f"{flag} {path}: directory {directory} does not exist")
    if not os.access(directory, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: cannot write in {directory} (permission denied)")


def output_file(path: Path | None, flag: str, suffixes: Iterable[str] = ()) -> Path | None:
    """`path` as a file this process can write, in an existing directory, with one of `suffixes`
    (any, if none are given)."""
    if path is None:
        return None
    allowed = tuple(suffixes)
    if path.is_dir():
        raise ConfigError(f"{flag} {path} is a directory; give a file name")
    if allowed and path.suffix.lower() not in allowed:
        named = ", ".join(allowed[:3]) + (" or another of Pillow's formats" if len(allowed) > 3 else "")
        raise ConfigError(f"{flag} {path}: the file name must end in {named}")
    _writable_dir(path.parent, flag, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise ConfigError(f"{flag} {path}: the file is not writable")
    return path


def output_dir(path: Path | None, flag: str) -> Path | None:
    """`path` as a directory that exists or can be made: not a file, and the nearest existing
    directory above it (or itself) writable."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{flag} {path} is a file, not a directory")
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
