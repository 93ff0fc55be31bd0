"""The adapter interface: one diffusion transformer forward, cut at block boundaries.

A forward is `final(blocks(embed(latents, cond)), cond)`, where `cond` (per-timestep conditioning)
is computed separately so that ILF can condition the blocks after the feedback on `t_post`.
Conditioning is a flat dict of tensors so that every segment can be exported as-is.

What flows from block to block is the model's **state**: a dict of named tensors the adapter
declares in `state_names`. A single-stream DiT (PixArt, DiT) carries its image tokens, `hidden`
(B, N, D) — Sana its token grid, `hidden` (B, h, w, D), whose shape tells its blocks the grid; a
two-stream MMDiT (SD3, Flux) carries image tokens and text tokens, `hidden` and `text`. Every
consumer (block ranges, the ILF inner loop, the Δ-cache, the adaptive probe) treats a state as a
whole: the same operation on each of its tensors.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

Cond = dict[str, torch.Tensor]
State = dict[str, torch.Tensor]  # the model's state between blocks, by `Adapter.state_names`


@dataclass(frozen=True)
class LatentShape:
    channels: int
    height: int
    width: int


class Adapter(ABC):
    """Wraps a diffusers transformer; architecture differences live only in subclasses."""

    architecture: str
    # Names of the conditioning tensors, in a fixed order: they become the ONNX segments' I/O names.
    context_inputs: tuple[str, ...]  # what carries the prompt (PixArt) or the class (DiT)
    context_outputs: tuple[str, ...]  # what `context()` returns
    time_context_inputs: tuple[str, ...]  # context entries that `time_cond()` reads
    time_outputs: tuple[str, ...]  # what `time_cond()` returns
    block_inputs: tuple[str, ...]  # conditioning a block reads
    final_inputs: tuple[str, ...]  # conditioning the final layer reads
    state_names: tuple[str, ...] = ("hidden",)  # the state between blocks (module docstring)
    # State tensors that start as a conditioning entry, not from `embed_tokens` (an MMDiT's text
    # stream starts as the projected prompt): state name -> conditioning name.
    state_init: dict[str, str] = {}  # noqa: RUF012 (read-only)
    # How the final layer's tokens hold a patch: "patch" (p, p, C) as PixArt/DiT/SD3 unpatchify, or
    # "packed" (C, 2, 2) as Flux packs its latents.
    token_layout = "patch"
    uses_positions = True  # embed reads a host-computed positional table (`pos_embed`, positions/)
    # The block attribute holding a cross-attention whose K and V project only the conditioning entry
    # `cross_context` (a caption): a bundle computes them once per image (build/export/cross_kv.py).
    cross_attention: str | None = None
    cross_context = "context"

    def __init__(self, transformer: nn.Module) -> None:
        self.transformer = transformer

    # -- shape facts -----------------------------------------------------------------------
    @property
    def config(self):  # diffusers FrozenDict
        return self.transformer.config

    @property
    def blocks(self) -> nn.ModuleList:
        return self.transformer.transformer_blocks

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    @property
    def latent_channels(self) -> int:
        return int(self.config.in_channels)

    @property
    def out_channels(self) -> int:
        return int(self.transformer.out_channels)

    @property
    def learned_sigma(self) -> bool:
        return self.out_channels == 2 * self.latent_channels

    @property
    def patch_size(self) -> int:
        return int(self.config.patch_size)

    @property
    def sample_size(self) -> int:
        return int(self.config.sample_size)

    @property
    def patch_embedding(self) -> nn.Module:
        """The diffusers `PatchEmbed` (patch projection and positional table)."""
        return self.transformer.pos_embed

    # -- the cut forward -------------------------------------------------------------------
    def embed(self, latents: torch.Tensor, cond: Cond) -> State:
        """The state before block 0: (B, C, H, W) -> {"hidden": tokens (B, N, D)}. Time-independent."""
        return {"hidden": self.embed_tokens(latents, self.pos_embed(latents.shape[-2], latents.shape[-1]))}

    def embed_tokens(self, latents: torch.Tensor, pos_embed: torch.Tensor) -> torch.Tensor:
        """The patch projection with the positional embedding given: exports with any resolution."""
        patch = self.patch_embedding
        tokens = patch.proj(latents).flatten(2).transpose(1, 2)
        if patch.layer_norm:
            tokens = patch.norm(tokens)
        return (tokens + pos_embed).to(tokens.dtype)

    def pos_embed(self, height: int, width: int) -> torch.Tensor:
        """(1, N, D) sin-cos positions for a latent of height x width, as diffusers' PatchEmbed."""
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        patch = self.patch_embedding
        h, w = height // self.patch_size, width // self.patch_size
        if (patch.height, patch.width) == (h, w):
            return patch.pos_embed
        pos = get_2d_sincos_pos_embed(
            embed_dim=patch.pos_embed.shape[-1],
            grid_size=(h, w),
            base_size=patch.base_size,
            interpolation_scale=patch.interpolation_scale,
            output_type="pt",
        )
        return pos.float().unsqueeze(0)

    @abstractmethod
    def context(self, inputs: Cond) -> Cond:
        """Time-independent conditioning shared by every block (projected caption, class labels...)."""

    @abstractmethod
    def time_cond(self, timestep: torch.Tensor, context: Cond) -> Cond:
        """Per-timestep conditioning; computed once for `t` and once for `t_post`."""

    @abstractmethod
    def run_block(self, block: nn.Module, state: State, cond: Cond) -> State:
        """One transformer block (a backbone block or the feedback block): state in, state out."""

    @abstractmethod
    def final_tokens(self, state: State, cond: Cond) -> torch.Tensor:
        """Final norm + projection -> patch tokens (B, N, p·p·C_out)."""

    def final(self, state: State, cond: Cond, height: int, width: int) -> torch.Tensor:
        """Final layer + unpatchify -> model output (B, C_out, height, width)."""
        return self.unpatchify(self.final_tokens(state, cond), height, width)

    def block(self, index: int, state: State, cond: Cond) -> State:
        return self.run_block(self.blocks[index], state, cond)

    def conditioning(self, timestep: torch.Tensor, context: Cond) -> Cond:
        """Everything a block or the final layer needs at `timestep` (a scalar or (1,) tensor)."""
        batch = context[self.context_outputs[0]].shape[0]
        return {**context, **self.time_cond(timestep.reshape(-1).expand(batch), context)}

    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, inputs: Cond) -> torch.Tensor:
        """The plain forward, composed from the pieces (equal to the diffusers forward)."""
        cond = self.conditioning(timestep, self.context(inputs))
        state = self.embed(latents, cond)
        for index in range(self.num_blocks):
            state = self.block(index, state, cond)
        return self.final(state, cond, latents.shape[-2], latents.shape[-1])

    def feedback_template(self, loop_end: int) -> int:
        """The block whose class and config the feedback block of a loop ending at `loop_end` takes."""
        return 0

    def make_feedback_block(self, loop_end: int = 0) -> nn.Module:
        """A new block of the backbone's class and config (the ILF feedback module's body)."""
        block = copy.deepcopy(self.blocks[self.feedback_template(loop_end)])
        for module in block.modules():
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:  # e.g. PixArt's scale_shift_table: re-draw as diffusers initialises it
                for param in module.parameters(recurse=False):
                    nn.init.normal_(param, std=param.shape[-1] ** -0.5)
        return block

    # -- helpers for subclasses ------------------------------------------------------------
    def unpatchify(self, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
        p, c = self.patch_size, self.out_channels
        h, w = height // p, width // p
        x = tokens.reshape(-1, h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(-1, c, h * p, w * p)
