"""PixArt-α and PixArt-Σ (`PixArtTransformer2DModel`): adaLN-single, T5 caption cross-attention."""

from __future__ import annotations

import torch
from torch import nn

from ilf_deploy.model.adapters.base import Adapter, Cond, State


class PixArtAdapter(Adapter):
    """Mirrors `PixArtTransformer2DModel.forward`, cut at block boundaries.

    Inputs: `prompt_embeds` (B, L, caption_channels) from T5, `prompt_mask` (B, L) 1 = keep, and for
    models with resolution/aspect-ratio conditions (PixArt-α 1024) `resolution` (B, 2) = (height, width)
    in pixels and `aspect_ratio` (B, 1) = height / width.
    """

    architecture = "pixart"
    block_inputs = ("context", "context_bias", "temb")
    cross_attention = "attn2"  # the caption cross-attention (build/export/cross_kv.py)
    final_inputs = ("temb_final",)
    time_outputs = ("temb", "temb_final")

    def __init__(self, transformer: nn.Module, architecture: str = "pixart-alpha") -> None:
        super().__init__(transformer)
        self.architecture = architecture

    @property
    def uses_size_conditions(self) -> bool:
        return bool(self.transformer.use_additional_conditions)

    @property
    def context_inputs(self) -> tuple[str, ...]:
        return ("prompt_embeds", "prompt_mask", *self.time_context_inputs)

    # (`context()` also passes the size conditions through, but they are inputs, not outputs.)
    context_outputs = ("context", "context_bias")

    @property
    def time_context_inputs(self) -> tuple[str, ...]:
        return ("resolution", "aspect_ratio") if self.uses_size_conditions else ()

    @property
    def max_sequence_length(self) -> int:
        # The text lengths the original pipelines use: PixArt-α 120 tokens, PixArt-Σ 300.
        return 300 if self.architecture == "pixart-sigma" else 120

    def context(self, inputs: Cond) -> Cond:
        embeds = inputs["prompt_embeds"]
        mask = inputs["prompt_mask"]
        context = self.transformer.caption_projection(embeds)
        # The same bias the diffusers forward builds from a (B, L) mask: 0 keep, -10000 drop.
        bias = ((1 - mask.to(context.dtype)) * -10000.0).unsqueeze(1)
        out = {"context": context, "context_bias": bias}
        for name in self.time_context_inputs:  # size conditions pass through to the time embedding
            out[name] = inputs[name].to(context.dtype)
        return out

    def time_cond(self, timestep: torch.Tensor, context: Cond) -> Cond:
        sizes = None
        if self.uses_size_conditions:
            sizes = {"resolution": context["resolution"], "aspect_ratio": context["aspect_ratio"]}
        temb, embedded = self.transformer.adaln_single(
            timestep, sizes, batch_size=timestep.shape[0], hidden_dtype=self.dtype
        )
        return {"temb": temb, "temb_final": embedded}

    def run_block(self, block: nn.Module, state: State, cond: Cond) -> State:
        hidden = block(
            state["hidden"],
            encoder_hidden_states=cond["context"],
            encoder_attention_mask=cond["context_bias"],
            timestep=cond["temb"],
        )
        return {"hidden": hidden}

    def final_tokens(self, state: State, cond: Cond) -> torch.Tensor:
        t = self.transformer
        shift, scale = (t.scale_shift_table[None] + cond["temb_final"][:, None]).chunk(2, dim=1)
        return t.proj_out(t.norm_out(state["hidden"]) * (1 + scale) + shift)
