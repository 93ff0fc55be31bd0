"""`make bench`: run every benchmark module in `benchmarks/`, each in its own process.

    python -m benchmarks.run [--quick] [--only backbone,int8_cpu] [--list] [-- extra args for each main]

A benchmark is any `benchmarks/<name>.py` other than `run`, `__init__` and names starting with `_`,
with `main(argv: list[str] | None = None) -> int`; `--quick` and extra arguments are passed to it
(a `main()` that takes no arguments is called without them). Each runs in a subprocess so that one
benchmark's memory (the full-size backbone holds GBs) or crash does not affect the next; a failure
is reported and the others still run. A summary goes to out/bench/summary.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUT = Path("out/bench")
_SKIP = {"run", "__init__"}

# Imports the module and calls main(argv), or main() when it takes no parameters.
_CHILD = """
import importlib, inspect, sys
module = importlib.import_module("benchmarks." + sys.argv[1])
args = sys.argv[2:]
sys.argv = ["python -m benchmarks." + sys.argv[1], *args]  # what argparse shows in usage and errors
takes_args = bool(inspect.signature(module.main).parameters)
sys.exit(module.main(args) if takes_args else module.main())
"""


def discover() -> list[str]:
    """Benchmark module names, sorted: whatever `benchmarks/*.py` exists now, other developers' too."""
    here = Path(__file__).resolve().parent
    return sorted(p.stem for p in here.glob("*.py") if p.stem not in _SKIP and not p.stem.startswith("_"))


def run_one(name: str, args: list[str]) -> dict:
    print(f"\n=== benchmarks.{name} {' '.join(args)}".rstrip(), flush=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, name, *args], cwd=ROOT, check=False)
    seconds = time.perf_counter() - start
    status = "ok" if proc.returncode == 0 else f"failed (exit {proc.returncode})"
    print(f"=== benchmarks.{name}: {status} in {seconds:.0f} s", flush=True)
    return {"name": name, "returncode": proc.returncode, "seconds": seconds}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:  # everything after `--` goes to every benchmark's main
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="each benchmark's quick mode (minutes, not ~30)")
    parser.add_argument("--only", default="", help="comma-separated benchmark names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the benchmarks and exit")
    args = parser.parse_args(argv)
    names = discover()
    if args.list:
        print("\n".join(names))
        return 0
    if args.only:
        wanted = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            parser.error(f"unknown benchmarks {unknown}; have {names}")
        names = [n for n in names if n in wanted]
    passed = (["--quick"] if args.quick else []) + extra
    results = [run_one(name, passed) for name in names]
    (ROOT / OUT).mkdir(parents=True, exist_ok=True)
    summary = {"quick": args.quick, "args": passed, "benchmarks": results}
    (ROOT / OUT / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\nsummary:")
    for r in results:
        status = "ok" if r["returncode"] == 0 else f"FAILED ({r['returncode']})"
        print(f"  {r['name']:<20} {status:<12} {r['seconds']:7.0f} s")
    return 0 if all(r["returncode"] == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
