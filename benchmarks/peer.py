"""Peer: diffusers' own PixArtAlphaPipeline vs ilf-deploy on the same model and machine (issue 15).

The user's alternatives are diffusers eager, fp32 and bf16, at the model's usual 20 steps
(`base-20`); ours is ILF-10 on ONNX Runtime fp32 and on `--backend auto` after `ilf-deploy tune`
(the fastest engine x precision within its fidelity budget on this machine). Same model (the
PixArt-XL-2-512x512 transformer config from benchmarks/backbone.py, random weights, tiny T5 and
VAE), 256 px (`use_resolution_binning=False`: without it diffusers renders 512 px when asked for
256), same prompt, seed and guidance (4.5), one image; timed: text encoder + denoising (latents
out, no VAE decode), interleaved in one process (ABAB...), medians. Headline: diffusers' fastest
eager base-20 ÷ ilf-deploy auto ILF-10, target ≥ 3.0x. For the winning engine also the achieved
block GEMM throughput against that dtype's peak measured in the same run (one 2048² linear layer
quantized and run exactly like the winner's variant).

    python -m benchmarks.peer [--quick] [--runs N] [--tune-budget-s S] [--rebuild]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path("out/bench")
TARGET = 3.0
PROMPT = "a lighthouse on a cliff above a stormy sea, oil painting"
SEED, GUIDANCE = 7, 4.5
OURS_PLAN, THEIR_STEPS = "ilf-10", 20


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare(work: Path, quick: bool, rebuild: bool, modes: list[str]) -> tuple[Path, Path, Any]:
    """Model directory, bundle (base-20 + ilf-10 at 256 px, fp32) and its variants; reused."""
    from benchmarks.backbone import QUICK, Size, model_and_bundle
    from ilf_deploy.quantization.calibration import DEFAULT_PROMPTS, collect_calibration
    from ilf_deploy.quantization.quantize import default_variant_name, quantize_bundle
    from ilf_deploy.runtime.bundle import Bundle

    size = QUICK if quick else Size()
    if rebuild:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    model_dir, bundle_dir = model_and_bundle(work, size, ("base-20", OURS_PLAN))
    for mode in modes:
        name = default_variant_name(mode)
        bundle = Bundle.load(bundle_dir, verify_hashes=False)
        if name in bundle.variants:
            continue
        if mode != "int8-dynamic" and bundle.manifest.calibration is None:
            log(f"calibrating on 2 {OURS_PLAN} trajectories")
            collect_calibration(bundle_dir, OURS_PLAN, DEFAULT_PROMPTS[:2], max_samples=8)
        log(f"quantizing: {mode}")
        quantize_bundle(bundle_dir, mode, name)
    return model_dir, bundle_dir, size


def diffusers_runner(model_dir: Path, dtype: Any) -> Callable[[], np.ndarray]:
    import torch
    from diffusers import PixArtAlphaPipeline

    from ilf_deploy.loading import quiet_huggingface

    quiet_huggingface()
    pipe = PixArtAlphaPipeline.from_pretrained(model_dir, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)

    def run() -> np.ndarray:
        with torch.inference_mode():
            latents = pipe(
                PROMPT,
                negative_prompt="",
                num_inference_steps=THEIR_STEPS,
                guidance_scale=GUIDANCE,
                height=256,
                width=256,
                generator=torch.Generator().manual_seed(SEED),
                output_type="latent",
                use_resolution_binning=False,
                clean_caption=False,
                max_sequence_length=120,
            ).images
        return latents.float().numpy()

    return run


def ours_runner(generator: Any, plan: Any) -> Callable[[], np.ndarray]:
    from ilf_deploy.runtime.generator import Request

    request = Request(
        prompt=PROMPT, negative_prompt="", seed=SEED, guidance_scale=GUIDANCE, height=256, width=256
    )

    def run() -> np.ndarray:
        generator.__dict__.pop("_prompt_cache", None)  # the text encoder runs every time, as diffusers'
        return generator.latents_to_numpy(generator.generate_latents(plan, request))

    return run


def linear_peak(
    backend: str, mode: str | None, precision: str = "f32", n: int = 2048, reps: int = 5
) -> float:
    """FLOP/s of one n x n x n linear layer on `backend`, quantized like variant mode `mode` (None:
    fp32): the dtype's achievable peak on this engine, measured in this run."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ilf_deploy.quantization.quantize import quantize_segment

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
            from ilf_deploy.backends.openvino import core

            compiled = core().compile_model(
                core().read_model(str(path)),
                "CPU",
                {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": precision},
            )
            request = compiled.create_infer_request()

            def fn() -> Any:
                return request.infer({0: x})

        else:
            from ilf_deploy.backends.onnxruntime import OrtSession

            session = OrtSession(path, ["CPUExecutionProvider"], None)

            def fn() -> Any:
                return session({"x": x})

        fn()
        best = min(_timed(fn) for _ in range(reps))
    return 2 * n**3 / best


def measure_peaks() -> int:
    """fp32 GEMM (torch/numpy) and the int8 linear layer of each engine's int8 variant, 2048³."""
    import torch

    from benchmarks.backbone import gemm_peak

    peaks = {k: v / 1e9 for k, v in gemm_peak(torch.get_num_threads()).items()}
    for backend, mode in (("onnxruntime", "int8-dynamic"), ("openvino", "int8-ov"), ("openvino", None)):
        with contextlib.suppress(ImportError):
            peaks[f"{backend} {mode or 'f32'}"] = linear_peak(backend, mode) / 1e9
    for name, value in peaks.items():
        print(f"  {name:<28}{value:>8.0f} GFLOP/s")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "peer_peaks.json").write_text(json.dumps({"gflops": peaks}, indent=2) + "\n")
    return 0


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 narrow layers (backbone's QUICK), 2 runs")
    parser.add_argument("--runs", type=int, default=None, help="interleaved measured runs per engine")
    parser.add_argument("--tune-budget-s", type=float, default=None, help="`tune`'s timing budget")
    parser.add_argument("--modes", default="int8-dynamic,int8-ov", help="variants to build before tune")
    parser.add_argument("--no-bf16", action="store_true", help="skip diffusers bf16 (slow without bf16 hw)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model, bundle and variants")
    parser.add_argument("--peaks", action="store_true", help="only measure the GEMM peaks of each dtype")
    args = parser.parse_args(argv)
    if args.peaks:
        return measure_peaks()
    runs = args.runs or (2 if args.quick else 3)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    import torch

    from benchmarks.backbone import block_flops, gemm_peak
    from ilf_deploy.backends import REGISTRY, open_generator
    from ilf_deploy.backends.machine import fingerprint
    from ilf_deploy.compare import metrics
    from ilf_deploy.runtime.bundle import Bundle
    from ilf_deploy.tuning import tune

    if "openvino" in REGISTRY and REGISTRY["openvino"].missing():
        modes = [m for m in modes if m != "int8-ov"]
    work = OUT / "peer" / ("quick" if args.quick else "full")
    model_dir, bundle_dir, size = prepare(work, args.quick, args.rebuild, modes)
    log("ilf-deploy tune")
    budget = args.tune_budget_s or (60.0 if args.quick else 300.0)
    report = tune(bundle_dir, OURS_PLAN, budget_s=budget, progress=log)
    for c in report["candidates"]:
        ms = f"{c['ms_per_step']:.0f} ms/step" if c["ms_per_step"] else "-"
        e2e = [f["metrics"]["rel_l2"] for f in c["fidelity"] if f["kind"] == "end-to-end"]
        status = c["error"] or ("ok" if c["ok"] else "beyond budget")
        print(f"  tune: {c['label']:<26}{ms:>14}  e2e rel L2 {e2e[0] if e2e else 0:.2e}  {status}")

    bundle = Bundle.load(bundle_dir)
    plan = bundle.plan(OURS_PLAN)
    auto = open_generator(bundle_dir, "auto")
    log(auto.choice or "")
    engines: dict[str, Callable[[], np.ndarray]] = {
        "diffusers fp32 base-20": diffusers_runner(model_dir, torch.float32),
    }
    if not args.no_bf16:
        engines["diffusers bf16 base-20"] = diffusers_runner(model_dir, torch.bfloat16)
    engines[f"ilf-deploy onnxruntime fp32 {OURS_PLAN}"] = ours_runner(
        open_generator(bundle_dir, "onnxruntime"), plan
    )
    auto_name = f"ilf-deploy auto ({auto.backend} {auto.variant or 'fp32'}) {OURS_PLAN}"
    engines[auto_name] = ours_runner(auto, plan)

    log(f"warm-up, then {runs} interleaved runs of each engine (text encoder + denoising, one image)")
    outputs = {name: fn() for name, fn in engines.items()}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(runs):
        for name, fn in engines.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            log(f"round {round_ + 1}: {name} {times[name][-1]:.2f} s")
    seconds = {name: statistics.median(v) for name, v in times.items()}
    theirs = [n for n in seconds if n.startswith("diffusers")]
    fastest_theirs = min(theirs, key=seconds.__getitem__)
    ratio = seconds[fastest_theirs] / seconds[auto_name]
    ours_fp32 = f"ilf-deploy onnxruntime fp32 {OURS_PLAN}"

    # Achieved block GEMM throughput of the winner vs its dtype's peak (measured now).
    winner_mode = None
    if auto.variant in bundle.variants:
        winner_mode = bundle.variant_spec(auto.variant).mode
    text_s = statistics.median(auto.segments.timings.get("text_encoder", [0.0])) * 2  # prompt + negative
    denoise_s = max(seconds[auto_name] - text_s, 1e-9)
    achieved = block_flops(size) * plan.block_forwards / denoise_s
    if winner_mode is None and auto.variant is None:
        peak = gemm_peak(torch.get_num_threads())["fp32_peak"]
        peak_kind = "fp32 GEMM (torch/numpy best, 2048³)"
    else:
        precision = "bf16" if auto.variant == "bf16" else "f32"  # OpenVINO's bf16 precision hint
        peak = linear_peak(auto.backend, winner_mode, precision)
        peak_kind = f"{winner_mode or auto.variant} linear 2048³ on {auto.backend}"

    machine = fingerprint()
    result: dict[str, Any] = {
        "model": f"PixArt-XL-2-512 config ({size.tag}), random weights, 256 px, guidance {GUIDANCE}",
        "timed": "text encoder + denoising (latents; no VAE decode), interleaved, median",
        "machine": machine,
        "runs": runs,
        "seconds": seconds,
        "samples_s": times,
        "tune": {"winner": report["winner"], "candidates": report["candidates"]},
        "auto_choice": auto.choice,
        "headline": {
            "fastest_diffusers": fastest_theirs,
            "ours": auto_name,
            "ratio": ratio,
            "target": TARGET,
            "met": ratio >= TARGET,
        },
        "pairs": {
            f"{a} / {b}": seconds[a] / seconds[b] for a in seconds for b in seconds if a != b and a in theirs
        },
        "gemm": {
            "engine": f"{auto.backend} {auto.variant or 'fp32'}",
            "block_flops_per_forward": block_flops(size),
            "block_forwards": plan.block_forwards,
            "text_encoder_s": text_s,
            "achieved_gflops": achieved / 1e9,
            "peak_gflops": peak / 1e9,
            "peak_kind": peak_kind,
            "fraction": achieved / peak,
        },
        "fidelity_vs_ours_fp32": {
            "auto": metrics(outputs[auto_name], outputs[ours_fp32]).to_dict(),
        },
    }
    flags = [f for f in machine["flags"] if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma"))]
    print(f"\nPeer benchmark: {result['model']}")
    print(f"  machine: {machine['cpu']}, {machine['cores']} cores; {' '.join(flags)}")
    print(f"  {'engine':<52}{'s/image':>9}{'vs ' + fastest_theirs:>34}")
    for name, s in seconds.items():
        print(f"  {name:<52}{s:>9.2f}{seconds[fastest_theirs] / s:>33.2f}x")
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"  headline: {fastest_theirs} / {auto_name} = {ratio:.2f}x (target ≥ {TARGET:.1f}x: {verdict})")
    g = result["gemm"]
    print(
        f"  {g['engine']}: blocks at {g['achieved_gflops']:.0f} GFLOP/s effective = {g['fraction']:.0%} of "
        f"{g['peak_gflops']:.0f} GFLOP/s ({peak_kind})"
    )
    OUT.mkdir(parents=True, exist_ok=True)
    name = "peer_quick.json" if args.quick else "peer.json"
    (OUT / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"results → {OUT / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
