"""Where a block's int8 time goes on this CPU: a per-op profile of one block segment on each engine.

The block is PixArt-XL-2's (1152 wide, 16 heads, the real caption width; random weights) at 256 px and
batch 2 (guidance), from the same kind of bundle `benchmarks.int8_cpu` builds (2 layers; the ILF loop
cuts them into one-block segments: `blocks_00_00` is profiled). Its real inputs are recorded from a
reference run of the bundle. Each engine runs that segment as its runner opens it (the same session
or compile config) with its own profiler on:

- ONNX Runtime: fp32 and the `int8-dynamic` variant (`SessionOptions.enable_profiling`: per-node
  kernel times);
- OpenVINO: f32, bf16 and the `int8-ov` variant with the bf16 hint, as `tune` runs it
  (`PERF_COUNT`: per-node real times, with the kernel each node ran, e.g. `brgemm_avx512_amx`).

Node times are summed by category (GEMMs, quantize/dequantize, attention, norms, element-wise, layout)
over the measured runs and reported per block call, beside the block's matmul GFLOP/s. The figures
are shares within one engine's run: other work on the machine stretches them all alike.

`--ab ROUNDS`: instead, an interleaved A/B of the int8-ov block (bf16 hint) compiled with the
exported dynamic shapes against the static shapes `OvSegments` now compiles for (round-robin, 3
calls each per round; medians and quartiles), for a machine shared with other work.

    python -m benchmarks.int8_profile [--runs 10] [--rebuild] [--ab ROUNDS]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from ilf_deploy.engines.backends.machine import fingerprint

OUT = Path("out/bench")
SEGMENT = "blocks_00_00"  # one PixArt-XL block
LAYERS = 2
CATEGORIES = {  # op type (ORT) or node type (OpenVINO), lower case -> category
    "gemm": (
        "matmul", "matmulinteger", "dynamicquantizematmul", "matmulintegertofloat", "fullyconnected",
        "gemm", "qlinearmatmul", "fusedmatmul", "convolution",
    ),
    "quantize": ("dynamicquantizelinear", "quantizelinear", "dequantizelinear", "fakequantize", "convert"),
    "attention": ("softmax", "scaleddotproductattention", "sdpa", "attention", "multiheadattention"),
    "norm": ("layernormalization", "mvn", "simplifiedlayernormalization", "rmsnorm", "reducemean"),
    "layout": (
        "transpose", "reshape", "reorder", "concat", "split", "slice", "gather", "unsqueeze",
        "squeeze", "shapeof", "stridedslice", "variadicsplit", "broadcast",
    ),
}  # fmt: skip


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def category(op: str) -> str:
    op = op.lower()
    return next((name for name, ops in CATEGORIES.items() if op in ops), "element-wise")


def recorded_feeds(bundle: Any) -> dict[str, np.ndarray]:
    """The block segment's inputs from a reference run (ORT fp32) of the bundle's base plan."""
    from ilf_deploy.engines.compare import run_reference

    reference = run_reference(bundle, "base-10", max_samples=1)
    return reference.recorder.feeds(SEGMENT)[0]


def ort_profile(bundle: Any, variant: str | None, feeds: dict[str, np.ndarray], runs: int) -> dict:
    """Per-category ms per call of the segment on ONNX Runtime, as OrtSegments opens it."""
    import onnxruntime as ort

    from ilf_deploy.engines.backends.onnxruntime import OrtSegments

    segments = OrtSegments(bundle, variant)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    for key, value in segments.session_config(SEGMENT).items():
        options.add_session_config_entry(key, value)
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(str(bundle.segment_path(SEGMENT, variant)), options)
    names = {i.name for i in session.get_inputs()}
    inputs = {k: v for k, v in feeds.items() if k in names}
    session.run(None, inputs)  # warm-up (its nodes are dropped below by run count)
    wall = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, inputs)
        wall.append(time.perf_counter() - start)
    events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"].get("op_name", "?")
            totals[category(op)] += event["dur"] / 1e3
            ops[op] += event["dur"] / 1e3
    calls = runs + 1
    return summary(totals, ops, calls, wall)


def ov_profile(
    bundle: Any, variant: str | None, precision: str, feeds: dict[str, np.ndarray], runs: int
) -> dict:
    """Per-category ms per call of the segment on OpenVINO, compiled as OvSegments compiles it."""
    from ilf_deploy.engines.backends.openvino import core, open_generator

    segments = open_generator(bundle, variant, precision=precision, cache=False).segments
    config = {**segments.config_for(SEGMENT), "PERF_COUNT": "YES"}
    model = segments.read_model(SEGMENT, segments.shapes_for(SEGMENT, feeds))  # as infer() runs it
    compiled = core().compile_model(model, "CPU", config)
    request = compiled.create_infer_request()
    names = {port.get_any_name() for port in compiled.inputs}
    inputs = {k: v for k, v in feeds.items() if k in names}
    request.infer(inputs)  # warm-up
    mha = snippet_attention(compiled)
    totals: dict[str, float] = defaultdict(float)
    ops: dict[str, float] = defaultdict(float)
    wall = []
    for _ in range(runs):
        start = time.perf_counter()
        request.infer(inputs)
        wall.append(time.perf_counter() - start)
        for info in request.get_profiling_info():  # the last inference's per-node times
            ms = info.real_time.total_seconds() * 1e3
            node_type = "Subgraph:MHA" if info.node_name in mha else info.node_type
            totals["attention" if info.node_name in mha else category(node_type)] += ms
            ops[f"{node_type} ({info.exec_type})"] += ms
    return summary(totals, ops, runs, wall)


def snippet_attention(compiled: Any) -> set[str]:
    """The compiled model's snippet `Subgraph` nodes that hold an attention (MatMul, Softmax, MatMul):
    PERF_COUNT reports them as `Subgraph`, like the fused element-wise chains."""
    names = set()
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        fused = info["originalLayersNames"].astype(str) if "originalLayersNames" in info else ""
        if info["layerType"].astype(str) == "Subgraph" and "Softmax" in fused:
            names.add(op.get_friendly_name())
    return names


def shapes_ab(bundle: Any, variant: str, feeds: dict[str, np.ndarray], rounds: int) -> dict:
    """Interleaved ms per call of the int8-ov block compiled with dynamic vs static input shapes."""
    from ilf_deploy.engines.backends.openvino import core, open_generator

    segments = open_generator(bundle, variant, precision="bf16", cache=False).segments
    config = segments.config_for(SEGMENT)
    shapes = segments.shapes_for(SEGMENT, feeds)
    requests = {}
    for label, chosen in (("dynamic shapes", None), ("static shapes", shapes)):
        compiled = core().compile_model(segments.read_model(SEGMENT, chosen), "CPU", config)
        names = {port.get_any_name() for port in compiled.inputs}
        requests[label] = (compiled.create_infer_request(), {k: v for k, v in feeds.items() if k in names})
        requests[label][0].infer(requests[label][1])  # warm-up
    times: dict[str, list[float]] = {label: [] for label in requests}
    for _ in range(rounds):
        for label, (request, inputs) in requests.items():
            for _ in range(3):
                start = time.perf_counter()
                request.infer(inputs)
                times[label].append((time.perf_counter() - start) * 1e3)
    return {
        label: {
            "median_ms": float(np.median(ms)),
            "p25_ms": float(np.percentile(ms, 25)),
            "p75_ms": float(np.percentile(ms, 75)),
            "calls": len(ms),
        }
        for label, ms in times.items()
    }


def print_ab(ab: dict[str, dict]) -> None:
    base = ab["dynamic shapes"]["median_ms"]
    for label, r in ab.items():
        spread = f"quartiles {r['p25_ms']:.2f}-{r['p75_ms']:.2f}, {r['calls']} calls"
        print(f"  {label:<16} {r['median_ms']:7.2f} ms ({spread}) {base / r['median_ms']:.3f}x")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "int8_profile_ab.json").write_text(
        json.dumps({"machine": fingerprint(), "ab": ab}, indent=2) + "\n"
    )


def summary(totals: dict[str, float], ops: dict[str, float], calls: int, wall: list[float]) -> dict:
    top = sorted(ops.items(), key=lambda kv: -kv[1])[:8]
    return {
        "wall_ms": float(np.median(wall) * 1e3),
        "node_ms": sum(totals.values()) / calls,
        "by_category_ms": {k: v / calls for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
        "top_ops_ms": {k: v / calls for k, v in top},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10, help="profiled calls per engine")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model, bundle and variants")
    parser.add_argument("--ab", type=int, metavar="ROUNDS", help="only the dynamic/static-shape A/B")
    args = parser.parse_args(argv)

    from benchmarks.backbone import Size, block_flops
    from benchmarks.int8_cpu import ensure_variant, prepare
    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.core.runtime.manifest import CROSS_KV_SEGMENT

    size = Size(layers=LAYERS)
    bundle_dir = prepare(OUT / "int8_profile", LAYERS, size.heads, args.rebuild)
    variants = {
        mode: ensure_variant(bundle_dir, mode, 2, args.rebuild) for mode in ("int8-dynamic", "int8-ov")
    }
    bundle = Bundle.load(bundle_dir)
    log("recording the block's inputs")
    feeds = recorded_feeds(bundle)
    start, end = bundle.manifest.segment(SEGMENT).blocks
    caption_kv = CROSS_KV_SEGMENT not in bundle.manifest.segments  # else projected once per image
    flops = block_flops(size, caption_kv=caption_kv) * (end - start + 1)
    if args.ab:
        log(f"A/B: dynamic vs static shapes, {args.ab} rounds")
        print_ab(shapes_ab(bundle, variants["int8-ov"], feeds, args.ab))
        return 0
    engines = {
        "onnxruntime fp32": lambda: ort_profile(bundle, None, feeds, args.runs),
        "onnxruntime int8-dynamic": lambda: ort_profile(bundle, variants["int8-dynamic"], feeds, args.runs),
        "openvino f32": lambda: ov_profile(bundle, None, "f32", feeds, args.runs),
        "openvino bf16": lambda: ov_profile(bundle, None, "bf16", feeds, args.runs),
        "openvino int8-ov +bf16": lambda: ov_profile(bundle, variants["int8-ov"], "bf16", feeds, args.runs),
    }
    results: dict[str, Any] = {}
    for name, run in engines.items():
        log(f"profiling {name}")
        result = run()
        result["block_gflops"] = flops / (result["wall_ms"] / 1e3) / 1e9
        results[name] = result
    machine = fingerprint()
    report = {
        "machine": machine,
        "segment": SEGMENT,
        "size": size.tag,
        "block_gflop": flops / 1e9,
        "engines": results,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "int8_profile.json").write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    return 0


def print_report(report: dict[str, Any]) -> None:
    machine = report["machine"]
    flags = [f for f in machine["flags"] if f.startswith(("avx512", "amx", "avx_vnni"))]
    print(f"\n{report['segment']} ({report['size']}, {report['block_gflop']:.1f} GFLOP per call)")
    print(f"machine: {machine['cpu']}, {machine['cores']} cores; {' '.join(flags)}")
    for name, r in report["engines"].items():
        shares = ", ".join(f"{k} {v / r['node_ms']:.0%}" for k, v in r["by_category_ms"].items())
        print(f"  {name:<26} {r['wall_ms']:7.1f} ms/call {r['block_gflops']:7.0f} GFLOP/s | {shares}")
        for op, ms in r["top_ops_ms"].items():
            print(f"      {op:<48}{ms:8.2f} ms")


if __name__ == "__main__":
    raise SystemExit(main())
