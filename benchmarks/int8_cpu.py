"""P4: INT8 on ONNX Runtime CPU vs the fp32 ORT step, end to end, with fidelity, in one run.

The model is PixArt-XL-2's block shape (1152 wide, 16 heads, real caption width) with random
weights and fewer layers (8 by default), at 256 px (256 tokens) and batch 2 (guidance), built by
`benchmarks.backbone.build_model_dir`. Variants are made with
`ilf_deploy.build.quantization.quantize` exactly as
`ilf-deploy quantize` makes them:

- int8-dynamic (the CPU path; target: one full step ≥ 2.0× faster than fp32)
- int8-qdq     (symmetric static Q/DQ, the TensorRT path; timed here only for information)

"One step" is what runtime.loop runs for a plain step: time embedding, patch embedding, every
block, final layer. Times are medians of interleaved runs (the machine is shared). Fidelity: each
variant's final latents over the whole `ilf-10` plan against fp32 (relative L2, cosine, SNR).

    python -m benchmarks.int8_cpu [--quick] [--layers N] [--runs N] [--modes int8-dynamic,int8-qdq]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path("out/bench")
P4_TARGET = 2.0
PLAN = "ilf-10"


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare(work: Path, layers: int, heads: int, rebuild: bool) -> Path:
    """Model directory and fp32 bundle (base-10, ilf-10 at 256 px), reused when present."""
    from benchmarks.backbone import Size, model_and_bundle
    from benchmarks.reuse import reuse_or_clear

    size = Size(layers=layers, heads=heads)
    reuse_or_clear(work, {"layers": layers, "heads": heads}, rebuild)  # anew by other code or sizes
    work.mkdir(parents=True, exist_ok=True)
    return model_and_bundle(work, size, ("base-10", PLAN))[1]


def ensure_variant(bundle_dir: Path, mode: str, prompts: int, requantize: bool) -> str:
    from ilf_deploy.build.quantization.calibration import DEFAULT_PROMPTS, collect_calibration
    from ilf_deploy.build.quantization.quantize import (
        CALIBRATION_FREE_MODES,
        default_variant_name,
        quantize_bundle,
    )
    from ilf_deploy.core.runtime.bundle import Bundle

    name = default_variant_name(mode)
    bundle = Bundle.load(bundle_dir, verify_hashes=False)
    if name in bundle.variants and not requantize:
        return name
    if mode not in CALIBRATION_FREE_MODES and bundle.manifest.calibration is None:
        log(f"calibrating on {prompts} {PLAN} trajectories")
        collect_calibration(bundle_dir, PLAN, DEFAULT_PROMPTS[:prompts], max_samples=8)
    log(f"quantizing: {mode}")
    quantize_bundle(bundle_dir, mode, name)
    return name


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="4 layers, fewer runs")
    parser.add_argument("--layers", type=int, default=None, help="depth (default 8; 28 is the real model)")
    parser.add_argument("--heads", type=int, default=16, help="heads of 72 dims (16 = PixArt-XL-2)")
    parser.add_argument("--runs", type=int, default=None, help="measured step runs per variant")
    parser.add_argument("--modes", default="int8-dynamic,int8-qdq")
    parser.add_argument("--prompts", type=int, default=2, help="calibration trajectories (static modes)")
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model and bundle")
    parser.add_argument("--requantize", action="store_true", help="redo the variants (not calibration)")
    args = parser.parse_args(argv)
    layers = args.layers or (4 if args.quick else 8)
    runs = args.runs or (3 if args.quick else 7)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    from benchmarks.backbone import interleaved, med, step_inputs
    from ilf_deploy.build.quantization.quantize import variant_generator
    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.engines.compare import metrics

    work = OUT / "int8" / f"l{layers}-h{args.heads}"  # --quick does not wipe the default model
    bundle_dir = prepare(work, layers, args.heads, args.rebuild)
    names = {mode: ensure_variant(bundle_dir, mode, args.prompts, args.requantize) for mode in modes}
    bundle = Bundle.load(bundle_dir)
    generators = {"fp32": variant_generator(bundle, None)}
    generators.update({mode: variant_generator(bundle, name) for mode, name in names.items()})

    data = step_inputs(generators["fp32"])
    x, context, t = data["x"], data["context"], 500.0

    def step_fn(generator: Any):
        segs = generator.segments

        def step() -> np.ndarray:  # runtime.loop.model_output for a plain step
            cond = segs.conditioning(t, context)
            state = segs.blocks(0, segs.num_blocks - 1, segs.embed(x, cond), cond)
            return segs.final(state, cond, x.shape[-2], x.shape[-1])

        return step

    steps = {name: step_fn(g) for name, g in generators.items()}
    outputs = {name: fn() for name, fn in steps.items()}  # also the warm-up of every session
    log(f"timing one step, {runs} interleaved runs per variant")
    times = interleaved(steps, runs)
    t32 = med(times["fp32"])
    request = Request(prompt="a lighthouse on a cliff above a stormy sea", seed=3)
    plan = bundle.plan(PLAN)
    log(f"end-to-end {PLAN} latents for fidelity")
    latents = {}
    plan_s = {}
    for name, generator in generators.items():
        start = time.perf_counter()
        latents[name] = generator.generate_latents(plan, request)
        plan_s[name] = time.perf_counter() - start
    result: dict[str, Any] = {
        "model": f"PixArt-XL-2 blocks (random weights), {layers} layers, {args.heads}x72 wide, "
        "256 px, batch 2",
        "runs": runs,
        "step_s": {name: med(v) for name, v in times.items()},
        "step_times_s": times,
        "plan": PLAN,
        "plan_s_single_run": plan_s,
        "variants": {},
        "target": P4_TARGET,
    }
    for mode in modes:
        step = metrics(outputs[mode], outputs["fp32"])
        final = metrics(latents[mode], latents["fp32"])
        result["variants"][mode] = {
            "step_speedup": t32 / med(times[mode]),
            "plan_speedup_single_run": plan_s["fp32"] / plan_s[mode],
            "step_output": step.to_dict(),
            "final_latents": final.to_dict(),
        }
    if "int8-dynamic" in modes:
        result["p4_speedup"] = result["variants"]["int8-dynamic"]["step_speedup"]
        result["met"] = result["p4_speedup"] >= P4_TARGET
    print(f"\nP4  INT8 on ORT CPU vs fp32 ORT, one step ({result['model']}); median of {runs}")
    print(
        f"  {'variant':<14}{'step ms':>9}{'speedup':>9}{'step rel L2':>13}{'latents rel L2':>16}{'cosine':>9}"
    )
    print(f"  {'fp32':<14}{t32 * 1000:>9.0f}{1.0:>8.2f}x")
    for mode, v in result["variants"].items():
        print(
            f"  {mode:<14}{result['step_s'][mode] * 1000:>9.0f}{v['step_speedup']:>8.2f}x"
            f"{v['step_output']['rel_l2']:>13.4f}{v['final_latents']['rel_l2']:>16.4f}"
            f"{v['final_latents']['cosine']:>9.5f}"
        )
    if "met" in result:
        verdict = "met" if result["met"] else "NOT met"
        print(f"  P4 target ≥ {P4_TARGET:.1f}x (int8-dynamic): {result['p4_speedup']:.2f}x, {verdict}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "int8_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    log(f"results → {OUT / 'int8_cpu.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
