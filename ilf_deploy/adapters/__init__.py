"""Model adapters: the only place where PixArt and DiT differ."""

from __future__ import annotations

from torch import nn

from ..errors import ConfigError
from .base import Adapter, Cond
from .dit import DiTAdapter
from .pixart import PixArtAdapter

ARCHITECTURES = ("pixart-alpha", "pixart-sigma", "dit")

# diffusers class names -> our architecture names
PIPELINE_ARCHITECTURES = {
    "PixArtAlphaPipeline": "pixart-alpha",
    "PixArtSigmaPipeline": "pixart-sigma",
    "DiTPipeline": "dit",
}
TRANSFORMER_ARCHITECTURES = {
    "PixArtTransformer2DModel": "pixart-alpha",  # α and Σ share the class; the pipeline tells them apart
    "DiTTransformer2DModel": "dit",
}


def make_adapter(architecture: str, transformer: nn.Module) -> Adapter:
    if architecture in ("pixart-alpha", "pixart-sigma"):
        return PixArtAdapter(transformer, architecture)
    if architecture == "dit":
        return DiTAdapter(transformer)
    raise ConfigError(f"unknown architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")


__all__ = [
    "ARCHITECTURES",
    "PIPELINE_ARCHITECTURES",
    "TRANSFORMER_ARCHITECTURES",
    "Adapter",
    "Cond",
    "DiTAdapter",
    "PixArtAdapter",
    "make_adapter",
]
