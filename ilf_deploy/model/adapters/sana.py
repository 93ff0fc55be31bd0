"""Sana (`SanaTransformer2DModel`): linear self-attention, Gemma-2 caption cross-attention, Mix-FFN.

Single-stream like PixArt (adaLN-single, a projected caption every block cross-attends to), but the
feed-forward (`GLUMBConv`) runs a 3x3 depthwise convolution over the token **grid**, so a block
needs the grid's height and width. They travel in the state's shape: Sana's state is
`{"hidden": (B, h, w, D)}` (tokens in row-major grid order), and a block flattens it to (B, h·w, D)
around the diffusers block with `height, width = hidden.shape[1:3]`. An exported block range
therefore stays resolution-dynamic without any extra input, and every state consumer (ILF, the
Δ-cache, the adaptive probe) keeps working elementwise on whole tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.model.adapters.base import Adapter, Cond, State


class SanaAdapter(Adapter):
    """Mirrors `SanaTransformer2DModel.forward` as `SanaPipeline` calls it, cut at block boundaries.

    Inputs: `prompt_embeds` (B, L, caption_channels) — Gemma-2's last hidden states after the
    pipeline's select-index (loading.SanaPromptFormat) — and `prompt_mask` (B, L), 1 = keep.
    `SanaPipeline` multiplies the timestep by the config's `timestep_scale` before the
    transformer; `time_cond` does the same.
    Guidance-embedding configs (Sana-Sprint, `SanaSprintPipeline`) are refused.
    """

    architecture = "sana"
    context_inputs = ("prompt_embeds", "prompt_mask")
    context_outputs = ("context", "context_bias")
    time_context_inputs = ()
    time_outputs = ("temb", "temb_final")
    block_inputs = ("context", "context_bias", "temb")
    cross_attention = "attn2"  # the caption cross-attention (build/export/cross_kv.py)
    final_inputs = ("temb_final",)

    def __init__(self, transformer: nn.Module) -> None:
        if transformer.config.guidance_embeds:
            raise ConfigError(
                "Sana with a guidance embedding (Sana-Sprint) is not supported, only SanaPipeline models"
            )
        super().__init__(transformer)

    @property
    def out_channels(self) -> int:
        return int(self.config.out_channels or self.config.in_channels)  # the transformer's own default

    @property
    def patch_embedding(self) -> nn.Module:
        return self.transformer.patch_embed

    @property
    def uses_positions(self) -> bool:  # type: ignore[override]
        # Sana 0.6B/1.6B have no positional embedding (interpolation_scale None); Sana 4K has sin-cos.
        return self.patch_embedding.pos_embed is not None

    def embed(self, latents: torch.Tensor, cond: Cond) -> State:
        pos = self.pos_embed(latents.shape[-2], latents.shape[-1]) if self.uses_positions else None
        return {"hidden": self.embed_tokens(latents, pos)}

    def embed_tokens(self, latents: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        """The token grid (B, h, w, D), the state itself (the bundle's embed segment exports this)."""
        h, w = latents.shape[-2] // self.patch_size, latents.shape[-1] // self.patch_size
        tokens = self.patch_embedding.proj(latents).flatten(2).transpose(1, 2)
        tokens = tokens if pos_embed is None else (tokens + pos_embed).to(tokens.dtype)
        return tokens.unflatten(1, (h, w))

    def context(self, inputs: Cond) -> Cond:
        t = self.transformer
        context = t.caption_norm(t.caption_projection(inputs["prompt_embeds"]))
        # The bias the diffusers forward builds from a (B, L) mask: 0 keep, -10000 drop.
        bias = ((1 - inputs["prompt_mask"].to(context.dtype)) * -10000.0).unsqueeze(1)
        return {"context": context, "context_bias": bias}

    def time_cond(self, timestep: torch.Tensor, context: Cond) -> Cond:
        timestep = timestep * self.config.timestep_scale  # as SanaPipeline scales it
        temb, embedded = self.transformer.time_embed(
            timestep, batch_size=timestep.shape[0], hidden_dtype=self.dtype
        )
        return {"temb": temb, "temb_final": embedded}

    def run_block(self, block: nn.Module, state: State, cond: Cond) -> State:
        grid = state["hidden"]
        height, width = grid.shape[1], grid.shape[2]
        hidden = block(
            grid.flatten(1, 2),
            None,
            cond["context"],
            cond["context_bias"],
            cond["temb"],
            height,
            width,
        )
        return {"hidden": hidden.unflatten(1, (height, width))}

    def final_tokens(self, state: State, cond: Cond) -> torch.Tensor:
        t = self.transformer
        hidden = t.norm_out(state["hidden"].flatten(1, 2), cond["temb_final"], t.scale_shift_table)
        return t.proj_out(hidden)
