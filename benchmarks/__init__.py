"""Performance benchmarks (issue 3), run by `make bench` (`python -m benchmarks.run`), not by CI.

Every `benchmarks/<name>.py` module (except `run` and names starting with `_`) is a benchmark with a
`main(argv: list[str] | None = None) -> int` that prints its ratios and writes JSON under `out/bench/`.
"""
