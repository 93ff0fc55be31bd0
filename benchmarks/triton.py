"""P6: the same bundle on tritonserver (export-triton) vs `ilf-deploy serve` (run by `make bench`, not CI).

Both servers run at once as separate processes on 127.0.0.1, each with the same batching settings
(max batch 8, 10 ms batching window). Each gets the same closed-loop load, in alternating rounds
(ABAB…): C concurrent clients, each sending its next request as soon as the previous one is answered
(ours: POST /v1/images/generations, a PNG in JSON; Triton: KServe v2 HTTP infer, a uint8 tensor).
Prints images/s (median over rounds) and p50/p95 latency for both, and their ratio; exits 1 when
Triton is below 0.9x our server (the target: the Triton glue costs nothing).

    python -m benchmarks.triton [--quick] [--bundle DIR] [--clients 8] [--requests 96] [--rounds 3]

Writes out/bench/triton.json.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

TARGET = 0.9
OUT = Path("out/bench")
PROMPT = "a small red circle on a blue background"


def tiny_bundle(root: Path) -> Path:
    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.model.tiny import make_tiny_pipeline

    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-4", "ilf-4")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{process.args[0]} exited with {process.returncode}")
        try:
            if urllib.request.urlopen(url, timeout=2).status == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} not ready in {timeout:.0f} s")


def closed_loop(send: Callable[[int], None], clients: int, requests: int) -> tuple[float, list[float]]:
    """(seconds, per-request latencies) for `requests` requests from `clients` threads."""
    latencies: list[float] = []
    lock, counter = threading.Lock(), iter(range(requests))
    errors: list[BaseException] = []

    def client() -> None:
        while True:
            with lock:
                seed = next(counter, None)
            if seed is None:
                return
            started = time.perf_counter()
            try:
                send(seed)
            except BaseException as exc:
                errors.append(exc)
                return
            with lock:
                latencies.append(time.perf_counter() - started)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise SystemExit(f"a request failed: {errors[0]}")
    return time.perf_counter() - started, latencies


def ours(port: int, plan: str) -> Callable[[int], None]:
    import httpx

    local = threading.local()

    def send(seed: int) -> None:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=300)
        body = {"prompt": PROMPT, "plan": plan, "seed": seed}
        response = local.client.post("/v1/images/generations", json=body)
        response.raise_for_status()

    return send


def triton(port: int, plan: str) -> Callable[[int], None]:
    import numpy as np
    import tritonclient.http as http

    local = threading.local()

    def send(seed: int) -> None:
        if not hasattr(local, "client"):
            local.client = http.InferenceServerClient(f"127.0.0.1:{port}", network_timeout=300)
        tensors = []
        for name, datatype, value in (
            ("prompt", "BYTES", np.array([[PROMPT.encode()]], dtype=object)),
            ("plan", "BYTES", np.array([[plan.encode()]], dtype=object)),
            ("seed", "INT64", np.array([[seed]], dtype=np.int64)),
        ):
            tensor = http.InferInput(name, list(value.shape), datatype)
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        local.client.infer("ilf", tensors).as_numpy("image")

    return send


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.kill(process.pid, signal.SIGINT)
        try:
            process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, help="Bundle to serve (default: a tiny PixArt-α one).")
    parser.add_argument("--plan", default="ilf-4")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=96, help="Requests per round and server.")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--quick", action="store_true", help="48 requests per round.")
    args = parser.parse_args(argv)
    if args.quick:
        args.requests = min(args.requests, 48)
    if args.clients < 1 or args.requests < args.clients or args.rounds < 1:
        parser.error("--clients and --rounds must be >= 1 and --requests >= --clients")

    from ilf_deploy.serving.triton.repository import ExportOptions, export_repository
    from ilf_deploy.serving.triton.server import find_server

    server = find_server()  # a one-line error when `ilf-deploy install-triton` has not run
    bin_dir = Path(sys.executable).parent
    processes: list[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or tiny_bundle(Path(tmp))
        batching = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
        ours_port = free_port()
        command = [str(bin_dir / "ilf-deploy"), "serve", str(bundle), "--port", str(ours_port)]
        command += [*batching, "--max-queue", str(8 * args.clients), "--log-level", "warning"]
        options = ExportOptions(
            name="ilf",
            max_batch=args.max_batch,
            max_queue_delay_us=int(args.max_wait_ms * 1000),
            max_queue=8 * args.clients,
        )
        export_repository(bundle, Path(tmp) / "repo", options)
        ports = (free_port(), free_port(), free_port())
        try:
            processes.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            triton_command = server.command(Path(tmp) / "repo", *ports, host="127.0.0.1")
            processes.append(
                subprocess.Popen(
                    triton_command,
                    env=server.environment(),
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
            wait_for(f"http://127.0.0.1:{ours_port}/readyz", processes[0])
            wait_for(f"http://127.0.0.1:{ports[0]}/v2/models/ilf/ready", processes[1])
            senders = {
                "ilf-deploy serve": ours(ours_port, args.plan),
                "tritonserver": triton(ports[0], args.plan),
            }
            for send in senders.values():  # warm both: batch shapes, connections
                closed_loop(send, args.clients, 2 * args.clients)
            rates: dict[str, list[float]] = {name: [] for name in senders}
            latencies: dict[str, list[float]] = {name: [] for name in senders}
            for _ in range(args.rounds):
                for name, send in senders.items():  # interleaved: A B A B ...
                    seconds, times = closed_loop(send, args.clients, args.requests)
                    rates[name].append(args.requests / seconds)
                    latencies[name].extend(times)
        finally:
            for process in processes:
                stop(process)
    summary = {
        name: {
            "images_per_s": sorted(rates[name])[len(rates[name]) // 2],
            "p50_s": percentile(latencies[name], 50),
            "p95_s": percentile(latencies[name], 95),
            "rounds_images_per_s": rates[name],
        }
        for name in senders
    }
    ratio = summary["tritonserver"]["images_per_s"] / summary["ilf-deploy serve"]["images_per_s"]
    print(
        f"{args.clients} clients, plan {args.plan}, {args.requests} requests x {args.rounds} rounds "
        f"per server, max batch {args.max_batch}, {args.max_wait_ms:g} ms window:"
    )
    for name, row in summary.items():
        print(
            f"  {name:<18} {row['images_per_s']:7.2f} images/s  "
            f"p50 {1000 * row['p50_s']:7.1f} ms  p95 {1000 * row['p95_s']:7.1f} ms"
        )
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    print(f"P6 tritonserver / ilf-deploy serve = {ratio:.2f}x (target >= {TARGET}x): {verdict}")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {
        **vars(args),
        "bundle": str(args.bundle) if args.bundle else None,
        "servers": summary,
        "ratio": ratio,
        "target": TARGET,
    }
    (OUT / "triton.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ratio >= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
