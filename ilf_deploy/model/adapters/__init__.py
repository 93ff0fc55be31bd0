"""Model adapters: the only place where the model families differ."""

from __future__ import annotations

from torch import nn

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.state import feed_name, output_name
from ilf_deploy.model.adapters.base import Adapter, Cond, State
from ilf_deploy.model.adapters.dit import DiTAdapter
from ilf_deploy.model.adapters.mmdit import FluxAdapter, SD3Adapter
from ilf_deploy.model.adapters.pixart import PixArtAdapter
from ilf_deploy.model.adapters.sana import SanaAdapter

ARCHITECTURES = ("pixart-alpha", "pixart-sigma", "dit", "sd3", "flux", "sana")

# diffusers class names -> our architecture names
PIPELINE_ARCHITECTURES = {
    "PixArtAlphaPipeline": "pixart-alpha",
    "PixArtSigmaPipeline": "pixart-sigma",
    "DiTPipeline": "dit",
    "StableDiffusion3Pipeline": "sd3",
    "FluxPipeline": "flux",
    "SanaPipeline": "sana",
}
TRANSFORMER_ARCHITECTURES = {
    "PixArtTransformer2DModel": "pixart-alpha",  # α and Σ share the class; the pipeline tells them apart
    "DiTTransformer2DModel": "dit",
    "SD3Transformer2DModel": "sd3",
    "FluxTransformer2DModel": "flux",
    "SanaTransformer2DModel": "sana",
}
# Two-stream families: their state is image and text tokens (model/adapters/mmdit.py); their segments
# export with fixed-length text (build/export/onnx.py `axes_kind`).
MMDIT_ARCHITECTURES = ("sd3", "flux")


def make_adapter(architecture: str, transformer: nn.Module) -> Adapter:
    if architecture in ("pixart-alpha", "pixart-sigma"):
        return PixArtAdapter(transformer, architecture)
    if architecture == "dit":
        return DiTAdapter(transformer)
    if architecture == "sd3":
        return SD3Adapter(transformer)
    if architecture == "flux":
        return FluxAdapter(transformer)
    if architecture == "sana":
        return SanaAdapter(transformer)
    raise ConfigError(f"unknown architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")


__all__ = [
    "ARCHITECTURES",
    "MMDIT_ARCHITECTURES",
    "PIPELINE_ARCHITECTURES",
    "TRANSFORMER_ARCHITECTURES",
    "Adapter",
    "Cond",
    "DiTAdapter",
    "FluxAdapter",
    "PixArtAdapter",
    "SD3Adapter",
    "SanaAdapter",
    "State",
    "feed_name",
    "make_adapter",
    "output_name",
]
