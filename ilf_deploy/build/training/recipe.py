"""The embedded default model's training settings, importable without torch (the CLI's defaults)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BaseRecipe:
    """The default model's training settings (≈ 13 min VAE + 80 min transformer on 2 CPU cores)."""

    vae_steps: int = 2000
    vae_batch: int = 16
    vae_lr: float = 1e-3
    latents: int = 20000  # training images encoded once (the transformer stage samples from them)
    steps: int = 9000
    batch: int = 32
    lr: float = 1e-3


RECIPE = BaseRecipe()
