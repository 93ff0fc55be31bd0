"""Which extra (`pip install 'ilf-deploy[EXTRA]'`) brings a missing module: read from the installed
package's metadata, so pyproject.toml's `[project.optional-dependencies]` is the one table."""

from __future__ import annotations

import re
from importlib import metadata

# A requirement line of the metadata: `onnxruntime>=1.19; extra == "onnx"`.
_REQUIREMENT = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)[^;]*;.*extra\s*==\s*['\"]([a-z0-9_-]+)['\"]")
# Distributions whose import name is not their normalized name.
_MODULE_OF = {"pillow": "PIL", "pyyaml": "yaml", "huggingface_hub": "huggingface_hub"}
# Extras that are not for users to name in an error (the developers' tools).
_NOT_ADVISED = {"dev"}


def module_name(distribution: str) -> str:
    normalized = re.sub(r"[-_.]+", "_", distribution).lower()
    return _MODULE_OF.get(normalized, normalized)


def extras_by_module(requirements: list[str] | None = None) -> dict[str, str]:
    """Top-level module -> the first extra that lists its distribution (pyproject's order)."""
    if requirements is None:
        try:
            requirements = metadata.requires("ilf-deploy") or []
        except metadata.PackageNotFoundError:  # a source tree that was never installed
            requirements = []
    table: dict[str, str] = {}
    for line in requirements:
        match = _REQUIREMENT.match(line)
        if match and match.group(2) not in _NOT_ADVISED:
            table.setdefault(module_name(match.group(1)), match.group(2))
    return table
