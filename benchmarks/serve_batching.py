"""P5: serve's images/s at each micro-batch size on one bundle (run by `make bench`, not CI).

One server per `--max-batches` size (default 1, 2, 4, 8) over the same bundle and engine on
127.0.0.1, measured in interleaved rounds (1, 2, 4, 8, 1, 2, ...; medians), each round the same
closed-loop load: C concurrent clients, each sending its next request as soon as the previous one is
answered. Prints images/s per size, and for each size how its time per image compares with
batch-1's (does a batch of 4 cost less per image than 4 singles, and by how much?); exits 1 when
the largest size's throughput is below 1.5x batch-1's.

    python -m benchmarks.serve_batching [--quick] [--bundle DIR] [--plan P] [--max-batches 1,2,4]
                                        [--clients 8] [--requests 160] [--rounds 2] [--backend B]

`--bundle` serves any bundle with its `auto` engine (e.g. the peer benchmark's PixArt-XL one with
`--plan ilf-10 --clients 4 --requests 8`); `--backend` names another (e.g. `openvino` on the tiny
bundle, whose `auto` is ONNX Runtime). Writes out/bench/serve_batching.json, with, per size, the
batch sizes the server ran and, from the engine's own log lines, the compiles in its warm-up and
after it said ready, and the calls on a dynamic-shape model (OpenVINO: every batch bucket is
compiled static in the warm-up, so both are 0 where the plan's batches are all buckets).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

TARGET = 1.5
OUT = Path("out/bench")
PROMPT = "a small red circle on a blue background"


def tiny_bundle(root: Path) -> Path:
    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.model.tiny import make_tiny_pipeline

    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-4", "ilf-4")))


class EngineEvents(logging.Handler):
    """Counts from the log lines themselves: OpenVINO's compiles and dynamic-shape calls (its DEBUG
    lines), and the size of each batch `serve` ran (its one line per batch)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.compiles, self.dynamic, self.batches = 0, 0, Counter[int]()
        loggers = {"ilf_deploy.openvino": logging.DEBUG, "ilf_deploy.serving.serve.batch": logging.INFO}
        logging.getLogger("ilf_deploy.serving.serve.access").setLevel(logging.ERROR)  # /readyz 503s
        for name, level in loggers.items():
            logging.getLogger(name).setLevel(level)
            logging.getLogger(name).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "OpenVINO compiles %s for %s":
            self.compiles += 1
        elif record.msg == "OpenVINO runs %s on its dynamic-shape model":
            self.dynamic += 1
        elif record.name.endswith(".batch") and record.__dict__.get("fields", {}).get("status") == "ok":
            self.batches[record.__dict__["fields"]["n"]] += 1

    def since(self, mark: tuple[int, int, Counter[int]]) -> dict[str, Any]:
        compiles, dynamic, batches = mark
        sizes = self.batches - batches
        return {"compiles": self.compiles - compiles, "dynamic_calls": self.dynamic - dynamic,
                "batch_sizes": dict(sorted(sizes.items()))}  # fmt: skip

    def mark(self) -> tuple[int, int, Counter[int]]:
        return self.compiles, self.dynamic, Counter(self.batches)


async def closed_loop(url: str, clients: int, requests: int, plan: str) -> tuple[float, int]:
    """(seconds, failures) for `requests` requests from `clients` concurrent clients."""
    import httpx

    failures = 0

    async def client(http: httpx.AsyncClient, first: int) -> None:
        nonlocal failures
        for i in range(first, requests, clients):
            body = {"prompt": PROMPT, "plan": plan, "seed": i}
            response = await http.post("/v1/images/generations", json=body)
            failures += response.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(clients)))
        return time.perf_counter() - started, failures


def measure(
    bundle: Path, generator, max_batch: int, args: argparse.Namespace, warm: bool, events: EngineEvents
) -> tuple[float, dict[str, Any]]:
    """images/s of one server with `max_batch` under the closed-loop load (`warm`: one unmeasured
    pass first: anything an engine still opens lazily is opened before timing), and what its
    engine did in its warm-up and after it (`EngineEvents`)."""
    import httpx

    from ilf_deploy.serving.serve import ServeOptions, create_app
    from ilf_deploy.serving.serve.background import background_server

    options = ServeOptions(max_batch=max_batch, max_wait_ms=args.max_wait_ms, max_queue=4 * args.clients)
    started = events.mark()
    with background_server(create_app(bundle, options, generator)) as url:
        deadline = time.monotonic() + 600
        while httpx.get(f"{url}/readyz").status_code != 200:  # warm-up done
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            time.sleep(0.05)
        ready = events.mark()
        if warm:
            asyncio.run(closed_loop(url, args.clients, args.clients, args.plan))
        seconds, failures = asyncio.run(closed_loop(url, args.clients, args.requests, args.plan))
    if failures:
        raise SystemExit(f"{failures} requests failed with max batch {max_batch}")
    seen = {"warmup_compiles": ready[0] - started[0], "after_ready": events.since(ready)}
    return args.requests / seconds, seen


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="Bundle to serve (default: a tiny PixArt-α one).")
    parser.add_argument("--plan", default="base-4")
    parser.add_argument("--backend", default="auto", help="Engine (default: the bundle's `auto`).")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients (>= the largest batch).")
    parser.add_argument("--requests", type=int, default=160, help="Measured requests per server and round.")
    parser.add_argument("--max-batches", default="1,2,4,8", help="Micro-batch sizes, comma-separated.")
    parser.add_argument("--rounds", type=int, default=2, help="Interleaved rounds (medians).")
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="64 measured requests per server, 1 round.")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests, args.rounds = min(args.requests, 64), 1
    try:
        args.sizes = sorted({int(v) for v in args.max_batches.split(",") if v.strip()})
    except ValueError:
        parser.error(f"--max-batches must be integers, got {args.max_batches!r}")
    if not args.sizes or args.sizes[0] < 1 or 1 not in args.sizes:
        parser.error("--max-batches must include 1 (the baseline) and only sizes >= 1")
    if args.clients < max(args.sizes) or args.requests < args.clients or args.rounds < 1:
        parser.error("--clients must be >= the largest batch, --requests >= --clients, --rounds >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ilf_deploy.engines.backends import open_generator
    from ilf_deploy.engines.backends.machine import fingerprint

    samples: dict[int, list[float]] = {size: [] for size in args.sizes}
    engine: dict[int, list[dict[str, Any]]] = {size: [] for size in args.sizes}
    events = EngineEvents()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or tiny_bundle(Path(tmp))
        generator = open_generator(bundle, args.backend)
        for round_index in range(args.rounds):
            for size in args.sizes:
                rate, seen = measure(bundle, generator, size, args, round_index == 0, events)
                samples[size].append(rate)
                engine[size].append(seen)
                after = seen["after_ready"]
                print(
                    f"  round {round_index + 1}: max batch {size}: {rate:.3f} images/s; batches "
                    f"{after['batch_sizes']}, warm-up compiles {seen['warmup_compiles']}, after ready: "
                    f"{after['compiles']} compiles, {after['dynamic_calls']} dynamic-shape calls"
                )
    rate = {size: statistics.median(values) for size, values in samples.items()}
    machine = fingerprint()
    flags = [f for f in machine["flags"] if f.startswith(("avx512", "amx", "avx_vnni", "avx2"))]
    print(f"serve throughput, {args.clients} clients, plan {args.plan}, {args.requests} requests a round,")
    engine_name = generator.choice or args.backend
    print(f"  {engine_name}; {machine['cpu']}, {machine['cores']} cores; {' '.join(flags)}")
    for size in args.sizes:
        per_image = rate[1] / rate[size]  # time per image vs batch-1's
        print(f"  max batch {size:<3} {rate[size]:8.3f} images/s   time per image {per_image:.3f}x batch-1's")
    largest = args.sizes[-1]
    ratio = rate[largest] / rate[1]
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"P5 max batch {largest} / batch-1 = {ratio:.2f}x (target >= {TARGET}x): {verdict}")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {
        "bundle": str(args.bundle or "tiny pixart-alpha (4 blocks)"), "engine": engine_name,
        "clients": args.clients, "requests": args.requests, "rounds": args.rounds, "plan": args.plan,
        "max_wait_ms": args.max_wait_ms, "images_per_s": rate, "samples": samples,
        "engine_events": engine,
        "ratio_largest_vs_batch1": ratio, "target": TARGET, "machine": machine,
    }  # fmt: skip
    (OUT / "serve_batching.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
