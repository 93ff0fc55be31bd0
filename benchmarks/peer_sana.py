"""Peer, Sana: diffusers' own SanaPipeline vs ilf-deploy on the same model and machine
(`python -m benchmarks.peer --family sana`).

The model: Sana-600M-512px's transformer config at full width (Efficient-Large-Model/
Sana_600M_512px_diffusers: 28 blocks, 36 heads x 32 = 1152 wide, cross-attention 16 x 72, Mix-FFN
ratio 2.5, patch 1, 32 latent channels; `--sana-depth N`: its first N blocks) with random weights,
the tiny Gemma-2 text encoder and tokenizer of `make-tiny sana` (the caption projection reads its
width, not Gemma-2-2b's 2304; the token count is the real one: 300 after the instruction's
select-index) and its DC-AE with the real factor 32, so a 512 px image is the real 16x16 = 256
image tokens. Theirs: the pipeline at fp32, bf16 eager and bf16 with its transformer under
`torch.compile`, base-N (default N = 10), guidance 4.5 (classifier-free: two rows a step).
Ours: `--backend auto` after `ilf-deploy tune`, the same base-N (the engine alone), then ilf-N and
cache-N, each beside its block-forward ideal and its fidelity against base-N on the same engine.
One image, 512 px, same prompt, seed and guidance, text encoder + denoising (latents out),
interleaved, medians; targets: auto base-N >= 1.5x diffusers bf16 eager base-N; every plan within
5 % of its ideal.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peer import interleave, log, make_variants

OUT = Path("out/bench")
TARGET = 1.5  # auto base-N vs diffusers bf16 eager base-N
IDEAL_TOLERANCE = 0.05  # each plan's time within 5 % of its block-forward ideal
PROMPT = "a lighthouse on a cliff above a stormy sea, oil painting"
SEED, SIZE, GUIDANCE = 7, 512, 4.5


def transformer_config(quick: bool, depth: int, caption_channels: int) -> dict:
    """Sana-600M-512px's transformer config (narrow with `quick`), its first `depth` blocks."""
    heads, cross_heads, cross_dim, layers = (4, 2, 64, 2) if quick else (36, 16, 72, depth)
    return dict(
        in_channels=32, out_channels=32, num_attention_heads=heads, attention_head_dim=32,
        num_layers=layers, num_cross_attention_heads=cross_heads, cross_attention_head_dim=cross_dim,
        cross_attention_dim=heads * 32, caption_channels=caption_channels, mlp_ratio=2.5,
        attention_bias=False, sample_size=16, patch_size=1, norm_elementwise_affine=False, norm_eps=1e-6,
        interpolation_scale=None,
    )  # fmt: skip


def build_model_dir(out: Path, quick: bool, depth: int) -> Path:
    """`make-tiny sana`'s pipeline (Gemma-2, tokenizer, DC-AE, scheduler) with the transformer
    replaced by the full-width config and a random ILF feedback module."""
    import diffusers
    import torch

    from ilf_deploy.adapters import make_adapter
    from ilf_deploy.ilf import FEEDBACK_DIR, FeedbackModule
    from ilf_deploy.plan import default_loop
    from ilf_deploy.tiny import make_tiny_pipeline

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny = make_tiny_pipeline("sana", out.with_name(out.name + ".tiny"), feedback=False)
    pipe = diffusers.SanaPipeline.from_pretrained(tiny)
    caption = int(pipe.text_encoder.config.hidden_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.transformer = diffusers.SanaTransformer2DModel(**transformer_config(quick, depth, caption))
        adapter = make_adapter("sana", pipe.transformer)
        feedback = FeedbackModule.create(adapter, default_loop(adapter.num_blocks))
        torch.nn.init.normal_(feedback.scales, std=0.05)
    pipe.save_pretrained(tmp, safe_serialization=True)
    feedback.save(tmp / FEEDBACK_DIR)
    shutil.rmtree(tmp / "tokenizer", ignore_errors=True)  # the portable tokenizer make-tiny wrote
    shutil.copytree(tiny / "tokenizer", tmp / "tokenizer")
    shutil.copyfile(tiny / "model_index.json", tmp / "model_index.json")
    shutil.rmtree(tiny)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def prepare(work: Path, steps: int, quick: bool, depth: int, modes: list[str]) -> tuple[Path, Path]:
    """The model directory and its bundle (base-N, ilf-N, cache-N at 512 px, fp32, with the torch
    model for tune's torch candidates) and variants; each made once and reused."""
    from ilf_deploy.export.build import BuildOptions, build_bundle

    work.mkdir(parents=True, exist_ok=True)
    model_dir, bundle_dir = work / "model", work / "bundle"
    if not (model_dir / "model_index.json").is_file():
        log(f"writing {model_dir}")
        build_model_dir(model_dir, quick, depth)
    if not (bundle_dir / "manifest.json").is_file():
        log(f"exporting {bundle_dir}")
        plans = tuple(f"{kind}-{steps}" for kind in ("base", "ilf", "cache"))
        options = BuildOptions(plans=plans, resolutions=[(SIZE, SIZE)], force=True, copy_model=True)
        build_bundle(model_dir, bundle_dir, options)
    make_variants(bundle_dir, modes, f"ilf-{steps}")
    return model_dir, bundle_dir


def diffusers_runner(model_dir: Path, steps: int, dtype: Any, compile: bool = False):
    import diffusers
    import torch

    from ilf_deploy.loading import quiet_huggingface

    quiet_huggingface()
    pipe = diffusers.SanaPipeline.from_pretrained(model_dir, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if compile:
        pipe.transformer = torch.compile(pipe.transformer)

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = pipe(
                PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE, height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(SEED), output_type="latent",
                use_resolution_binning=False,
            ).images  # fmt: skip
        return out.float().numpy()

    return run


def ours_runner(generator: Any, plan: Any) -> Callable[[], np.ndarray]:
    from ilf_deploy.runtime.generator import Request

    request = Request(prompt=PROMPT, seed=SEED, guidance_scale=GUIDANCE, height=SIZE, width=SIZE)

    def run() -> np.ndarray:
        generator.__dict__.pop("_prompt_cache", None)  # the text encoder runs every time, as diffusers'
        return generator.latents_to_numpy(generator.generate_latents(plan, request))

    return run


def main(args: Any) -> int:
    steps, quick, depth = args.steps, args.quick, args.sana_depth
    runs = args.runs or 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    work = OUT / "peer-sana" / ("quick" if quick else str(depth))
    if args.rebuild:
        shutil.rmtree(work, ignore_errors=True)
    if args.prepare_only:
        prepare(work, steps, quick, depth, modes)
        return 0
    # Build, calibrate and quantize in a child process (benchmarks/peer.py says why).
    child = [sys.executable, "-m", "benchmarks.peer", "--family", "sana", "--prepare-only"]
    child += ["--modes", ",".join(modes), "--steps", str(steps), "--sana-depth", str(depth)]
    child += ["--quick"] * quick
    subprocess.run(child, check=True)
    model_dir, bundle_dir = prepare(work, steps, quick, depth, modes)
    return measure(args, model_dir, bundle_dir, runs)


def measure(args: Any, model_dir: Path, bundle_dir: Path, runs: int) -> int:
    import torch

    from ilf_deploy.backends import open_generator
    from ilf_deploy.backends.machine import fingerprint
    from ilf_deploy.compare import metrics
    from ilf_deploy.runtime.bundle import Bundle
    from ilf_deploy.tuning import tune

    steps, base = args.steps, f"base-{args.steps}"
    log("ilf-deploy tune")
    budget = args.tune_budget_s or (60.0 if args.quick else 300.0)
    eager_only = (lambda c: not c.options.get("compile")) if args.no_compile else None
    report = tune(bundle_dir, base, budget_s=budget, progress=log, include=eager_only)
    bundle = Bundle.load(bundle_dir)
    auto = open_generator(bundle_dir, "auto")
    log(auto.choice or "")
    eager_bf16, compiled_bf16 = f"diffusers bf16 {base}", f"diffusers bf16 + torch.compile {base}"
    engines: dict[str, Callable[[], np.ndarray]] = {}
    if not args.no_fp32:
        engines[f"diffusers fp32 {base}"] = diffusers_runner(model_dir, steps, torch.float32)
    engines[eager_bf16] = diffusers_runner(model_dir, steps, torch.bfloat16)
    if not args.no_compile:
        engines[compiled_bf16] = diffusers_runner(model_dir, steps, torch.bfloat16, compile=True)
    label = (auto.choice or "auto").split("(")[0].removeprefix("auto: ").strip()
    plans = {kind: bundle.plan(f"{kind}-{steps}") for kind in ("base", "ilf", "cache")}
    ours = {kind: f"ilf-deploy auto ({label}) {plan.name}" for kind, plan in plans.items()}
    for kind, plan in plans.items():
        engines[ours[kind]] = ours_runner(auto, plan)

    log(f"warm-up, then {runs} interleaved runs of each engine (text encoder + denoising, one image)")
    outputs, times, warmup = interleave(engines, runs)
    seconds = {name: statistics.median(v) for name, v in times.items()}
    ratio = seconds[eager_bf16] / seconds[ours["base"]]
    plan_rows = {}
    for kind, plan in plans.items():
        ideal = seconds[ours["base"]] * plan.block_forwards / plans["base"].block_forwards
        fidelity = metrics(outputs[ours[kind]], outputs[ours["base"]]).to_dict()
        plan_rows[plan.name] = {
            "seconds": seconds[ours[kind]], "block_forwards": plan.block_forwards, "ideal_s": ideal,
            "vs_ideal": seconds[ours[kind]] / ideal,
            "within": abs(seconds[ours[kind]] / ideal - 1) <= IDEAL_TOLERANCE, "fidelity_vs_base": fidelity,
        }  # fmt: skip
    machine = fingerprint()
    compiled = seconds[compiled_bf16] / seconds[ours["base"]] if compiled_bf16 in seconds else None
    result = {
        "family": "sana", "model": json.loads((model_dir / "transformer" / "config.json").read_text()),
        "size": SIZE, "steps": steps, "runs": runs, "machine": machine, "seconds": seconds,
        "samples_s": times, "warmup_s": warmup, "auto_choice": auto.choice,
        "tune": {"winner": report["winner"], "candidates": report["candidates"]},
        "headline": {"ours": ours["base"], "theirs": eager_bf16, "ratio": ratio, "target": TARGET,
                     "met": ratio >= TARGET},
        "compiled_ratio": compiled, "plans": plan_rows,
    }  # fmt: skip
    flags = [f for f in machine["flags"] if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma"))]
    depth = "quick" if args.quick else f"{args.sana_depth} of 28 blocks, full width"
    print(f"\nPeer benchmark, sana ({depth}), {SIZE} px, {steps} steps")
    print(f"  machine: {machine['cpu']}, {machine['cores']} cores; {' '.join(flags)}")
    for name, s in seconds.items():
        print(f"  {name:<64}{s:>9.2f} s{seconds[eager_bf16] / s:>8.2f}x vs {eager_bf16}")
    verdict = "met" if ratio >= TARGET else "NOT met"
    print(f"  headline: auto {base} vs {eager_bf16} = {ratio:.2f}x (target >= {TARGET}x: {verdict})")
    for name, row in plan_rows.items():
        fid = row["fidelity_vs_base"]
        print(
            f"  {name}: {row['seconds']:.2f} s = {row['vs_ideal']:.3f} x its ideal ({row['block_forwards']} "
            f"block forwards); vs {base}: rel L2 {fid['rel_l2']:.3g}, SNR {fid['snr_db']:.1f} dB"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    name = f"peer_sana{'_quick' if args.quick else ''}.json"
    (OUT / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"results → {OUT / name}")
    return 0
