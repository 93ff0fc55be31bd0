"""Code shape the project holds itself to: the hot paths and commands stay readable in one screen."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ilf_deploy"
LONGEST = 100  # no function past this many lines
LONG = 60  # and at most MAX_LONG functions past this many
MAX_LONG = 8


def function_lengths() -> dict[str, int]:
    lengths = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                where = f"{path.relative_to(PACKAGE.parent)}:{node.lineno} {node.name}"
                lengths[where] = node.end_lineno - node.lineno + 1  # type: ignore[operator]
    return lengths


def test_functions_stay_short():
    lengths = function_lengths()
    assert len(lengths) > 500  # the walk really saw the package
    too_long = {f: n for f, n in lengths.items() if n > LONGEST}
    assert not too_long, too_long
    long = {f: n for f, n in lengths.items() if n > LONG}
    assert len(long) <= MAX_LONG, sorted(long.items(), key=lambda kv: -kv[1])
