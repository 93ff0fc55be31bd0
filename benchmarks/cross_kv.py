"""The caption's K/V once per image (`cross_kv` segment) against in every block forward, end to end.

    python -m benchmarks.cross_kv [--rounds 6] [--resolution 256] [--quick] [--prepare-only] [--no-fp32]
    python -m benchmarks.cross_kv --segment-rounds 20 [--text-tokens 300]   # one block segment only

One PixArt-XL-2 model (the peer benchmark's config, random weights), two bundles of it (`build`,
and `build --no-cache-cross-kv`), each calibrated and quantized `int8-ov` (whose `quantize` checks
the end-to-end budget), prepared one stage per process (benchmarks/stages.py) in
out/bench/cross_kv/. Then ILF-10 images (text encoder + denoising, the peer's prompt, seed and
guidance) on OpenVINO int8_ov with the bf16 hint (what `auto` runs on a CPU with 8-bit dot products
and bf16) and on ONNX Runtime fp32, both bundles interleaved, medians; the final latents' rel. L2
between the two bundles on each engine. Writes out/bench/cross_kv.json. CPU flags recorded.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peer import OURS_PLAN, OUT, interleave, log, ours_runner

BUNDLES = {"cross_kv": {}, "every block": {"cache_cross_kv": False}}  # name -> build options


def prepare(work: Path, quick: bool, resolution: int) -> dict[str, Path]:
    from benchmarks import stages

    paths = {}
    for name, options in BUNDLES.items():
        bundle_name = "bundle" if not options else "bundle-uncached"
        _, paths[name] = stages.prepare(
            work, "benchmarks.peer:write_model", {"quick": quick}, ("base-20", OURS_PLAN), resolution,
            ["int8-ov"], OURS_PLAN, bundle_name=bundle_name, build_options=options,
        )  # fmt: skip
    return paths


def engines(paths: dict[str, Path], resolution: int, fp32: bool = True) -> dict[str, Any]:
    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.engines.backends import open_generator
    from ilf_deploy.engines.backends.openvino import cpu_has_bf16

    runners = {}
    precision = "bf16" if cpu_has_bf16() else "f32"
    for name, path in paths.items():
        plan = Bundle.load(path).plan(OURS_PLAN)
        ov = open_generator(path, "openvino", variant="int8_ov", precision=precision)
        runners[f"openvino int8_ov +{precision}, {name}"] = ours_runner(ov, plan, resolution)
        if fp32:
            ort = open_generator(path, "onnxruntime")
            runners[f"onnxruntime fp32, {name}"] = ours_runner(ort, plan, resolution)
    return runners


def with_text_tokens(feeds: dict[str, np.ndarray], spec: Any, tokens: int | None) -> dict[str, np.ndarray]:
    """`feeds` with every `text_tokens` axis (the segment's declared dims) repeated to `tokens`
    long: a longer caption's shapes (PixArt-Σ, Sana: 300) from a 120-token trajectory."""
    if tokens is None:
        return feeds
    out = dict(feeds)
    for tensor in spec.inputs:
        if "text_tokens" in tensor.shape:
            axis = tensor.shape.index("text_tokens")
            reps = -(-tokens // feeds[tensor.name].shape[axis])
            out[tensor.name] = np.repeat(feeds[tensor.name], reps, axis=axis).take(range(tokens), axis=axis)
    return out


def segment_ab(
    paths: dict[str, Path], rounds: int, segment: str = "blocks_08_19", text_tokens: int | None = None
) -> dict[str, float]:
    """Ms per call of one block segment of each bundle's int8_ov variant (OpenVINO, bf16 hint,
    compiled for its calibration feeds' static shapes, as `OvSegments` compiles it), interleaved:
    the blocks' own cost, apart from the text encoder, the other segments and `cross_kv`;
    `text_tokens`: the caption axis repeated to that length."""
    from benchmarks.backbone import interleaved
    from experiments.int8_attention import compiled
    from ilf_deploy.build.quantization.calibration import load_calibration
    from ilf_deploy.core.runtime.bundle import Bundle

    calls = {}
    for name, path in paths.items():
        bundle = Bundle.load(path)
        spec = bundle.segment_spec(segment, "int8_ov")
        feeds = with_text_tokens(load_calibration(bundle, segment)[0], spec, text_tokens)
        request = compiled(bundle.path / spec.file, {k: v.shape for k, v in feeds.items()}, "bf16")
        calls[name] = lambda request=request, feeds=feeds: request.infer(feeds)
    times = interleaved(calls, rounds, warmup=2)
    return {name: 1e3 * statistics.median(samples) for name, samples in times.items()}


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the peer's quick model (8 narrow layers)")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds (one image each)")
    parser.add_argument("--resolution", type=int, default=256, help="image side in pixels")
    parser.add_argument("--prepare-only", action="store_true", help="make the bundles, time nothing")
    parser.add_argument("--text-tokens", type=int, help="--segment-rounds with a caption this long")
    parser.add_argument("--no-fp32", action="store_true", help="only OpenVINO int8_ov (no ORT fp32)")
    parser.add_argument(
        "--segment-rounds", type=int, metavar="N", help="only time one int8_ov block segment, N rounds"
    )
    args = parser.parse_args(argv)

    from ilf_deploy.engines.backends.machine import fingerprint

    work = OUT / "cross_kv" / (("quick" if args.quick else "full") + f"-{args.resolution}")
    paths = prepare(work, args.quick, args.resolution)
    if args.prepare_only:
        return 0
    if args.segment_rounds:
        ms = segment_ab(paths, args.segment_rounds, text_tokens=args.text_tokens)
        for name, value in ms.items():
            print(f"  blocks_08_19 int8_ov +bf16, {name:<12} {value:7.2f} ms/call (12 blocks)")
        print(f"  cross_kv: {ms['every block'] / ms['cross_kv']:.3f}x per block segment call")
        report = {"machine": fingerprint(), "text_tokens": args.text_tokens, "ms_per_call": ms}
        (OUT / "cross_kv_segment.json").write_text(json.dumps(report, indent=2) + "\n")
        return 0
    runners = engines(paths, args.resolution, fp32=not args.no_fp32)
    log(f"warm-up, then {args.rounds} interleaved rounds of each (text encoder + denoising, one image)")
    outputs, times, _ = interleave(runners, args.rounds)
    seconds = {name: statistics.median(samples) for name, samples in times.items()}
    pairs = {}
    for engine in sorted({name.split()[0] for name in runners}):
        cached, plain = (next(n for n in runners if n.startswith(engine) and n.endswith(b)) for b in BUNDLES)
        pairs[engine] = {
            "speed-up": seconds[plain] / seconds[cached],
            "rel_l2_between_bundles": rel_l2(outputs[cached], outputs[plain]),
        }
    for name, value in seconds.items():
        print(f"  {name:<44} {value:7.2f} s/image")
    for engine, pair in pairs.items():
        speedup, distance = pair["speed-up"], pair["rel_l2_between_bundles"]
        print(f"  {engine}: cross_kv {speedup:.3f}x, latents rel. L2 between the bundles {distance:.2e}")
    report = {"machine": fingerprint(), "resolution": args.resolution, "rounds": args.rounds,
              "samples_s": times, "seconds": seconds, "pairs": pairs}  # fmt: skip
    out = OUT / "cross_kv.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    log(f"→ {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
