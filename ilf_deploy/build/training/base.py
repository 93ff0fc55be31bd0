"""Train the default model from scratch on CPU: a tiny VAE, a frozen random T5, a small PixArt-α.

`ilf-deploy train-base` runs these stages; `BaseRecipe` holds the settings the embedded model was
trained with, and `training.json` in the saved directory records them.

Stages (each resumable from its checkpoint in `work_dir`):
  vae          AutoencoderKL 64×64×3 -> 4×16×16 (L1 + MSE + a small KL)
  latents      encode the training images once (posterior means × scaling factor)
  transformer  PixArt-α epsilon prediction, 10% caption dropout to "" (for guidance), EMA weights
  save         a diffusers `PixArtAlphaPipeline` directory (real `save_pretrained`)
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ilf_deploy.build.training.common import (
    Deadline,
    add_noise,
    alphas_cumprod,
    cosine_lr,
    ema_update,
    load_checkpoint,
    log_line,
    save_checkpoint,
)
from ilf_deploy.build.training.recipe import RECIPE, BaseRecipe
from ilf_deploy.core.files import make_readable
from ilf_deploy.core.schedulers import PIXART_SCHEDULER_CONFIG
from ilf_deploy.model.data import IMAGE_SIZE, TRAIN_SEED, make_batch, to_tensor_range

MAX_LENGTH = 120  # PixArt-α's T5 length: what `TorchGenerator.encode_prompt` pads to
TRAIN_TEXT_LENGTH = 32  # captions are < 32 tokens; masked padding changes nothing (see encode_text)
VAE_CHANNELS = (16, 32, 64)  # 3 levels -> 64 px / 4 = 16×16 latents
T5_CONFIG: dict[str, Any] = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4)
TRANSFORMER_CONFIG: dict[str, Any] = dict(
    num_attention_heads=3,
    attention_head_dim=64,
    in_channels=4,
    out_channels=4,  # no learned sigma: plain epsilon prediction
    num_layers=8,
    sample_size=IMAGE_SIZE // 4,
    patch_size=2,
    norm_type="ada_norm_single",
    norm_eps=1e-6,
    norm_elementwise_affine=False,
    cross_attention_dim=192,
    caption_channels=T5_CONFIG["d_model"],
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    interpolation_scale=1,
    use_additional_conditions=False,
)


OnStep = Callable[[int, float], None]  # (steps done, loss)


def build_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * len(VAE_CHANNELS),
        up_block_types=("UpDecoderBlock2D",) * len(VAE_CHANNELS),
        block_out_channels=VAE_CHANNELS,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
        scaling_factor=1.0,  # replaced by 1/std of the training latents after VAE training
    )


def build_text(seed: int = 0):
    """(tokenizer, frozen random-init T5 encoder): PixArt freezes its T5 as well."""
    from ilf_deploy.model.tiny import word_text_encoder

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer, encoder = word_text_encoder(T5_CONFIG, MAX_LENGTH)
    return tokenizer, encoder.eval().requires_grad_(False)


def build_transformer(seed: int = 0):
    from diffusers import PixArtTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PixArtTransformer2DModel(**TRANSFORMER_CONFIG)


@torch.no_grad()
def encode_text(tokenizer, encoder, captions: list[str], length: int = TRAIN_TEXT_LENGTH):
    """T5 embeddings as `TorchGenerator.encode_prompt` computes them, but padded to `length`.

    The encoder's attention masks padding out and the transformer's cross-attention adds -10000 to
    it, so the embeddings of the real tokens are the same as at the full 120 and padding is inert.
    """
    tokens = tokenizer(
        [c.lower().strip() for c in captions],
        padding="max_length",
        max_length=length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    )
    embeds = encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
    return embeds, tokens.attention_mask


# -- VAE ---------------------------------------------------------------------------------------


def train_vae(
    work: Path,
    recipe: BaseRecipe = RECIPE,
    *,
    minutes: float | None = None,
    log: Path | None = None,
    on_step: OnStep | None = None,
):
    steps, batch, lr = recipe.vae_steps, recipe.vae_batch, recipe.vae_lr
    ckpt = work / "vae.pt"
    vae = build_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    start = 0
    if ckpt.exists():
        state = load_checkpoint(ckpt)
        vae.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        start = state["step"]
    deadline = Deadline(minutes)
    vae.train()
    step = start
    for step in range(start, steps):
        if deadline.passed():
            break
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 50)
        # Fresh images every step (index space is disjoint from nothing: the generator is infinite).
        x = to_tensor_range(make_batch(range(step * batch, (step + 1) * batch), TRAIN_SEED + 100).images)
        dist = vae.encode(x).latent_dist
        # Decode the posterior mean, as the diffusion model will see it (`encode_latents`): decoding
        # samples made the decoder fight the posterior noise and held PSNR near 20 dB. The small KL
        # keeps the latents' scale in check.
        rec = vae.decode(dist.mean).sample
        l1, mse = (rec - x).abs().mean(), (rec - x).pow(2).mean()
        kl = dist.kl().mean() / dist.mean[0].numel()
        loss = l1 + mse + 1e-4 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if on_step is not None:
            on_step(step + 1, loss.item())
        if step % 20 == 0:
            psnr = 10 * torch.log10(4.0 / mse.detach())
            log_line(log, f"vae step {step} loss {loss.item():.4f} psnr {psnr.item():.2f} kl {kl.item():.3f}")
        if (step + 1) % 100 == 0:
            save_checkpoint(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    save_checkpoint(ckpt, {"model": vae.state_dict(), "opt": opt.state_dict(), "step": step + 1})
    return vae.eval()


def load_vae(work: Path):
    vae = build_vae()
    vae.load_state_dict(load_checkpoint(work / "vae.pt")["model"])
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(work: Path, *, count: int, log: Path | None, chunk: int = 256) -> None:
    """Posterior means of `count` training images; sets the VAE scaling factor to 1/std."""
    vae = load_vae(work)
    latents, captions = [], []
    for start in range(0, count, chunk):
        b = make_batch(range(start, min(start + chunk, count)), TRAIN_SEED)
        latents.append(vae.encode(to_tensor_range(b.images)).latent_dist.mean)
        captions += b.captions
        log_line(log, f"latents {start + len(b.captions)}/{count}")
    z = torch.cat(latents)
    scale = float(1.0 / z.std())
    torch.save({"latents": z * scale, "captions": captions, "scaling_factor": scale}, work / "latents.pt")
    log_line(log, f"latents std {z.std().item():.4f} mean {z.mean().item():.4f} -> scaling {scale:.5f}")


# -- transformer --------------------------------------------------------------------------------


def train_transformer(
    work: Path,
    recipe: BaseRecipe = RECIPE,
    *,
    minutes: float | None = None,
    log: Path | None = None,
    on_step: OnStep | None = None,
    caption_dropout: float = 0.1,
    seed: int = 0,
):
    steps, batch, lr = recipe.steps, recipe.batch, recipe.lr
    data = torch.load(work / "latents.pt", weights_only=False)
    latents, captions = data["latents"], data["captions"]
    tokenizer, encoder = build_text(seed)
    null_embeds, null_mask = encode_text(tokenizer, encoder, [""])
    model = build_transformer(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    ckpt = work / "transformer.pt"
    start = _resume(ckpt, model, ema, opt)
    ac = alphas_cumprod()
    gen = torch.Generator().manual_seed(seed + start)  # resumed runs continue with fresh draws
    deadline = Deadline(minutes)
    model.train()
    step = start
    for step in range(start, steps):
        if deadline.passed():
            break
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, steps, lr, 200)  # decaying to 10 % matters in short runs
        idx = torch.randint(len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        embeds, mask = encode_text(tokenizer, encoder, [captions[i] for i in idx.tolist()])
        drop = torch.rand(batch, generator=gen) < caption_dropout  # the empty prompt, for guidance
        embeds = torch.where(drop[:, None, None], null_embeds.expand_as(embeds), embeds)
        mask = torch.where(drop[:, None], null_mask.expand_as(mask), mask)
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (batch,), generator=gen)
        xt = add_noise(x0, noise, t.float(), ac)
        pred = model(
            xt,
            encoder_hidden_states=embeds,
            encoder_attention_mask=mask,
            timestep=t,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
        ).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, step)
        if on_step is not None:
            on_step(step + 1, loss.item())
        if step % 20 == 0:
            log_line(log, f"transformer step {step} loss {loss.item():.4f}")
        if (step + 1) % 100 == 0:
            _save(ckpt, model, ema, opt, step + 1)
    _save(ckpt, model, ema, opt, step + 1)
    return ema.eval()


def _resume(ckpt: Path, model, ema, opt) -> int:
    """The step to start from: the checkpoint's, with its weights and optimiser loaded (else 0)."""
    if not ckpt.exists():
        return 0
    state = load_checkpoint(ckpt)
    model.load_state_dict(state["model"])
    ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["opt"])
    return int(state["step"])


def _save(ckpt: Path, model, ema, opt, step: int) -> None:
    state = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict()}
    save_checkpoint(ckpt, {**state, "step": step})


# -- save ---------------------------------------------------------------------------------------


def save_pipeline(
    work: Path, out_dir: Path, *, recipe: BaseRecipe = RECIPE, seed: int = 0, use_ema: bool = True
) -> Path:
    """Write the trained parts as a `PixArtAlphaPipeline` directory (keeps an existing feedback/)."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline

    from ilf_deploy.model.tiny import _portable_tokenizer

    vae = load_vae(work)
    vae.register_to_config(
        scaling_factor=torch.load(work / "latents.pt", weights_only=False)["scaling_factor"]
    )
    tokenizer, encoder = build_text(seed)
    transformer = build_transformer(seed)
    transformer.load_state_dict(load_checkpoint(work / "transformer.pt")["ema" if use_ema else "model"])
    scheduler_config = {k: v for k, v in PIXART_SCHEDULER_CONFIG.items() if not k.startswith("_")}
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=encoder,
        vae=vae,
        transformer=transformer.eval(),
        scheduler=DPMSolverMultistepScheduler(**scheduler_config),
    )
    out_dir = Path(out_dir)
    keep = out_dir / "feedback"
    saved_feedback = None
    if keep.is_dir():  # a re-save of the base model must not drop a trained feedback
        saved_feedback = work / "feedback.keep"
        shutil.rmtree(saved_feedback, ignore_errors=True)
        shutil.copytree(keep, saved_feedback)
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        shutil.rmtree(out_dir / sub, ignore_errors=True)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    make_readable(out_dir)  # safetensors writes 0600
    _portable_tokenizer(out_dir, MAX_LENGTH)
    if saved_feedback is not None and not keep.is_dir():
        shutil.copytree(saved_feedback, keep)
    (out_dir / "training.json").write_text(
        json.dumps(
            {
                "dataset": "ilf_deploy.model.data (captioned shapes, 64x64)",
                "vae": {"block_out_channels": list(VAE_CHANNELS)},
                "text_encoder": {"random_init_frozen_seed": seed, **T5_CONFIG},
                "transformer_params": sum(p.numel() for p in transformer.parameters()),
                "recipe": asdict(recipe),
                "vae_steps_done": load_checkpoint(work / "vae.pt")["step"],
                "steps": load_checkpoint(work / "transformer.pt")["step"],
            },
            indent=2,
        )
        + "\n"
    )
    return out_dir
