"""GEMM peaks that mean something (issue 23, item 5): each dtype's 2048³ ceiling measured the way an
engine runs it, and every `tune` candidate's block throughput against the peak of its dtype.

Peaks, measured in the same run as what they judge:
- fp32: torch `mm` (oneDNN/MKL) and numpy, the best of both; ONNX Runtime and OpenVINO f32 on one
  2048² linear layer (the way their fp32 candidates run a block's matmuls);
- bf16: torch's `linear` on bfloat16 (oneDNN: AVX512_BF16 or AMX tiles where the CPU has them; what
  torch bf16, eager or compiled, runs) and OpenVINO's linear layer under the bf16 precision hint
  (which OpenVINO runs in f32 on a CPU without bf16: that peak then counts as fp32);
- int8: the same linear layer quantized like each int8 variant mode (quantize.quantize_segment)
  and run on its engine: `int8-ov` on OpenVINO (VNNI or AMX-INT8), `int8-dynamic` on ONNX Runtime.

A candidate's block throughput is the blocks' analytic matmul FLOPs (backbone.block_flops: those
the bundle's blocks do, without the caption K/V of a `cross_kv` bundle) times the block forwards of
one timed step, over tune's measured ms/step: a lower bound (the step also runs the timestep,
embedding and final segments), reported against its own engine's peak and the
best peak of its dtype.

    python -m benchmarks.peaks [--quick]   # the peaks alone (also `python -m benchmarks.peer --peaks`)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path("out/bench")
N = 2048


def _best(fn: Callable[[], Any], reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def torch_peaks(n: int = N, reps: int = 5) -> dict[str, float]:
    """FLOP/s of an n³ GEMM: torch fp32, numpy fp32, torch bf16 (oneDNN): backbone's measurement."""
    from benchmarks.backbone import gemm_peak

    peak = gemm_peak(0, n, reps)
    return {
        "torch fp32": peak["torch_fp32"],
        "numpy fp32": peak["numpy_fp32"],
        "torch bf16": peak["torch_bf16"],
    }


def linear_peak(backend: str, mode: str | None, precision: str = "f32", n: int = N, reps: int = 5) -> float:
    """FLOP/s of one n x n x n linear layer on `backend` (onnxruntime, openvino), quantized like
    variant mode `mode` (None: fp32) and compiled with OpenVINO precision hint `precision`."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ilf_deploy.build.quantization.quantize import quantize_segment

    rng = np.random.default_rng(0)
    weight = (rng.standard_normal((n, n)) / np.sqrt(n)).astype(np.float32)
    # named like an exported linear layer; the Identity keeps OpenVINO from naming the MatMul "y"
    name = "/blocks.0/ff/net.2/MatMul"
    nodes = [
        helper.make_node("MatMul", ["x", "w"], [f"{name}_output_0"], name=name),
        helper.make_node("Identity", [f"{name}_output_0"], ["y"], name="/out/Identity"),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, n])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [n, n])],
        [numpy_helper.from_array(weight, "w")],
    )
    x = rng.standard_normal((n, n), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "linear.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
        path = source
        if mode is not None:
            path = Path(tmp) / ("q.xml" if mode == "int8-ov" else "q.onnx")
            quantize_segment(source, path, mode, [{"x": x}, {"x": x * 0.5}])
        if backend == "openvino":
            from ilf_deploy.engines.backends.openvino import core

            config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision}
            request = core().compile_model(core().read_model(str(path)), "CPU", config).create_infer_request()

            def fn() -> Any:
                return request.infer({0: x})

        else:
            from ilf_deploy.engines.backends.onnxruntime import OrtSession

            session = OrtSession(path, ["CPUExecutionProvider"], None)

            def fn() -> Any:
                return session({"x": x})

        return 2 * n**3 / _best(fn, reps)


def dtype_of(mode: str | None) -> str:
    """The arithmetic a candidate's block matmuls run in: fp32, bf16, int8 or fp8."""
    mode = mode or "fp32"
    return mode.split("-")[0] if mode.startswith(("int8", "fp8")) else mode


def engine_peak_key(backend: str, mode: str | None) -> str:
    """Which measured peak is `backend` running `mode` (None, bf16, a variant mode)'s own ceiling."""
    if backend == "torch":
        return f"torch {mode or 'fp32'}"
    if mode in (None, "fp32"):
        return f"{backend} f32"
    return f"{backend} {mode}"


def measure_engine_peak(key: str, n: int, reps: int) -> float | None:
    """The peak named by `engine_peak_key` (None: that engine is not installed or cannot run it)."""
    backend, mode = key.split(" ", 1)
    if backend == "torch":
        return None  # torch_peaks has them
    precision = "bf16" if mode == "bf16" else "f32"
    variant_mode = None if mode in ("f32", "bf16") else mode
    with contextlib.suppress(ImportError, RuntimeError, ValueError):
        return linear_peak(backend, variant_mode, precision, n, reps)
    return None


def arithmetic(key: str) -> str:
    """The dtype a measured peak (`engine_peak_key`) really runs in: OpenVINO ignores its bf16 hint
    on a CPU without bf16 (f32 kernels), which made an f32 figure the "best bf16" there."""
    from ilf_deploy.engines.backends.machine import cpu_has_bf16

    backend, mode = key.split(" ", 1)
    dtype = dtype_of("fp32" if mode == "f32" else mode)
    return "fp32" if dtype == "bf16" and backend == "openvino" and not cpu_has_bf16() else dtype


def measure_peaks(keys: list[str], n: int = N, reps: int = 5) -> dict[str, float]:
    """FLOP/s of torch's GEMMs and of every engine peak in `keys`, plus each dtype's best
    ("best fp32", "best bf16", "best int8")."""
    peaks = torch_peaks(n, reps)
    for key in dict.fromkeys(keys):
        if key not in peaks:
            value = measure_engine_peak(key, n, reps)
            if value is not None:
                peaks[key] = value
    by_dtype: dict[str, list[float]] = {}
    for key, value in peaks.items():
        by_dtype.setdefault(arithmetic(key), []).append(value)
    return {**peaks, **{f"best {dtype}": max(values) for dtype, values in by_dtype.items()}}


def candidate_mode(candidate: dict[str, Any], modes: dict[str, str]) -> str | None:
    """A tune candidate's precision: a bundle variant's mode, OpenVINO's bf16, torch's dtype."""
    variant = candidate.get("variant")
    if variant is not None:
        return modes.get(variant, variant)
    return (candidate.get("options") or {}).get("dtype")


def candidate_throughput(
    candidates: list[dict[str, Any]], flops_per_step: float, peaks: dict[str, float], modes: dict[str, str]
) -> list[dict[str, Any]]:
    """Every timed candidate's block GFLOP/s (blocks' matmul FLOPs of one step / its ms per step)
    against its engine's peak and its dtype's best peak (`peaks`, FLOP/s)."""
    rows = []
    for c in candidates:
        if not c.get("ms_per_step"):
            continue
        mode = candidate_mode(c, modes)
        achieved = flops_per_step / (c["ms_per_step"] / 1000)
        own = peaks.get(engine_peak_key(c["backend"], mode))
        best = peaks.get(f"best {dtype_of(mode)}")
        rows.append(
            {
                "label": c["label"],
                "ok": c.get("ok"),
                "dtype": dtype_of(mode),
                "block_gflops": achieved / 1e9,
                "engine_peak_gflops": own / 1e9 if own else None,
                "of_engine_peak": achieved / own if own else None,
                "dtype_peak_gflops": best / 1e9 if best else None,
                "of_dtype_peak": achieved / best if best else None,
            }
        )
    return rows


def peak_keys(candidates: list[dict[str, Any]], modes: dict[str, str]) -> list[str]:
    """The engine peaks the candidates need (and int8 on both engines, fp32 on ORT, always)."""
    keys = [engine_peak_key(c["backend"], candidate_mode(c, modes)) for c in candidates]
    return [*keys, "onnxruntime f32", "onnxruntime int8-dynamic", "openvino int8-ov", "openvino bf16"]


def print_peaks(peaks: dict[str, float]) -> None:
    for name, value in peaks.items():
        print(f"  peak {name:<28}{value / 1e9:>8.0f} GFLOP/s")


def print_throughput(rows: list[dict[str, Any]]) -> None:
    def pct(value: float | None) -> str:
        return f"{value:.0%}" if value is not None else "-"

    print(
        f"  {'candidate (tune)':<32}{'dtype':>6}{'block GFLOP/s':>15}"
        f"{'of engine peak':>16}{'of dtype peak':>15}"
    )
    for r in rows:
        flag = "" if r["ok"] else "  (beyond budget)"
        print(
            f"  {r['label']:<32}{r['dtype']:>6}{r['block_gflops']:>15.0f}"
            f"{pct(r['of_engine_peak']):>16}{pct(r['of_dtype_peak']):>15}{flag}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024³ and 2 repetitions")
    args = parser.parse_args(argv)
    n, reps = (1024, 2) if args.quick else (N, 5)
    keys = [
        "onnxruntime f32",
        "openvino f32",
        "openvino bf16",
        "onnxruntime int8-dynamic",
        "openvino int8-ov",
    ]
    peaks = measure_peaks(keys, n, reps)
    print_peaks(peaks)
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / ("peaks_quick.json" if args.quick else "peaks.json")
    path.write_text(json.dumps({"n": n, "gflops": {k: v / 1e9 for k, v in peaks.items()}}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
