"""P1–P3: the PixArt-XL-2 backbone (random weights) on ONNX Runtime CPU and torch.

P1  ILF-10 vs base-20 measured speedup ÷ the block-forward ideal (560/332), target ≥ 0.97.
P2  one step through the bundle's segments vs one monolithic backbone ONNX graph, target ≤ 3 % overhead.
P3  ORT CPU vs torch eager fp32 on 4 blocks, target ≥ 2.0×; also torch bf16, achieved FLOP/s and
    a measured GEMM peak.

The model is the real PixArt-XL-2-512x512 transformer config with random weights, at 256 px (32×32
latents, 256 tokens), batch 2 (guidance). Everything is written under out/bench/ and reused by later
runs (`--rebuild` to redo it). Times are medians of interleaved runs (ABAB…): the machine is shared,
so only ratios within one run mean anything.

    python -m benchmarks.backbone [--quick] [--parts p1,p2,p3] [--runs N] [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

OUT = Path("out/bench")
RESOLUTION = 256  # pixels; 32x32 latents, 16x16 = 256 tokens with patch 2
TEXT_TOKENS = 120  # PixArt-α pads prompts to 120 T5 tokens
P1_TARGET, P2_TARGET, P3_TARGET = 0.97, 0.03, 2.0


@dataclass(frozen=True)
class Size:
    """Transformer shape; the default is PixArt-XL-2-512x512 (611M parameters)."""

    layers: int = 28
    heads: int = 16
    head_dim: int = 72
    caption_channels: int = 4096  # T5-XXL d_model: the caption projection is real-sized

    @property
    def hidden(self) -> int:
        return self.heads * self.head_dim

    @property
    def tag(self) -> str:
        return f"pixart-l{self.layers}-h{self.heads}x{self.head_dim}-c{self.caption_channels}"


QUICK = Size(layers=8, heads=4)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- the model directory and the bundle ----------------------------------------------------------


def build_model_dir(out: Path, size: Size, seed: int = 0) -> Path:
    """A PixArt-α pipeline directory as `ilf_deploy.model.tiny` writes one, with a real-sized transformer,
    a tiny T5 of width `caption_channels`, a small VAE with downsampling factor 8 and random feedback."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtAlphaPipeline,
        PixArtTransformer2DModel,
    )

    from ilf_deploy.core.plan import default_loop
    from ilf_deploy.model.adapters import make_adapter
    from ilf_deploy.model.ilf import FEEDBACK_DIR, FeedbackModule
    from ilf_deploy.model.loading import quiet_huggingface
    from ilf_deploy.model.tiny import (
        _MAX_LENGTH,
        _T5,
        PIXART_SCHEDULER,
        _portable_tokenizer,
        word_text_encoder,
    )

    quiet_huggingface()
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, text_encoder = word_text_encoder({**_T5, "d_model": size.caption_channels}, 120)
        vae = AutoencoderKL(  # 4 levels -> downsampling factor 8, as the real SD VAE
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=512,
            scaling_factor=0.18215,
        )
        transformer = PixArtTransformer2DModel(  # PixArt-XL-2-512x512/transformer/config.json
            num_attention_heads=size.heads,
            attention_head_dim=size.head_dim,
            in_channels=4,
            out_channels=8,
            num_layers=size.layers,
            dropout=0.0,
            norm_num_groups=32,
            cross_attention_dim=size.hidden,
            attention_bias=True,
            sample_size=64,
            patch_size=2,
            activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000,
            upcast_attention=False,
            norm_type="ada_norm_single",
            norm_elementwise_affine=False,
            norm_eps=1e-6,
            caption_channels=size.caption_channels,
        )
        pipe = PixArtAlphaPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            transformer=transformer,
            scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER),
        )
        feedback = FeedbackModule.create(make_adapter("pixart-alpha", transformer), default_loop(size.layers))
        torch.nn.init.normal_(feedback.scales, std=0.05)  # small but non-zero: the feedback path matters
    pipe.save_pretrained(tmp, safe_serialization=True)
    feedback.save(tmp / FEEDBACK_DIR)
    _portable_tokenizer(tmp, _MAX_LENGTH["pixart-alpha"])
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


class Monolith(torch.nn.Module):
    """time embedding + embed + every block + final layer in one graph: P2's reference."""

    def __init__(self, adapter: Any) -> None:
        super().__init__()
        self.adapter, self.transformer = adapter, adapter.transformer

    def forward(
        self,
        latents: torch.Tensor,
        pos_embed: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_bias: torch.Tensor,
    ) -> torch.Tensor:
        a = self.adapter
        cond = {"context": context, "context_bias": context_bias, **a.time_cond(timestep, {})}
        state = {"hidden": a.embed_tokens(latents, pos_embed)}
        for block in a.blocks:
            state = a.run_block(block, state, cond)
        return a.final_tokens(state, cond)


MONO_INPUTS = ("latents", "pos_embed", "timestep", "context", "context_bias")
PROBE_BLOCKS = 4


def model_and_bundle(
    work: Path, size: Size, plans: tuple[str, ...], copy_model: bool = False
) -> tuple[Path, Path]:
    """`work/model` (the config at `size`, random weights) and its fp32 bundle of `plans` at
    RESOLUTION px (with the torch model only if `copy_model`: `tune`'s torch candidates need it),
    each written once and reused by later runs."""
    from ilf_deploy.build.export.build import BuildOptions, build_bundle

    model_dir, bundle_dir = work / "model", work / "bundle"
    if not (model_dir / "model_index.json").is_file():
        log(f"writing {model_dir} ({size.tag})")
        build_model_dir(model_dir, size)
    manifest = bundle_dir / "manifest.json"
    lacks_model = (
        copy_model and manifest.is_file() and json.loads(manifest.read_text())["torch_model"] is None
    )
    if not manifest.is_file() or lacks_model:
        log(f"exporting {bundle_dir}")
        options = BuildOptions(
            plans=plans, resolutions=[(RESOLUTION, RESOLUTION)], force=True, copy_model=copy_model
        )
        build_bundle(model_dir, bundle_dir, options)
    return model_dir, bundle_dir


def probe_inputs(adapter: Any, seed: int = 0) -> dict[str, torch.Tensor]:
    """Batch-2 inputs at 256 px with 120 text tokens, computed by the model's own context/time paths."""
    gen = torch.Generator().manual_seed(seed)
    latent = RESOLUTION // 8
    latents = torch.randn(2, 4, latent, latent, generator=gen)
    embeds = torch.randn(2, TEXT_TOKENS, adapter.config.caption_channels, generator=gen)
    mask = torch.ones(2, TEXT_TOKENS, dtype=torch.int64)
    with torch.inference_mode():
        context = adapter.context({"prompt_embeds": embeds, "prompt_mask": mask})
        cond = adapter.conditioning(torch.tensor([500.0]), context)
        pos = adapter.pos_embed(latent, latent).detach().float()
        hidden = adapter.embed_tokens(latents, pos)
    return {
        "latents": latents,
        "pos_embed": pos,
        "timestep": torch.full((2,), 500.0),
        "hidden": hidden,
        **cond,
    }


def prepare(work: Path, size: Size, rebuild: bool, need_torch: bool) -> dict[str, Any]:
    """Model dir, bundle (base-20 + ilf-10 at 256 px, fp32), monolith and probe ONNX; reused when present."""
    from benchmarks.reuse import reuse_or_clear
    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.build.export.onnx import export_segment
    from ilf_deploy.build.export.segments import BlocksSegment
    from ilf_deploy.model.loading import load_model

    facts: dict[str, Any] = {}
    reuse_or_clear(work, asdict(size), rebuild)  # made anew by other code or another size
    work.mkdir(parents=True, exist_ok=True)
    model_dir, bundle_dir = work / "model", work / "bundle"
    mono_path, probe_path = work / "monolith" / "backbone.onnx", work / "probe" / "blocks4.onnx"
    if not (model_dir / "model_index.json").is_file():
        log(f"writing the model directory {model_dir}")
        start = time.perf_counter()
        build_model_dir(model_dir, size)
        facts["model_dir_s"] = time.perf_counter() - start
    if not (bundle_dir / "manifest.json").is_file():
        log(f"exporting the bundle {bundle_dir} (base-20, ilf-10, 256x256, fp32)")
        start = time.perf_counter()
        options = BuildOptions(
            plans=("base-20", "ilf-10"), resolutions=[(RESOLUTION, RESOLUTION)], force=True, copy_model=False
        )
        build_bundle(
            model_dir, bundle_dir, options, progress=lambda name, i, n: log(f"  segment {name} {i + 1}/{n}")
        )
        facts["bundle_export_s"] = time.perf_counter() - start
    model = None
    if need_torch or not mono_path.is_file() or not probe_path.is_file():
        model = load_model(model_dir)
        adapter = model.adapter
        facts["parameters"] = sum(p.numel() for p in adapter.transformer.parameters())
        inputs = probe_inputs(adapter)
        if not mono_path.is_file():
            log(f"exporting the monolithic backbone {mono_path}")
            start = time.perf_counter()
            export_segment(
                Monolith(adapter), tuple(inputs[n] for n in MONO_INPUTS), mono_path, MONO_INPUTS, ("tokens",)
            )
            facts["monolith_export_s"] = time.perf_counter() - start
        if not probe_path.is_file():
            names = ("hidden", *adapter.block_inputs)
            module = BlocksSegment(adapter, 0, PROBE_BLOCKS - 1, None)
            export_segment(module, tuple(inputs[n] for n in names), probe_path, names, ("hidden_out",))
    # torch's exporter writes one file per tensor beside a > 2 GB graph; export_segment then merges
    # them into `.data` but leaves them behind (see benchmarks/README.md): count them, then drop them.
    keep = {mono_path.name, mono_path.name + ".data"}
    stray = [p for p in mono_path.parent.iterdir() if p.name not in keep]
    if stray:
        facts["monolith_stray_files"] = len(stray)
        facts["monolith_stray_mb"] = round(sum(p.stat().st_size for p in stray) / 2**20, 1)
        for p in stray:
            p.unlink()
    facts["files_mb"] = {
        str(p.relative_to(work)): round(p.stat().st_size / 2**20, 1)
        for p in sorted(work.rglob("*"))
        if p.is_file() and p.stat().st_size > 2**20 and not p.is_relative_to(model_dir)
    }
    return {"model": model, "bundle": bundle_dir, "monolith": mono_path, "probe": probe_path, "facts": facts}


# -- timing helpers ------------------------------------------------------------------------------


def interleaved(
    variants: dict[str, Callable[[], Any]],
    runs: int,
    warmup: int = 1,
    cpu: dict[str, list[float]] | None = None,
) -> dict[str, list[float]]:
    """Wall seconds per call of each variant, run in rotation (ABAB…) so that load changes hit all
    alike. With `cpu`, also this process's CPU seconds per call: on a shared machine that is the
    steadier estimate of what a call costs (it includes ORT's spinning threads, which is real cost)."""
    for _ in range(warmup):
        for fn in variants.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(runs):
        for name, fn in variants.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            if cpu is not None:
                cpu.setdefault(name, []).append(time.process_time() - start_cpu)
    return times


def med(values: list[float]) -> float:
    return statistics.median(values)


def block_flops(
    size: Size, batch: int = 2, tokens: int = 256, text: int = TEXT_TOKENS, caption_kv: bool = True
) -> float:
    """Multiply-add FLOPs (2 per MAC) of one PixArt block's matmuls: self-attn, cross-attn, MLP;
    without the caption's K/V projections where a `cross_kv` segment does them once per image."""
    d, b, n, m = size.hidden, batch, tokens, text
    self_attn = 2 * b * n * d * d * 4 + 2 * 2 * b * n * n * d  # q, k, v, out projections + QK^T, AV
    kv = 2 * b * m * d * d * 2 if caption_kv else 0
    cross = 2 * b * n * d * d * 2 + kv + 2 * 2 * b * n * m * d  # q, out; k, v; attn
    mlp = 2 * b * n * d * 4 * d * 2
    return float(self_attn + cross + mlp)


def gemm_peak(threads: int, n: int = 2048, reps: int = 5) -> dict[str, float]:
    """Best-of fp32 (torch and numpy) and bf16 (torch) GEMM FLOP/s on this machine."""
    out: dict[str, float] = {}
    a32, b32 = torch.randn(n, n), torch.randn(n, n)
    a_np, b_np, a16, b16 = a32.numpy(), b32.numpy(), a32.bfloat16(), b32.bfloat16()
    cases: dict[str, Callable[[], Any]] = {
        "torch_fp32": lambda: torch.mm(a32, b32),
        "numpy_fp32": lambda: a_np @ b_np,
        # a linear layer, as torch's bf16 blocks run: without bf16 hardware `mm` takes a scalar path
        # (0.3 GFLOP/s on an AVX2 EPYC) that no block uses, while `linear` converts and runs fp32 kernels
        "torch_bf16": lambda: torch.nn.functional.linear(a16, b16),
    }
    for name, fn in cases.items():
        fn()
        best = min(_timed(fn) for _ in range(reps))
        out[name] = 2 * n**3 / best
    out["fp32_peak"] = max(out["torch_fp32"], out["numpy_fp32"])
    return out


def _timed(fn: Callable[[], Any]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ort_session(path: Path, threads: int) -> Any:
    from ilf_deploy.engines.backends.onnxruntime import OrtSession

    return OrtSession(path, ["CPUExecutionProvider"], threads)


def no_spin_sessions() -> None:
    """Make every ORT session this process creates run with `session.intra_op.allow_spinning=0`.

    A diagnostic for shared CPUs: each bundle segment has its own intra-op pool, and ORT's idle
    threads spin by default. The runtime has no option for it, so wrap the session constructor."""
    import onnxruntime as ort

    original = ort.InferenceSession

    def session(path: str, options: Any = None, *args: Any, **kwargs: Any) -> Any:
        options = options or ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return original(path, options, *args, **kwargs)

    ort.InferenceSession = session  # type: ignore[misc]


# -- P1–P3 ----------------------------------------------------------------------------------------


def run_p3(model: Any, probe: Path, size: Size, threads: int, runs: int) -> dict[str, Any]:
    from ilf_deploy.build.export.segments import BlocksSegment

    adapter = model.adapter
    inputs = probe_inputs(adapter)
    names = ("hidden", *adapter.block_inputs)
    module = BlocksSegment(adapter, 0, PROBE_BLOCKS - 1, None).eval()
    args32 = tuple(inputs[n] for n in names)
    module16 = copy.deepcopy(module).to(torch.bfloat16)  # a copy: the fp32 weights stay as they are
    args16 = tuple(t.to(torch.bfloat16) for t in args32)
    session = ort_session(probe, threads)
    feeds = {n: inputs[n].numpy() for n in names}

    def torch_fp32() -> torch.Tensor:
        with torch.inference_mode():
            return module(*args32)

    def torch_bf16() -> torch.Tensor:
        with torch.inference_mode():
            return module16(*args16)

    ref = torch_fp32().numpy()
    got = session(feeds)["hidden_out"]
    bf = torch_bf16().float().numpy()
    cpu: dict[str, list[float]] = {}
    times = interleaved(
        {"ort_fp32": lambda: session(feeds), "torch_fp32": torch_fp32, "torch_bf16": torch_bf16},
        runs,
        cpu=cpu,
    )
    flops = PROBE_BLOCKS * block_flops(size)
    peak = gemm_peak(threads)
    t = {k: med(v) for k, v in times.items()}
    ratio = t["torch_fp32"] / t["ort_fp32"]
    return {
        "probe": f"{PROBE_BLOCKS} blocks, batch 2, 256 tokens, {TEXT_TOKENS} text tokens",
        "median_s": t,
        "times_s": times,
        "ort_vs_torch_fp32": ratio,
        "cpu_median_s": {k: med(v) for k, v in cpu.items()},
        "ort_vs_torch_fp32_cpu": med(cpu["torch_fp32"]) / med(cpu["ort_fp32"]),
        "ort_vs_torch_bf16": t["torch_bf16"] / t["ort_fp32"],
        "target": P3_TARGET,
        "met": ratio >= P3_TARGET,
        "matmul_gflop": flops / 1e9,
        "achieved_gflops": {k: flops / v / 1e9 for k, v in t.items()},
        "gemm_peak_gflops": {k: v / 1e9 for k, v in peak.items()},
        "ort_fraction_of_fp32_peak": flops / t["ort_fp32"] / peak["fp32_peak"],
        "max_rel_err_ort": float(np.abs(got - ref).max() / np.abs(ref).max()),
        "max_rel_err_bf16": float(np.abs(bf - ref).max() / np.abs(ref).max()),
    }


def step_inputs(generator: Any) -> dict[str, np.ndarray]:
    """The conditioning a base step sees for one guided request, through the bundle's own segments."""
    from ilf_deploy.core.runtime.generator import Request

    request = Request(prompt="a small red circle on a blue background", height=RESOLUTION, width=RESOLUTION)
    h, w = generator.latent_size(request)
    x = generator.initial_latents(request)
    context = generator.segments.context(generator.batch_inputs([request], True, (h, w)))
    return {"x": np.concatenate([x, x]), "context": context}


def run_p2(generator: Any, monolith: Path, threads: int, runs: int) -> dict[str, Any]:
    segs = generator.segments
    data = step_inputs(generator)
    x, context, t = data["x"], data["context"], 500.0
    positions = segs.bundle.positions(x.shape[-2], x.shape[-1])
    mono = ort_session(monolith, threads)
    mono_feeds = {
        "latents": x,
        "pos_embed": positions,
        "timestep": np.full((x.shape[0],), t, np.float32),
        "context": context["context"],
        "context_bias": context["context_bias"],
    }

    def segmented() -> np.ndarray:  # what runtime.loop.model_output does for a base step
        cond = segs.conditioning(t, context)
        state = segs.blocks(0, segs.num_blocks - 1, segs.embed(x, cond), cond)
        return segs.run("final", {**cond, "hidden": state["hidden"]})["tokens"]

    def monolithic() -> np.ndarray:
        return mono(mono_feeds)["tokens"]

    a, b = segmented(), monolithic()
    segs.timings.clear()
    cpu: dict[str, list[float]] = {}
    times = interleaved({"segmented": segmented, "monolith": monolithic}, runs, cpu=cpu)
    # Where a segmented step's time goes: each segment's session.run vs the Python glue between them.
    per_segment = {name: med(calls) for name, calls in segs.timings.items()}
    paired = [s / m for s, m in zip(times["segmented"], times["monolith"], strict=True)]
    overhead = med(times["segmented"]) / med(times["monolith"]) - 1
    return {
        "segments": ["time", "embed", *[name for *_, name, _ in segs.block_segments], "final"],
        "median_s": {k: med(v) for k, v in times.items()},
        "times_s": times,
        "segment_median_s": per_segment,
        "glue_s": med(times["segmented"]) - sum(per_segment.values()),
        "overhead": overhead,
        "overhead_paired_median": med(paired) - 1,
        "cpu_median_s": {k: med(v) for k, v in cpu.items()},
        "overhead_cpu": med(cpu["segmented"]) / med(cpu["monolith"]) - 1,
        "target": P2_TARGET,
        "met": overhead <= P2_TARGET,
        "max_rel_diff": float(np.abs(a - b).max() / np.abs(b).max()),
    }


def run_p1(generator: Any, runs: int) -> dict[str, Any]:
    from ilf_deploy.core.plan import resolve_plan
    from ilf_deploy.core.runtime.generator import Request

    bundle = generator.bundle
    base, ilf = bundle.plan("base-20"), bundle.plan("ilf-10")
    request = Request(prompt="a small red circle on a blue background", height=RESOLUTION, width=RESOLUTION)
    timings = generator.segments.timings
    stages: dict[str, list[dict[str, float]]] = {base.name: [], ilf.name: []}
    latents: dict[str, np.ndarray] = {}

    def variant(plan: Any) -> Callable[[], None]:
        def fn() -> None:
            timings.clear()
            latents[plan.name] = generator.generate_latents(plan, request)
            stages[plan.name].append({k: sum(v) for k, v in timings.items()})

        return fn

    # Warm every session (loading, first-run arena growth) with a 2-step plan that has feedback on
    # both steps, rather than with a full warmup run of each plan: that would double P1's runtime.
    warm = resolve_plan("ilf-2", base.num_blocks, dict(bundle.manifest.scheduler), bundle.loop)
    generator.generate_latents(warm, request)
    cpu: dict[str, list[float]] = {}
    times = interleaved({base.name: variant(base), ilf.name: variant(ilf)}, runs, warmup=0, cpu=cpu)
    measured = med(times[base.name]) / med(times[ilf.name])
    ideal = base.block_forwards / ilf.block_forwards

    def stage_medians(name: str) -> dict[str, float]:
        runs_ = stages[name]
        return {k: med([r.get(k, 0.0) for r in runs_]) for k in runs_[0]}

    per_stage = {name: stage_medians(name) for name in stages}
    blocks_only = {  # the same speedup counted over block-range and feedback segments only
        name: sum(v for k, v in s.items() if k.startswith(("blocks_", "feedback")))
        for name, s in per_stage.items()
    }
    ratio = measured / ideal
    return {
        "plans": {p.name: {"steps": p.num_steps, "block_forwards": p.block_forwards} for p in (base, ilf)},
        "median_s": {k: med(v) for k, v in times.items()},
        "times_s": times,
        "stages_median_s": per_stage,
        "measured_speedup": measured,
        "ideal_speedup": ideal,
        "ratio": ratio,
        "cpu_median_s": {k: med(v) for k, v in cpu.items()},
        "ratio_cpu": med(cpu[base.name]) / med(cpu[ilf.name]) / ideal,
        "block_segments_speedup": blocks_only[base.name] / blocks_only[ilf.name],
        "block_share_of_base": blocks_only[base.name] / med(times[base.name]),
        "target": P1_TARGET,
        "met": ratio >= P1_TARGET,
        "finite": bool(all(np.isfinite(v).all() for v in latents.values())),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.backbone", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--quick", action="store_true", help="an 8-layer, 288-wide model and fewer runs")
    parser.add_argument("--parts", default="p1,p2,p3", help="comma-separated subset of p1,p2,p3")
    parser.add_argument("--runs", type=int, default=None, help="measured runs per variant (after 1 warmup)")
    parser.add_argument(
        "--threads", type=int, default=os.cpu_count() or 1, help="ORT intra-op = torch threads"
    )
    parser.add_argument("--layers", type=int, default=None, help="override the depth (default 28)")
    parser.add_argument(
        "--ort-no-spin", action="store_true", help="ORT sessions with intra-op spinning off (a diagnostic)"
    )
    parser.add_argument(
        "--prepare-only", action="store_true", help="build model, bundle and ONNX files, then stop"
    )
    parser.add_argument("--rebuild", action="store_true", help="rebuild the model directory and every export")
    args = parser.parse_args(argv)
    parts = {p.strip().lower() for p in args.parts.split(",") if p.strip()}
    if not parts <= {"p1", "p2", "p3"}:
        parser.error(f"unknown parts {sorted(parts - {'p1', 'p2', 'p3'})}")
    size = QUICK if args.quick else Size()
    if args.layers:
        size = Size(args.layers, size.heads, size.head_dim, size.caption_channels)
    torch.set_num_threads(args.threads)  # the same thread count as ORT's intra-op pool
    if args.ort_no_spin:
        no_spin_sessions()
    OUT.mkdir(parents=True, exist_ok=True)
    work = OUT / size.tag

    started = time.perf_counter()
    prep = prepare(work, size, args.rebuild, need_torch="p3" in parts and not args.prepare_only)
    result: dict[str, Any] = {
        "benchmark": "backbone",
        "command": " ".join(["python -m benchmarks.backbone", *(argv if argv is not None else sys.argv[1:])]),
        "size": {**asdict(size), "hidden": size.hidden},
        "resolution": RESOLUTION,
        "threads": args.threads,
        "ort_spinning": not args.ort_no_spin,
        "torch": torch.__version__,
        "prepare": prep["facts"],
    }
    import onnxruntime

    result["onnxruntime"] = onnxruntime.__version__
    if args.prepare_only:
        log(f"prepared {work}: {json.dumps(prep['facts'])}")
        return 0
    # Full mode: a base-20 run of the 611M model is minutes on 2 shared cores, so P1 gets 3 runs each.
    p1_runs, p2_runs, p3_runs = (2, 5, 5) if args.quick else (3, 9, 9)
    if args.runs:
        p1_runs = p2_runs = p3_runs = args.runs

    if "p3" in parts:
        log("P3: ORT vs torch on a 4-block probe")
        p3 = result["p3"] = run_p3(prep["model"], prep["probe"], size, args.threads, p3_runs)
        t = p3["median_s"]
        print(
            f"P3  ORT fp32 {t['ort_fp32'] * 1e3:.0f} ms, torch fp32 {t['torch_fp32'] * 1e3:.0f} ms, "
            f"torch bf16 {t['torch_bf16'] * 1e3:.0f} ms -> ORT/torch-fp32 {p3['ort_vs_torch_fp32']:.2f}x "
            f"(target >= {P3_TARGET}: {'met' if p3['met'] else 'MISSED'}); "
            f"ORT {p3['achieved_gflops']['ort_fp32']:.0f} GFLOP/s = "
            f"{p3['ort_fraction_of_fp32_peak']:.0%} of the fp32 GEMM peak "
            f"{p3['gemm_peak_gflops']['fp32_peak']:.0f} GFLOP/s; by CPU time "
            f"ORT/torch-fp32 {p3['ort_vs_torch_fp32_cpu']:.2f}x",
            flush=True,
        )
    prep["model"] = None
    gc.collect()  # the torch model (2.4 GB at full size) is not needed by P1/P2

    if parts & {"p1", "p2"}:
        from ilf_deploy.engines.backends import open_generator

        generator = open_generator(prep["bundle"], providers=["CPUExecutionProvider"], threads=args.threads)
        if "p2" in parts:
            log("P2: segmented step vs the monolithic backbone")
            p2 = result["p2"] = run_p2(generator, prep["monolith"], args.threads, p2_runs)
            t = p2["median_s"]
            print(
                f"P2  segmented {t['segmented'] * 1e3:.0f} ms vs monolith {t['monolith'] * 1e3:.0f} ms -> "
                f"overhead {p2['overhead']:+.1%} "
                f"(target <= {P2_TARGET:.0%}: {'met' if p2['met'] else 'MISSED'}); "
                f"by CPU time {p2['overhead_cpu']:+.1%}",
                flush=True,
            )
        if "p1" in parts:
            log("P1: ILF-10 vs base-20, interleaved end-to-end denoising")
            p1 = result["p1"] = run_p1(generator, p1_runs)
            t = p1["median_s"]
            print(
                f"P1  base-20 {t['base-20']:.2f} s, ilf-10 {t['ilf-10']:.2f} s -> measured "
                f"{p1['measured_speedup']:.3f}x / ideal {p1['ideal_speedup']:.3f}x = {p1['ratio']:.3f} "
                f"(target >= {P1_TARGET}: {'met' if p1['met'] else 'MISSED'}); "
                f"by CPU time {p1['ratio_cpu']:.3f}",
                flush=True,
            )
    result["elapsed_s"] = time.perf_counter() - started
    name = "backbone" + ("-quick" if args.quick else "") + ("-nospin" if args.ort_no_spin else "")
    path = OUT / f"{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
