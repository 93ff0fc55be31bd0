"""P5: micro-batching vs batch-1 serving throughput on the tiny bundle (run by `make bench`, not CI).

Two servers over the same bundle, one after the other on 127.0.0.1: `--max-batch 1` and micro-batching
(`--max-batch 8`). Each gets the same closed-loop load: C concurrent clients, each sending its next
request as soon as the previous one is answered. Prints images/s for both and their ratio; exits 1
when the ratio is below the 1.5x target.

    python -m benchmarks.serve_batching [--quick] [--bundle DIR] [--clients 8] [--requests 160]

Writes out/bench/serve_batching.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

TARGET = 1.5
OUT = Path("out/bench")


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
            body = {"prompt": "a small red circle on a blue background", "plan": plan, "seed": i}
            response = await http.post("/v1/images/generations", json=body)
            failures += response.status_code != 200

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http, c) for c in range(clients)))
        return time.perf_counter() - started, failures


def measure(bundle: Path, generator, max_batch: int, args: argparse.Namespace) -> float:
    import httpx

    from ilf_deploy.serving.serve import ServeOptions, create_app
    from ilf_deploy.serving.serve.background import background_server

    options = ServeOptions(max_batch=max_batch, max_wait_ms=args.max_wait_ms, max_queue=4 * args.clients)
    with background_server(create_app(bundle, options, generator)) as url:
        deadline = time.monotonic() + 120
        while httpx.get(f"{url}/readyz").status_code != 200:  # warm-up done
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become ready")
            time.sleep(0.05)
        asyncio.run(closed_loop(url, args.clients, 2 * args.clients, args.plan))  # warm the batch shapes
        seconds, failures = asyncio.run(closed_loop(url, args.clients, args.requests, args.plan))
    if failures:
        raise SystemExit(f"{failures} requests failed with max batch {max_batch}")
    return args.requests / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="Bundle to serve (default: a tiny PixArt-α one).")
    parser.add_argument("--plan", default="base-4")
    parser.add_argument("--clients", type=int, default=8, help="Concurrent clients (4 or more for P5).")
    parser.add_argument("--requests", type=int, default=160, help="Measured requests per server.")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="64 measured requests per server.")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 64)
    if args.clients < 1 or args.requests < args.clients:
        parser.error("--clients must be >= 1 and --requests >= --clients")

    from ilf_deploy.engines.backends import open_generator

    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or tiny_bundle(Path(tmp))
        generator = open_generator(bundle)
        single = measure(bundle, generator, 1, args)
        batched = measure(bundle, generator, args.max_batch, args)
    ratio = batched / single
    print(f"serve throughput, {args.clients} clients, plan {args.plan}, {args.requests} requests each:")
    label = f"micro-batching (max {args.max_batch})"
    print(f"  {'batch-1':<24} {single:7.2f} images/s")
    print(f"  {label:<24} {batched:7.2f} images/s")
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"P5 micro-batching / batch-1 = {ratio:.2f}x (target >= {TARGET}x): {verdict}")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {
        "clients": args.clients,
        "requests": args.requests,
        "plan": args.plan,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "batch1_images_per_s": single,
        "batched_images_per_s": batched,
        "ratio": ratio,
        "target": TARGET,
    }
    (OUT / "serve_batching.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
