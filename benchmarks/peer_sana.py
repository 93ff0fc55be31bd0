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

import shutil
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import peer_mmdit

OUT = Path("out/bench")
PROMPT, SEED = peer_mmdit.PROMPT, peer_mmdit.SEED  # the target and tolerance are peer_mmdit's too
SIZE, GUIDANCE = 512, 4.5


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

    from ilf_deploy.core.plan import default_loop
    from ilf_deploy.model.adapters import make_adapter
    from ilf_deploy.model.ilf import FEEDBACK_DIR, FeedbackModule
    from ilf_deploy.model.tiny import make_tiny_pipeline

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


def prepare(work: Path, args: Any, modes: list[str]) -> tuple[Path, Path]:
    """The model directory and its bundle (base-N, ilf-N, cache-N at 512 px, fp32, with the torch
    model for tune's torch candidates) and variants; each made once and reused."""
    model_kwargs = {"quick": args.quick, "depth": args.sana_depth}
    write_model = "benchmarks.peer_sana:build_model_dir"
    return peer_mmdit.prepare_dirs(work, write_model, model_kwargs, args, SIZE, modes)


def diffusers_runner(model_dir: Path, steps: int, dtype: Any, compile: bool = False):
    import diffusers
    import torch

    from ilf_deploy.model.loading import quiet_huggingface

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


def main(args: Any) -> int:
    steps, quick, depth = args.steps, args.quick, args.sana_depth
    runs = args.runs or 2
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    work = OUT / "peer-sana" / ("quick" if quick else str(depth))
    # Each stage in a child process (benchmarks/stages.py): this one stays fresh for timing torch.
    model_dir, bundle_dir = prepare(work, args, modes)
    if args.prepare_only:
        return 0
    return peer_mmdit.measure(
        args, "sana", "quick" if quick else f"{depth} of 28 blocks, full width", model_dir, bundle_dir, runs,
        lambda dtype, compile=False: diffusers_runner(model_dir, steps, dtype, compile),
        lambda generator, plan: peer_mmdit.ours_runner(generator, plan, GUIDANCE, SIZE), SIZE,
    )  # fmt: skip
