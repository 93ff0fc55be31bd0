"""Pieces shared by the training loops: DDPM noising, checkpoints, progress, timing."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch

from ilf_deploy.core.files import atomic_file

NUM_TRAIN_TIMESTEPS = 1000


def alphas_cumprod(num_train: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """The PixArt/DiT training schedule: linear betas 1e-4..0.02 (float64 like diffusers, then fp32)."""
    betas = torch.linspace(1e-4, 0.02, num_train, dtype=torch.float64)
    return torch.cumprod(1.0 - betas, 0).float()


def add_noise(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, ac: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) ε, with a float t interpolated between integer steps."""
    t = t.clamp(0, len(ac) - 1)
    lo = t.floor().long()
    hi = (lo + 1).clamp(max=len(ac) - 1)
    w = (t - lo.float()).view(-1, 1, 1, 1)
    a = ac[lo].view(-1, 1, 1, 1) * (1 - w) + ac[hi].view(-1, 1, 1, 1) * w
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


class NoiseSchedule:
    """How training noises a clean latent to time t, and what the model predicts there: the VP
    schedule's ε (PixArt, DiT; `ac` = ᾱ) or, for rectified-flow models (SD3, Flux: `ac` None),
    x_t = (1 - σ) x0 + σ ε with σ = t / num_train and the velocity ε - x0."""

    def __init__(self, ac: torch.Tensor | None, num_train: int = NUM_TRAIN_TIMESTEPS) -> None:
        self.ac, self.num_train = ac, num_train

    def add(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.ac is not None:
            return add_noise(x0, noise, t, self.ac)
        sigma = (t / self.num_train).view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
        return (1 - sigma) * x0 + sigma * noise

    def target(self, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return noise if self.ac is not None else noise - x0


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic (files.atomic_file): a kill mid-save keeps the previous checkpoint."""
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=False)


def warmup_lr(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(warmup, 1))


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return warmup_lr(step, base, warmup)
    progress = (step - warmup) / max(total - warmup, 1)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Deadline:
    """Stop a training run cleanly (checkpoint + save) after `minutes` of wall time."""

    def __init__(self, minutes: float | None) -> None:
        self.end = None if minutes is None else time.monotonic() + 60 * minutes

    def passed(self) -> bool:
        return self.end is not None and time.monotonic() > self.end


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float = 0.999) -> None:
    # Warm-up decay: early averages would otherwise be dominated by the random init.
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.mul_(d).add_(pm.detach(), alpha=1 - d)


def log_line(path: Path | None, text: str) -> None:
    print(text, flush=True)
    if path is not None:
        with open(path, "a") as f:
            f.write(text + "\n")
