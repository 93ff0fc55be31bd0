"""File helpers shared by the commands that write models."""

from __future__ import annotations

import os
from pathlib import Path


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
