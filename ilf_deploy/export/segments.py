"""Exportable torch modules, one per bundle segment, with fixed positional I/O.

Every segment takes and returns plain tensors named by the adapter (`Adapter.block_inputs`, ...),
so that the ONNX graphs, the manifest and the runtime agree on names without per-model code.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapters import Adapter
from ..ilf import FeedbackModule

if TYPE_CHECKING:
    from ..loading import LoadedModel


@dataclass(frozen=True)
class SegmentSpec:
    """One bundle segment: its module and the names of its inputs and outputs."""

    name: str
    module: nn.Module
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    blocks: tuple[int, int] | None = None  # inclusive block range of block segments
    keep_fp32: bool = False  # exported in fp32 whatever the bundle's precision


class EmbedSegment(nn.Module):
    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.adapter, self.transformer = adapter, adapter.transformer

    def forward(self, latents: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed_tokens(latents, pos_embed)


class ContextSegment(nn.Module):
    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.adapter, self.transformer = adapter, adapter.transformer

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.adapter.context(dict(zip(self.adapter.context_inputs, inputs, strict=True)))
        return tuple(out[name] for name in self.adapter.context_outputs)


class TimeSegment(nn.Module):
    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.adapter, self.transformer = adapter, adapter.transformer

    def forward(self, timestep: torch.Tensor, *context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.adapter.time_cond(
            timestep, dict(zip(self.adapter.time_context_inputs, context, strict=True))
        )
        return tuple(out[name] for name in self.adapter.time_outputs)


class BlocksSegment(nn.Module):
    """Blocks start..end. Inside the ILF loop it also takes `feed`: block i sees h + s_i * feed
    (eqs. 2–3), and feed = 0 gives the plain first pass, so one graph serves both passes."""

    def __init__(self, adapter: Adapter, start: int, end: int, feedback: FeedbackModule | None) -> None:
        super().__init__()
        self.adapter, self.start, self.end = adapter, start, end
        self.blocks = nn.ModuleList(adapter.blocks[start : end + 1])
        self.scales = None
        if feedback is not None:
            b, _ = feedback.loop
            self.scales = nn.Parameter(feedback.scales.detach()[start - b : end - b + 1].clone())

    def forward(self, hidden: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        if self.scales is not None:
            feed, args = args[0], args[1:]
        cond = dict(zip(self.adapter.block_inputs, args, strict=True))
        for i, block in enumerate(self.blocks):
            if self.scales is not None:
                hidden = hidden + self.scales[i] * feed
            hidden = self.adapter.run_block(block, {"hidden": hidden}, cond)["hidden"]
        return hidden


class FeedbackSegment(nn.Module):
    def __init__(self, adapter: Adapter, feedback: FeedbackModule) -> None:
        super().__init__()
        self.adapter, self.block = adapter, feedback.block

    def forward(self, hidden: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        cond = dict(zip(self.adapter.block_inputs, args, strict=True))
        return self.adapter.run_block(self.block, {"hidden": hidden}, cond)["hidden"]


class FinalSegment(nn.Module):
    """Final norm + projection to patch tokens (B, N, p·p·C); the runtime unpatchifies (a reshape)."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.adapter, self.transformer = adapter, adapter.transformer

    def forward(self, hidden: torch.Tensor, *args: torch.Tensor) -> torch.Tensor:
        cond = dict(zip(self.adapter.final_inputs, args, strict=True))
        return self.adapter.final_tokens({"hidden": hidden}, cond)


class TextEncoderSegment(nn.Module):
    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]


class VaeDecoderSegment(nn.Module):
    """Scaled latents -> images in [0, 1] (B, 3, H, W)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents / self.scaling).sample
        return (images / 2 + 0.5).clamp(0, 1)


def block_ranges(cut_points: list[int]) -> list[tuple[int, int]]:
    """Cut points [0, 8, 20, 28] -> inclusive block ranges [(0, 7), (8, 19), (20, 27)]."""
    return [(a, b - 1) for a, b in pairwise(cut_points)]


def segment_specs(model: LoadedModel, cut_points: list[int], with_feedback: bool) -> list[SegmentSpec]:
    """Every segment of a bundle cut at `cut_points`, in export order."""
    adapter, feedback = model.adapter, model.feedback if with_feedback else None
    loop = feedback.loop if feedback else None
    specs = [
        SegmentSpec("embed", EmbedSegment(adapter), ("latents", "pos_embed"), ("hidden",)),
        SegmentSpec("context", ContextSegment(adapter), adapter.context_inputs, adapter.context_outputs),
        SegmentSpec(
            "time", TimeSegment(adapter), ("timestep", *adapter.time_context_inputs), adapter.time_outputs
        ),
    ]
    for start, end in block_ranges(cut_points):
        inside = loop is not None and loop[0] <= start and end <= loop[1]
        module = BlocksSegment(adapter, start, end, feedback if inside else None)
        names = ("hidden", "feed", *adapter.block_inputs) if inside else ("hidden", *adapter.block_inputs)
        specs.append(
            SegmentSpec(f"blocks_{start:02d}_{end:02d}", module, names, ("hidden_out",), (start, end))
        )
    if feedback is not None:
        inputs = ("hidden", *adapter.block_inputs)
        specs.append(SegmentSpec("feedback", FeedbackSegment(adapter, feedback), inputs, ("feed",)))
    specs.append(SegmentSpec("final", FinalSegment(adapter), ("hidden", *adapter.final_inputs), ("tokens",)))
    if model.text_encoder is not None:
        # T5 overflows in fp16, so the text encoder always stays fp32 (as PixArt deployments do).
        module = TextEncoderSegment(model.text_encoder)
        inputs = ("input_ids", "attention_mask")
        specs.append(SegmentSpec("text_encoder", module, inputs, ("prompt_embeds",), keep_fp32=True))
    if model.vae is not None:
        decoder = VaeDecoderSegment(model.vae)
        specs.append(SegmentSpec("vae_decoder", decoder, ("latents",), ("images",), keep_fp32=True))
    return specs
