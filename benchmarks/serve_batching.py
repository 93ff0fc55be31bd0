"""P5: serve's images/s at each micro-batch size on one bundle (run by `make bench`, not CI).

One server per `--max-batches` size (default 1, 2, 4, 8) over the same bundle and engine on
127.0.0.1, measured in interleaved rounds (1, 2, 4, 8, 1, 2, ...; medians), each round the same
closed-loop load: C concurrent clients, each sending its next request as soon as the previous one is
answered. Prints images/s per size, and for each size how its time per image compares with
batch-1's (does a batch of 4 cost less per image than 4 singles, and by how much?); exits 1 when
the largest size's throughput is below 1.5x batch-1's.

    python -m benchmarks.serve_batching [--quick] [--bundle DIR] [--plan P] [--max-batches 1,2,4]
                                        [--clients 8] [--requests 160] [--rounds 2]

`--bundle` serves any bundle with its `auto` engine (e.g. the peer benchmark's PixArt-XL one with
`--plan ilf-10 --clients 4 --requests 8`). Writes out/bench/serve_batching.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.5
OUT = Path("out/bench")
PROMPT = "a small red circle on a blue background"


def tiny_bundle(root: Path) -> Path:
    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.model.tiny import make_tiny_pipeline

    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-4", "ilf-4")))


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


def measure(bundle: Path, generator, max_batch: int, args: argparse.Namespace, warm: bool) -> float:
    """images/s of one server with `max_batch` under the closed-loop load (`warm`: one unmeasured
    pass first, so that each batch shape the engine compiles lazily is compiled before timing)."""
    import httpx

    from ilf_deploy.serving.serve import ServeOptions, create_app
    from ilf_deploy.serving.serve.background import background_server

    options = ServeOptions(max_batch=max_batch, max_wait_ms=args.max_wait_ms, max_queue=4 * args.clients)
    with background_server(create_app(bundle, options, generator)) as url:
        deadline = time.monotonic() + 600
        while httpx.get(f"{url}/readyz").status_code != 200:  # warm-up done
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            time.sleep(0.05)
        if warm:
            asyncio.run(closed_loop(url, args.clients, args.clients, args.plan))
        seconds, failures = asyncio.run(closed_loop(url, args.clients, args.requests, args.plan))
    if failures:
        raise SystemExit(f"{failures} requests failed with max batch {max_batch}")
    return args.requests / seconds


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="Bundle to serve (default: a tiny PixArt-α one).")
    parser.add_argument("--plan", default="base-4")
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
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or tiny_bundle(Path(tmp))
        generator = open_generator(bundle, "auto")
        for round_index in range(args.rounds):
            for size in args.sizes:
                samples[size].append(measure(bundle, generator, size, args, warm=round_index == 0))
                print(f"  round {round_index + 1}: max batch {size}: {samples[size][-1]:.3f} images/s")
    rate = {size: statistics.median(values) for size, values in samples.items()}
    machine = fingerprint()
    flags = [f for f in machine["flags"] if f.startswith(("avx512", "amx", "avx_vnni", "avx2"))]
    print(f"serve throughput, {args.clients} clients, plan {args.plan}, {args.requests} requests a round,")
    print(f"  {generator.choice or 'auto'}; {machine['cpu']}, {machine['cores']} cores; {' '.join(flags)}")
    for size in args.sizes:
        per_image = rate[1] / rate[size]  # time per image vs batch-1's
        print(f"  max batch {size:<3} {rate[size]:8.3f} images/s   time per image {per_image:.3f}x batch-1's")
    largest = args.sizes[-1]
    ratio = rate[largest] / rate[1]
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"P5 max batch {largest} / batch-1 = {ratio:.2f}x (target >= {TARGET}x): {verdict}")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {
        "bundle": str(args.bundle or "tiny pixart-alpha (4 blocks)"), "engine": generator.choice,
        "clients": args.clients, "requests": args.requests, "rounds": args.rounds, "plan": args.plan,
        "max_wait_ms": args.max_wait_ms, "images_per_s": rate, "samples": samples,
        "ratio_largest_vs_batch1": ratio, "target": TARGET, "machine": machine,
    }  # fmt: skip
    (OUT / "serve_batching.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
