"""Prepare `tensorrt-stubs` for mypy: `python -m tests.support.trt_stubs DIR`, then
`MYPYPATH=DIR mypy --config-file DIR/mypy.ini ilf_deploy/engines/backends/tensorrt.py`.

tensorrt-stubs 10.13 installs `tensorrt/__init__.pyi` without a py.typed marker (mypy then skips
it as untyped) and its generated stubs have a few syntax errors (a parameter named `in`, a required
parameter after defaults) and import `tensorrt_libs`. This copies them into DIR and repairs that.
Install them with `pip install --no-deps tensorrt-stubs` (their dependency is TensorRT itself).
"""

from __future__ import annotations

import re
import shutil
import sys
import sysconfig
from pathlib import Path

FIXES = (
    (re.compile(r"\bin: list"), "in_: list"),  # `in` is a keyword
    (re.compile(r"channel_axis: int\)"), "channel_axis: int = ...)"),  # after defaulted parameters
)


def prepare(target: Path) -> Path:
    site = Path(sysconfig.get_paths()["purelib"])
    if not (site / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        raise SystemExit("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for package in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(
            site / package, target / package, ignore=shutil.ignore_patterns("*.py", "__pycache__")
        )
    for stub in target.rglob("*.pyi"):
        text = stub.read_text()
        for pattern, replacement in FIXES:
            text = pattern.sub(replacement, text)
        stub.write_text(text)
    (target / "tensorrt_libs.pyi").write_text("")
    # The generated stubs have hundreds of their own errors (`bool` shadowed, ...): check our code only.
    (target / "mypy.ini").write_text(
        "[mypy]\nfollow_imports = silent\n\n[mypy-tensorrt.*,tensorrt_bindings.*,tensorrt_libs]\n"
        "ignore_errors = True\n"
    )
    return target


if __name__ == "__main__":
    print(prepare(Path(sys.argv[1] if len(sys.argv) > 1 else ".mypy-stubs")))
