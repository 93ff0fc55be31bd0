"""Peer: diffusers' own PixArtAlphaPipeline vs ilf-deploy on the same model and machine (issue 15).

The user's alternatives are diffusers eager, fp32 and bf16, and bf16 with `torch.compile` on its
transformer (what a diligent user does), at the model's usual 20 steps (`base-20`); ours is ILF-10
on ONNX Runtime fp32 and on `--backend auto` after `ilf-deploy tune` (the fastest engine x precision
x compiled within its fidelity budget on this machine). Same model (the PixArt-XL-2-512x512
transformer config from benchmarks/backbone.py, random weights, tiny T5 and VAE), 256 px (or
`--resolution 512`: 1024 tokens, the paper's setting; in `out/bench/peer/full-512`, `peer_512.json`)
(`use_resolution_binning=False`: without it diffusers renders 512 px when asked for 256), same
prompt, seed and guidance (4.5), one image; timed: text encoder + denoising (latents out, no VAE
decode), interleaved in one process (ABAB...; the compiled engines compile in the warm-up, whose
seconds are kept), medians. Headlines: diffusers' fastest eager base-20 ÷ ilf-deploy auto ILF-10,
target ≥ 3.0x, and diffusers bf16 + torch.compile base-20 ÷ auto ILF-10, target ≥ 2.0x. Then every
tune candidate's block throughput against the peak of its dtype, measured in the same run the way
its engine runs a linear layer (benchmarks/peaks.py).

    python -m benchmarks.peer [--quick] [--runs N] [--tune-budget-s S] [--rebuild] [--no-compile]
                              [--resolution 256|512]
    python -m benchmarks.peer --family sd3|flux [...]   # SD3 and Flux: benchmarks/peer_mmdit.py
    python -m benchmarks.peer --family sana [...]       # Sana: benchmarks/peer_sana.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path("out/bench")
TARGET = 3.0  # vs diffusers' fastest eager base-20
TARGET_COMPILED = 2.0  # vs diffusers bf16 + torch.compile base-20
PROMPT = "a lighthouse on a cliff above a stormy sea, oil painting"
SEED, GUIDANCE = 7, 4.5
OURS_PLAN, THEIR_STEPS = "ilf-10", 20
# The hardware's limit assumes blocks at this share of the best int8 GEMM peak measured in the run.
LIMIT_PEAK_SHARE = 0.85
# `tune --budget-s` for every family (--tune-budget-s overrides): it bounds the whole command, and at
# 120 s on the 2-core EPYC it checked only ONNX Runtime's two candidates (~1 min each), so `auto`
# missed OpenVINO; 900 s checks all ten on the PixArt-XL config there at 256 tokens. A check runs
# the whole plan, so it scales with the tokens: at 1024 (512 px) 900 s checked three.
TUNE_BUDGET_S, TUNE_BUDGET_QUICK_S = 900.0, 60.0


def tune_budget(given: float | None, quick: bool, tokens: int = 256) -> float:
    return given or (TUNE_BUDGET_QUICK_S if quick else TUNE_BUDGET_S * max(1.0, tokens / 256))


def tune_filter(backends: str | None, no_compile: bool) -> Callable[[Any], bool] | None:
    """`tune`'s candidates: `--tune-backends` only (the reference always runs), eager only with
    `--no-compile`. Leaving engines out can only make ours slower."""
    from ilf_deploy.checks.tuning import only_backends

    keep = only_backends([b.strip() for b in backends.split(",") if b.strip()]) if backends else None
    if keep is None and not no_compile:
        return None
    return lambda c: (keep is None or keep(c)) and not (no_compile and c.options.get("compile"))


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def prepare(
    work: Path, quick: bool, rebuild: bool, modes: list[str], resolution: int
) -> tuple[Path, Path, Any]:
    """Model directory, bundle (base-20 + ilf-10 at `resolution` px, fp32, with its torch model for tune's
    torch candidates, eager and compiled) and its variants, one stage per process
    (benchmarks/stages.py); reused."""
    from benchmarks import stages
    from benchmarks.backbone import QUICK, Size

    model_dir, bundle_dir = stages.prepare(
        work, "benchmarks.peer:write_model", {"quick": quick}, ("base-20", OURS_PLAN), resolution, modes,
        OURS_PLAN, rebuild,
    )  # fmt: skip
    return model_dir, bundle_dir, QUICK if quick else Size()


def write_model(out: Path, quick: bool) -> None:
    """The model directory stage (benchmarks/stages.py): the backbone's PixArt-XL-2 config."""
    from benchmarks.backbone import QUICK, Size, build_model_dir

    build_model_dir(out, QUICK if quick else Size())


def diffusers_runner(
    model_dir: Path, dtype: Any, resolution: int, compile: bool = False
) -> Callable[[], np.ndarray]:
    """diffusers' pipeline in `dtype` at `resolution` px; `compile`: its transformer under
    `torch.compile` (Inductor, default mode), as diffusers' docs suggest (max-autotune takes far
    longer to compile on a CPU).
    It compiles on the first call, the warm-up."""
    import torch
    from diffusers import PixArtAlphaPipeline

    from ilf_deploy.model.loading import quiet_huggingface

    quiet_huggingface()
    pipe = PixArtAlphaPipeline.from_pretrained(model_dir, torch_dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if compile:
        pipe.transformer = torch.compile(pipe.transformer)

    def run() -> np.ndarray:
        with torch.inference_mode():
            latents = pipe(
                PROMPT,
                negative_prompt="",
                num_inference_steps=THEIR_STEPS,
                guidance_scale=GUIDANCE,
                height=resolution,
                width=resolution,
                generator=torch.Generator().manual_seed(SEED),
                output_type="latent",
                use_resolution_binning=False,
                clean_caption=False,
                max_sequence_length=120,
            ).images
        return latents.float().numpy()

    return run


def ours_runner(generator: Any, plan: Any, resolution: int) -> Callable[[], np.ndarray]:
    from ilf_deploy.core.runtime.generator import Request

    request = Request(
        prompt=PROMPT,
        negative_prompt="",
        seed=SEED,
        guidance_scale=GUIDANCE,
        height=resolution,
        width=resolution,
    )

    def run() -> np.ndarray:
        generator.__dict__.pop("_prompt_cache", None)  # the text encoder runs every time, as diffusers'
        return generator.latents_to_numpy(generator.generate_latents(plan, request))

    return run


def measure_peaks() -> int:
    """Every dtype's GEMM peak, the way each engine runs it (benchmarks/peaks.py)."""
    from benchmarks import peaks

    return peaks.main([])


def interleave(engines: dict[str, Callable[[], np.ndarray]], runs: int) -> tuple[dict, dict, dict]:
    """One warm-up call of each engine (torch.compile compiles there: its seconds are kept), then
    `runs` interleaved rounds; returns (outputs, samples in s, warm-up s) by engine."""
    outputs, warmup = {}, {}
    for name, fn in engines.items():
        start = time.perf_counter()
        outputs[name] = fn()
        warmup[name] = time.perf_counter() - start
        log(f"warm-up: {name} {warmup[name]:.1f} s")
    times: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(runs):
        for name, fn in engines.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            log(f"round {round_ + 1}: {name} {times[name][-1]:.2f} s")
    return outputs, times, warmup


def image_tokens(resolution: int) -> int:
    """Image tokens at `resolution` px: the VAE's 8x down, then 2x2 patches."""
    return (resolution // 16) ** 2


def block_peaks(report: dict[str, Any], bundle: Any, size: Any, quick: bool, tokens: int) -> dict[str, Any]:
    """Every tune candidate's block throughput against the peak of its dtype (benchmarks/peaks.py),
    the peaks measured now, the way each engine runs its matmuls."""
    from benchmarks import peaks
    from benchmarks.backbone import block_flops
    from ilf_deploy.checks.tuning import timing_plan
    from ilf_deploy.core.runtime.manifest import CROSS_KV_SEGMENT

    timed = timing_plan(bundle.plan(report["plan"]))
    # the work our blocks do: a `cross_kv` bundle projects the caption's K/V once per image instead
    caption_kv = CROSS_KV_SEGMENT not in bundle.manifest.segments
    flops_per_step = (
        block_flops(size, tokens=tokens, caption_kv=caption_kv) * timed.block_forwards / timed.num_steps
    )
    modes = {name: spec.mode for name, spec in bundle.manifest.variants.items()}
    n, reps = (1024, 2) if quick else (peaks.N, 5)
    measured = peaks.measure_peaks(peaks.peak_keys(report["candidates"], modes), n, reps)
    rows = peaks.candidate_throughput(report["candidates"], flops_per_step, measured, modes)
    return {
        "n": n,
        "block_gflop_per_step": flops_per_step / 1e9,
        "peaks_gflops": {k: v / 1e9 for k, v in measured.items()},
        "candidates": rows,
    }


def hardware_limit(
    gemm: dict[str, Any], size: Any, tokens: int, ours_forwards: int, theirs_seconds: float, ratio: float
) -> dict[str, Any] | None:
    """The speed-up over diffusers that this machine allows, and how much of it we reach (one number):
    the plan's fewer block forwards x blocks at LIMIT_PEAK_SHARE of the best int8 peak measured now,
    over diffusers' achieved block throughput. That throughput is its blocks' FLOPs (THEIR_STEPS
    forwards of every block, CFG batch 2) over its whole time, text encoder included: a lower bound,
    so the limit is an upper bound. Ours is counted the same way (its plan's block forwards over its
    whole time, each a diffusers block's FLOPs: with a `cross_kv` segment our blocks do ~6 % less at
    256 px, so this is the work done for diffusers' result, not our matmul rate): `tune`'s per-step
    figure times a few steps with up to ten engines open at once."""
    from benchmarks.backbone import block_flops

    best_int8 = gemm["peaks_gflops"].get("best int8")
    if not best_int8:
        return None
    theirs_forwards = THEIR_STEPS * size.layers
    gflop = block_flops(size, tokens=tokens) / 1e9
    theirs_gflops = gflop * theirs_forwards / theirs_seconds
    forwards_ratio = theirs_forwards / ours_forwards
    limit = forwards_ratio * LIMIT_PEAK_SHARE * best_int8 / theirs_gflops
    ours_gflops = gflop * ours_forwards / (theirs_seconds / ratio)
    return {
        "block_forwards_ratio": forwards_ratio,
        "best_int8_peak_gflops": best_int8,
        "peak_share": LIMIT_PEAK_SHARE,
        "diffusers_block_gflops": theirs_gflops,
        "limit": limit,
        "of_limit": ratio / limit,
        "ours_block_gflops": ours_gflops,
        "ours_of_best_int8": ours_gflops / best_int8,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 narrow layers (backbone's QUICK), 2 runs")
    parser.add_argument("--runs", type=int, default=None, help="interleaved measured runs per engine")
    parser.add_argument(
        "--tune-budget-s",
        type=float,
        default=None,
        help=f"`tune`'s budget for the whole tune (default {TUNE_BUDGET_S:.0f} s, 4x at --resolution 512; "
        f"{TUNE_BUDGET_QUICK_S:.0f} with --quick)",
    )
    parser.add_argument(
        "--tune-backends",
        default=None,
        help="`tune --backends`: only these engines besides the reference (e.g. openvino: at 512 px "
        "each check takes ~4 min on 2 cores); default: every installed one",
    )
    parser.add_argument("--modes", default="int8-dynamic,int8-ov", help="variants to build before tune")
    parser.add_argument(
        "--resolution",
        type=int,
        choices=(256, 512),
        default=256,
        help="pixart: image size (256: 256 tokens; 512: 1024, the paper's); 512 in out/bench/peer/*-512",
    )
    parser.add_argument("--no-bf16", action="store_true", help="skip diffusers bf16 (slow without bf16 hw)")
    parser.add_argument(
        "--no-compile", action="store_true", help="skip torch.compile: diffusers' and tune's compiled torch"
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model, bundle and variants")
    parser.add_argument("--peaks", action="store_true", help="only measure the GEMM peaks of each dtype")
    parser.add_argument(
        "--prepare-only", action="store_true", help="prepare the model, bundle and variants, then stop"
    )
    parser.add_argument(
        "--family",
        choices=("pixart", "sd3", "flux", "sana"),
        default="pixart",
        help="sd3, flux: benchmarks/peer_mmdit.py; sana: benchmarks/peer_sana.py",
    )
    parser.add_argument("--steps", type=int, default=10, help="sd3, flux, sana: base-N, ilf-N, cache-N")
    parser.add_argument("--flux-depth", default="2,4", help="flux: double,single blocks (Flux.1 has 19,38)")
    parser.add_argument("--sd3-depth", type=int, default=24, help="sd3: joint blocks (SD3-medium has 24)")
    parser.add_argument("--sana-depth", type=int, default=28, help="sana: blocks (Sana-600M has 28)")
    parser.add_argument("--no-fp32", action="store_true", help="sd3, flux, sana: skip diffusers fp32")
    args = parser.parse_args(argv)
    if args.peaks:
        return measure_peaks()
    if args.family != "pixart" and args.resolution != 256:
        parser.error("--resolution is the PixArt comparison's; each other family has its own fixed size")
    if args.family == "sana":
        from benchmarks import peer_sana

        return peer_sana.main(args)
    if args.family != "pixart":
        from benchmarks import peer_mmdit

        return peer_mmdit.main(args)
    runs = args.runs or (2 if args.quick else 3)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]

    import torch

    from benchmarks.reuse import made_by
    from ilf_deploy.checks.tuning import tune
    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.engines.backends import open_generator
    from ilf_deploy.engines.backends.machine import fingerprint
    from ilf_deploy.engines.compare import metrics

    tokens = image_tokens(args.resolution)
    suffix = "" if args.resolution == 256 else f"-{args.resolution}"  # 256: the directories of before
    work = OUT / "peer" / (("quick" if args.quick else "full") + suffix)
    # Each stage in a child process (benchmarks/stages.py): this one stays fresh for timing torch.
    model_dir, bundle_dir, size = prepare(work, args.quick, args.rebuild, modes, args.resolution)
    if args.prepare_only:
        return 0
    log("ilf-deploy tune")
    budget = tune_budget(args.tune_budget_s, args.quick, tokens)
    include = tune_filter(args.tune_backends, args.no_compile)
    report = tune(bundle_dir, OURS_PLAN, budget_s=budget, progress=log, include=include)
    for c in report["candidates"]:
        ms = f"{c['ms_per_step']:.0f} ms/step" if c["ms_per_step"] else "-"
        e2e = [f["metrics"]["rel_l2"] for f in c["fidelity"] if f["kind"] == "end-to-end"]
        status = c["error"] or ("ok" if c["ok"] else "beyond budget")
        print(f"  tune: {c['label']:<26}{ms:>14}  e2e rel L2 {e2e[0] if e2e else 0:.2e}  {status}")

    bundle = Bundle.load(bundle_dir)
    plan = bundle.plan(OURS_PLAN)
    auto = open_generator(bundle_dir, "auto")
    log(auto.choice or "")
    eager_bf16, compiled_bf16 = "diffusers bf16 base-20", "diffusers bf16 + torch.compile base-20"
    engines: dict[str, Callable[[], np.ndarray]] = {
        "diffusers fp32 base-20": diffusers_runner(model_dir, torch.float32, args.resolution),
    }
    if not args.no_bf16:
        engines[eager_bf16] = diffusers_runner(model_dir, torch.bfloat16, args.resolution)
        if not args.no_compile:
            engines[compiled_bf16] = diffusers_runner(
                model_dir, torch.bfloat16, args.resolution, compile=True
            )
    ours_fp32 = f"ilf-deploy onnxruntime fp32 {OURS_PLAN}"
    engines[ours_fp32] = ours_runner(open_generator(bundle_dir, "onnxruntime"), plan, args.resolution)
    auto_name = f"ilf-deploy auto ({auto.choice.split('(')[0].removeprefix('auto: ').strip()}) {OURS_PLAN}"
    engines[auto_name] = ours_runner(auto, plan, args.resolution)

    log(f"warm-up, then {runs} interleaved runs of each engine (text encoder + denoising, one image)")
    outputs, times, warmup = interleave(engines, runs)
    seconds = {name: statistics.median(v) for name, v in times.items()}
    theirs = [n for n in seconds if n.startswith("diffusers")]
    eager_theirs = [n for n in theirs if n != compiled_bf16]
    fastest_theirs = min(eager_theirs, key=seconds.__getitem__)
    ratio = seconds[fastest_theirs] / seconds[auto_name]
    ratios = {f"vs {fastest_theirs} (eager)": ratio}
    if compiled_bf16 in seconds:
        ratios[f"vs {compiled_bf16}"] = seconds[compiled_bf16] / seconds[auto_name]
    targets = {f"vs {fastest_theirs} (eager)": TARGET, f"vs {compiled_bf16}": TARGET_COMPILED}
    log("block throughput of every tune candidate against its dtype's peak")
    gemm = block_peaks(report, bundle, size, args.quick, tokens)

    limit = hardware_limit(gemm, size, tokens, plan.block_forwards, seconds[fastest_theirs], ratio)
    machine = fingerprint()
    result: dict[str, Any] = {
        "model": f"PixArt-XL-2-512 config ({size.tag}), random weights, {args.resolution} px "
        f"({tokens} tokens), guidance {GUIDANCE}",
        "timed": "text encoder + denoising (latents; no VAE decode), interleaved, median",
        "machine": machine,
        "code": made_by(bundle_dir),  # what built the bundle measured
        "runs": runs,
        "seconds": seconds,
        "samples_s": times,
        "warmup_s": warmup,  # the compiled engines' compile time is in theirs
        "tune": {"winner": report["winner"], "candidates": report["candidates"]},
        "auto_choice": auto.choice,
        "headline": {
            "fastest_diffusers": fastest_theirs,
            "ours": auto_name,
            "ratio": ratio,
            "target": TARGET,
            "met": ratio >= TARGET,
            "ratios": {
                k: {"ratio": v, "target": targets[k], "met": v >= targets[k]} for k, v in ratios.items()
            },
        },
        "pairs": {
            f"{a} / {b}": seconds[a] / seconds[b] for a in seconds for b in seconds if a != b and a in theirs
        },
        "gemm": gemm,
        "hardware_limit": limit,
        "fidelity_vs_ours_fp32": {
            "auto": metrics(outputs[auto_name], outputs[ours_fp32]).to_dict(),
        },
    }
    report_result(result, seconds, fastest_theirs)
    OUT.mkdir(parents=True, exist_ok=True)
    name = ("peer_quick" if args.quick else "peer") + suffix.replace("-", "_") + ".json"
    (OUT / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"results → {OUT / name}")
    return 0


def report_result(result: dict[str, Any], seconds: dict[str, float], fastest_theirs: str) -> None:
    from benchmarks import peaks

    machine = result["machine"]
    flags = [f for f in machine["flags"] if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma"))]
    print(f"\nPeer benchmark: {result['model']}")
    print(f"  machine: {machine['cpu']}, {machine['cores']} cores; {' '.join(flags)}")
    print(f"  {'engine':<52}{'s/image':>9}{'vs ' + fastest_theirs:>34}")
    for name, s in seconds.items():
        print(f"  {name:<52}{s:>9.2f}{seconds[fastest_theirs] / s:>33.2f}x")
    ours = result["headline"]["ours"]
    for versus, r in result["headline"]["ratios"].items():
        verdict = "met" if r["met"] else "NOT met"
        print(f"  headline: {ours} {versus} = {r['ratio']:.2f}x (target ≥ {r['target']:.1f}x: {verdict})")
    gemm = result["gemm"]
    print(
        f"  peaks ({gemm['n']}³, measured now) and block throughput "
        f"({gemm['block_gflop_per_step']:.1f} GFLOP/step):"
    )
    peaks.print_peaks({k: v * 1e9 for k, v in gemm["peaks_gflops"].items()})
    peaks.print_throughput(gemm["candidates"])
    limit = result["hardware_limit"]
    if limit is not None:
        print(
            f"  hardware limit vs {fastest_theirs}: {limit['block_forwards_ratio']:.2f}x fewer block "
            f"forwards x {limit['peak_share']:.0%} of the best int8 peak "
            f"({limit['best_int8_peak_gflops']:.0f} GFLOP/s) / diffusers' "
            f"{limit['diffusers_block_gflops']:.0f} GFLOP/s = {limit['limit']:.2f}x;"
            f" ours reaches {limit['of_limit']:.0%} of it"
        )
        print(
            f"  ours' blocks over its whole time (text encoder included): {limit['ours_block_gflops']:.0f}"
            f" GFLOP/s = {limit['ours_of_best_int8']:.0%} of the best int8 peak"
        )


if __name__ == "__main__":
    raise SystemExit(main())
