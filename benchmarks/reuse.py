"""A benchmark's prepared outputs (model directories, bundles), reused only while what made them is
the same: a stamp beside each records its recipe and the code that made it.

A machine that kept `out/bench/` from older code used to measure the old bundle layout (the
manifest records only `ilf-deploy 0.1.0`) until told `--rebuild`: a figure of code that is no longer
there, reported as today's. Now the code's fingerprint (a digest of `ilf_deploy`'s sources and the
versions of the libraries that build, export and quantize) is part of every stamp, and an output
whose stamp differs, or that has none, is made anew, said in one line.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from functools import cache
from pathlib import Path
from typing import Any

import ilf_deploy
from benchmarks.peer import log
from ilf_deploy.engines.backends.machine import VERSIONED, library_versions

# What a bundle's bytes depend on besides ilf_deploy itself: the engines', and the exporters'.
LIBRARIES = (*VERSIONED, "diffusers", "transformers", "onnx")
SOURCE_SUFFIXES = (".py", ".json")


@cache
def code_fingerprint() -> dict[str, str | None]:
    """{"ilf_deploy": digest of its sources, library: version (None: absent), …} for this installation."""
    return {"ilf_deploy": source_digest(Path(ilf_deploy.__file__).parent), **library_versions(LIBRARIES)}


def source_digest(root: Path) -> str:
    """A digest of the sources under `root` (names and bytes; compiled caches left out)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def stamp_path(output: Path) -> Path:
    """Where `output`'s stamp lives: beside it, so that removing the output keeps no stale stamp inside."""
    return output.with_name(output.name + ".stamp.json")


def made_by(output: Path) -> dict[str, str | None] | None:
    """The code `output`'s stamp records (None: no stamp), for a benchmark's results."""
    path = stamp_path(output)
    return json.loads(path.read_text())["code"] if path.is_file() else None


def reuse_or_clear(output: Path, recipe: dict[str, Any], rebuild: bool = False) -> dict[str, Any]:
    """Remove `output` unless its stamp records `recipe` and this code (or `rebuild`); then stamp it
    with them, before it is (re)made: a stage that dies half-way leaves its output absent, and the
    next run makes it again under the same stamp. Returns the stamp (a later output's recipe may
    include it, so that remaking this one remakes that one too)."""
    stamp = {"recipe": recipe, "code": code_fingerprint()}
    path = stamp_path(output)
    if output.exists() and not rebuild:
        old = json.loads(path.read_text()) if path.is_file() else None
        if old == stamp:
            return stamp
        log(f"{output}: {_why_stale(old, stamp)}; making it anew")
    shutil.rmtree(output, ignore_errors=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stamp, indent=1, sort_keys=True) + "\n")
    return stamp


def _why_stale(old: dict[str, Any] | None, new: dict[str, Any]) -> str:
    if old is None:
        return "made by code that kept no stamp"
    changed = sorted(key for key in new["code"] if old.get("code", {}).get(key) != new["code"][key])
    if changed:
        return "made by other code (" + ", ".join(changed) + " changed)"
    return "made with other settings"
