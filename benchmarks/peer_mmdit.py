"""Peer, two-stream families: diffusers' own StableDiffusion3Pipeline / FluxPipeline vs ilf-deploy
on the same model and machine (`python -m benchmarks.peer --family sd3|flux`).

The model: the family's real transformer config at full width — SD3-medium (24 joint blocks,
24 heads x 64 = 1536 wide; `--sd3-depth N`: its first N) or Flux.1 (24 heads x 128 = 3072 wide)
with its depth reduced to fit 24 GiB (default 2 double + 4 single blocks of Flux.1-dev's 19 + 38:
`--flux-depth D,S`) — with random weights, the tiny text encoders and tokenizers of `make-tiny`
(their token counts are the real ones: SD3 77 CLIP + 256 T5, Flux 512 T5) and a 16-channel VAE
with the real downsampling factor 8, so a
256 px image is the real 256 image tokens. Theirs: the pipeline at fp32, bf16 eager and bf16 with
its transformer under `torch.compile`, base-N (default N = 10: the claim is speed per step).
Ours: `--backend auto` after `ilf-deploy tune` (the fastest engine x precision within its budget),
the same base-N (the engine alone), then ilf-N and cache-N: each plan's time beside its block-forward
ideal (base-N time x its block forwards / base-N's) and its fidelity against base-N on the same
engine (latent rel. L2 and SNR: random weights, so speed is the claim, not quality). One image,
256 px, same prompt, seed and guidance, text encoder + denoising (latents out), interleaved,
medians; targets: auto base-N >= 1.5x diffusers bf16 eager base-N; every plan within 5 % of its ideal.
"""

from __future__ import annotations

import json
import shutil
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.peer import interleave, log, tune_budget, tune_filter

OUT = Path("out/bench")
TARGET = 1.5  # auto base-N vs diffusers bf16 eager base-N
IDEAL_TOLERANCE = 0.05  # each plan's time within 5 % of its block-forward ideal
PROMPT = "a lighthouse on a cliff above a stormy sea, oil painting"
SEED, SIZE = 7, 256
GUIDANCE = {"sd3": 7.0, "flux": 3.5}


def transformer_config(family: str, quick: bool, depth: tuple[int, ...], text: dict) -> dict:
    """The family's transformer config at full width (narrow with `quick`), fitted to the tiny
    text encoders' widths (`text`: joint_attention_dim, pooled_projection_dim)."""
    if family == "sd3":  # stabilityai/stable-diffusion-3-medium-diffusers transformer/config.json
        heads, layers = (6, 4) if quick else (24, depth[0])
        return dict(
            sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=layers,
            attention_head_dim=64, num_attention_heads=heads, caption_projection_dim=heads * 64,
            pos_embed_max_size=192, **text,
        )  # fmt: skip
    heads, (double, single) = (4, (1, 2)) if quick else (24, depth)
    return dict(  # black-forest-labs/FLUX.1-dev transformer/config.json, depth reduced
        patch_size=1, in_channels=64, num_layers=double, num_single_layers=single,
        attention_head_dim=128, num_attention_heads=heads, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56), **text,
    )  # fmt: skip


def build_model_dir(out: Path, family: str, quick: bool, depth: tuple[int, ...]) -> Path:
    """`make-tiny`'s pipeline (text encoders, tokenizers, scheduler) with the transformer replaced
    by the full-width config, a factor-8 VAE and a random ILF feedback module."""
    import diffusers
    import torch

    from ilf_deploy.core.plan import default_loop
    from ilf_deploy.model.adapters import make_adapter
    from ilf_deploy.model.ilf import FEEDBACK_DIR, FeedbackModule
    from ilf_deploy.model.tiny import _VAE_SCALE_SHIFT, make_tiny_pipeline

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tiny = make_tiny_pipeline(family, out.with_name(out.name + ".tiny"), feedback=False)
    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    pipe = cls.from_pretrained(tiny)
    old = pipe.transformer.config
    text = {
        "joint_attention_dim": old.joint_attention_dim,
        "pooled_projection_dim": old.pooled_projection_dim,
    }
    model_cls = diffusers.SD3Transformer2DModel if family == "sd3" else diffusers.FluxTransformer2DModel
    scaling, shift = _VAE_SCALE_SHIFT[family]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe.transformer = model_cls(**transformer_config(family, quick, depth, text))
        pipe.vae = diffusers.AutoencoderKL(  # 4 levels: the real factor 8
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(16, 32, 32, 32),
            layers_per_block=1, latent_channels=16, norm_num_groups=8, sample_size=SIZE,
            scaling_factor=scaling, shift_factor=shift, use_quant_conv=False, use_post_quant_conv=False,
        )  # fmt: skip
        adapter = make_adapter(family, pipe.transformer)
        feedback = FeedbackModule.create(adapter, default_loop(adapter.num_blocks))
        torch.nn.init.normal_(feedback.scales, std=0.05)
    pipe.save_pretrained(tmp, safe_serialization=True)
    feedback.save(tmp / FEEDBACK_DIR)
    for name in ("tokenizer", "tokenizer_2", "tokenizer_3"):  # the portable tokenizers make-tiny wrote
        if (tiny / name).is_dir():
            shutil.rmtree(tmp / name, ignore_errors=True)
            shutil.copytree(tiny / name, tmp / name)
    shutil.copyfile(tiny / "model_index.json", tmp / "model_index.json")
    shutil.rmtree(tiny)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def prepare(
    work: Path, family: str, args: Any, depth: tuple[int, ...], modes: list[str]
) -> tuple[Path, Path]:
    """The model directory and its bundle (base-N, ilf-N, cache-N at 256 px, fp32, with the torch
    model for tune's torch candidates) and variants; each made once and reused."""
    model_kwargs = {"family": family, "quick": args.quick, "depth": list(depth)}
    return prepare_dirs(work, "benchmarks.peer_mmdit:build_model_dir", model_kwargs, args, SIZE, modes)


def prepare_dirs(
    work: Path, write_model: str, model_kwargs: dict, args: Any, size: int, modes: list[str]
) -> tuple[Path, Path]:
    """`work/model` (by `write_model(out, **model_kwargs)`) and `work/bundle` (base/ilf/cache-N at
    `size` px) with the `modes` variants, one stage per process (benchmarks/stages.py), each made
    once and reused (`--rebuild`: anew)."""
    from benchmarks import stages

    plans = [f"{kind}-{args.steps}" for kind in ("base", "ilf", "cache")]
    return stages.prepare(
        work, write_model, model_kwargs, plans, size, modes, f"ilf-{args.steps}", args.rebuild
    )


def diffusers_runner(model_dir: Path, family: str, steps: int, dtype: Any, compile: bool = False):
    import diffusers
    import torch

    from ilf_deploy.model.loading import quiet_huggingface

    quiet_huggingface()
    cls = diffusers.StableDiffusion3Pipeline if family == "sd3" else diffusers.FluxPipeline
    pipe = cls.from_pretrained(model_dir, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    if compile:
        pipe.transformer = torch.compile(pipe.transformer)
    extra = {"negative_prompt": ""} if family == "sd3" else {}

    def run() -> np.ndarray:
        with torch.inference_mode():
            out = pipe(
                PROMPT, num_inference_steps=steps, guidance_scale=GUIDANCE[family], height=SIZE, width=SIZE,
                generator=torch.Generator().manual_seed(SEED), output_type="latent", **extra,
            ).images  # fmt: skip
        return out.float().numpy()

    return run


def ours_runner(generator: Any, plan: Any, guidance: float, size: int = SIZE) -> Callable[[], np.ndarray]:
    from ilf_deploy.core.runtime.generator import Request

    request = Request(prompt=PROMPT, seed=SEED, guidance_scale=guidance, height=size, width=size)

    def run() -> np.ndarray:
        generator.__dict__.pop("_prompt_cache", None)  # the text encoders run every time, as diffusers'
        return generator.latents_to_numpy(generator.generate_latents(plan, request))

    return run


def main(args: Any) -> int:
    family, steps, quick = args.family, args.steps, args.quick
    depth = tuple(int(v) for v in (args.flux_depth if family == "flux" else str(args.sd3_depth)).split(","))
    runs = args.runs or (2 if quick else 3)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    work = OUT / f"peer-{family}" / ("quick" if quick else "-".join(map(str, depth)))
    # Each stage in a child process (benchmarks/stages.py): this one stays fresh for timing torch.
    model_dir, bundle_dir = prepare(work, family, args, depth, modes)
    if args.prepare_only:
        return 0
    return measure(
        args, family, "quick" if quick else "full width", model_dir, bundle_dir, runs,
        lambda dtype, compile=False: diffusers_runner(model_dir, family, steps, dtype, compile),
        lambda generator, plan: ours_runner(generator, plan, GUIDANCE[family]),
    )  # fmt: skip


def measure(
    args: Any,
    family: str,
    depth: str,
    model_dir: Path,
    bundle_dir: Path,
    runs: int,
    theirs: Callable[..., Callable[[], np.ndarray]],
    ours_for: Callable[[Any, Any], Callable[[], np.ndarray]],
    size: int = SIZE,
) -> int:
    """tune, then diffusers' pipeline (`theirs(dtype, compile=)`) and ours (`ours_for(generator, plan)`)
    on base/ilf/cache plans, interleaved; the table, the headline and the JSON (peer_FAMILY.json)."""
    steps, quick = args.steps, args.quick
    import torch

    from benchmarks.reuse import made_by
    from ilf_deploy.checks.tuning import tune
    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.engines.backends import open_generator
    from ilf_deploy.engines.backends.machine import fingerprint
    from ilf_deploy.engines.compare import metrics

    base = f"base-{steps}"
    log("ilf-deploy tune")
    budget = tune_budget(args.tune_budget_s, quick)
    report = tune(
        bundle_dir,
        base,
        budget_s=budget,
        progress=log,
        include=tune_filter(args.tune_backends, args.no_compile),
    )
    bundle = Bundle.load(bundle_dir)
    auto = open_generator(bundle_dir, "auto")
    log(auto.choice or "")
    eager_bf16, compiled_bf16 = f"diffusers bf16 {base}", f"diffusers bf16 + torch.compile {base}"
    engines: dict[str, Callable[[], np.ndarray]] = {}
    if not args.no_fp32:
        engines[f"diffusers fp32 {base}"] = theirs(torch.float32)
    engines[eager_bf16] = theirs(torch.bfloat16)
    if not args.no_compile:
        engines[compiled_bf16] = theirs(torch.bfloat16, compile=True)
    label = (auto.choice or "auto").split("(")[0].removeprefix("auto: ").strip()
    plans = {kind: bundle.plan(f"{kind}-{steps}") for kind in ("base", "ilf", "cache")}
    ours = {kind: f"ilf-deploy auto ({label}) {plan.name}" for kind, plan in plans.items()}
    for kind, plan in plans.items():
        engines[ours[kind]] = ours_for(auto, plan)

    log(f"warm-up, then {runs} interleaved runs of each engine (text encoders + denoising, one image)")
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
    headline = {"ours": ours["base"], "theirs": eager_bf16, "ratio": ratio, "target": TARGET}
    compiled = seconds[compiled_bf16] / seconds[ours["base"]] if compiled_bf16 in seconds else None
    result = {
        "family": family,
        "model": json.loads((model_dir / "transformer" / "config.json").read_text()),
        "size": size, "steps": steps, "runs": runs, "machine": machine, "code": made_by(bundle_dir),
        "seconds": seconds,
        "samples_s": times, "warmup_s": warmup, "auto_choice": auto.choice,
        "tune": {"winner": report["winner"], "candidates": report["candidates"]},
        "headline": {**headline, "met": ratio >= TARGET}, "compiled_ratio": compiled,
        "plans": plan_rows,
    }  # fmt: skip
    flags = [f for f in machine["flags"] if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma"))]
    print(f"\nPeer benchmark, {family} ({depth}), {size} px, {steps} steps")
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
    name = f"peer_{family}{'_quick' if quick else ''}.json"
    (OUT / name).write_text(json.dumps(result, indent=2, default=str) + "\n")
    log(f"results → {OUT / name}")
    return 0
