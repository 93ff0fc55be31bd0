"""Caption cross-attention keys and values computed once per image, not in every block forward.

A caption cross-attention (PixArt's and Sana's `attn2`) projects only the caption into its K and V:
they are the same at every step, in both passes of an ILF step and in every block forward a plan
runs. A bundle built with `cache_cross_kv` (the default) has a `cross_kv` segment that computes
them once per generation, after `context`: one output per block, `context_kv_NN` = [K | V] along
the last axis (`context_kv_feedback` for the feedback block), and each block segment reads its
blocks' entries in place of the projected caption. A PixArt-XL block at 256 px then does 6 % fewer
FLOPs (120 caption tokens; 14 % with PixArt-Σ's 300). `cross_kv` runs in bf16 where the blocks do
(an engine's bf16 hint, the bf16 policy) but is never quantized (it runs once per image:
`Manifest.quantizable_segments`), and its manifest is schema 7 (core/runtime/manifest.py): older
readers refuse it in one line rather than miss the segment.

Inside a block segment, a block reads [K | V] through a view of itself whose attention's `to_k` and
`to_v` are column slices (`reading_cached_kv`): the diffusers processor still calls
`attn.to_k(encoder_hidden_states)`, so any processor that projects K and V from the same input works,
and the model's own modules are left as they are.
"""

from __future__ import annotations

import copy

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ilf_deploy.model.adapters import Adapter, Cond

KV_PREFIX = "context_kv_"
FEEDBACK = "feedback"


def kv_name(block: int | str) -> str:
    """The conditioning entry holding block `block`'s [K | V] (an index, or "feedback")."""
    return f"{KV_PREFIX}{block:02d}" if isinstance(block, int) else f"{KV_PREFIX}{block}"


def is_kv_name(name: str) -> bool:
    return name.startswith(KV_PREFIX)


def _cross_attention(adapter: Adapter, block: nn.Module) -> Attention | None:
    """The block's caption cross-attention, if its K and V are plain projections of the caption."""
    if adapter.cross_attention is None:
        return None
    attn = getattr(block, adapter.cross_attention)  # the adapter names the block's attribute
    plain = (
        isinstance(attn, Attention)
        and isinstance(attn.to_k, nn.Linear)
        and isinstance(attn.to_v, nn.Linear)
        and attn.norm_cross is None  # a norm on the caption first: not a plain projection
    )
    return attn if plain else None


def cached_attentions(adapter: Adapter, feedback_block: nn.Module | None) -> dict[str, Attention]:
    """Entry name -> cross-attention for every block (and the feedback block), or {} where a block
    has none to cache (DiT, SD3, Flux: their blocks read no caption-only K/V)."""
    blocks: list[tuple[int | str, nn.Module]] = list(enumerate(adapter.blocks))
    if feedback_block is not None:
        blocks.append((FEEDBACK, feedback_block))
    found = {kv_name(key): _cross_attention(adapter, block) for key, block in blocks}
    return {} if None in found.values() else found  # type: ignore[return-value]


class KVProjection(nn.Module):
    """One cross-attention's [K | V] (B, L, k + v) of the caption (B, L, D), with the attention's own
    `to_k` and `to_v` (shared, not copied)."""

    def __init__(self, attention: Attention) -> None:
        super().__init__()
        self.to_k, self.to_v = attention.to_k, attention.to_v

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.to_k(context), self.to_v(context)], dim=-1)


def project_kv(attention: Attention, context: torch.Tensor) -> torch.Tensor:
    """[K | V] (B, L, k + v) of the caption `context` (B, L, D)."""
    return KVProjection(attention)(context)


class _Columns(nn.Module):
    """x[..., start:stop]: stands in for `to_k` / `to_v` where [K | V] arrives precomputed."""

    def __init__(self, start: int, stop: int) -> None:
        super().__init__()
        self.start, self.stop = start, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[..., self.start : self.stop]


def reading_cached_kv(adapter: Adapter, block: nn.Module) -> nn.Module:
    """A view of `block` whose cross-attention takes [K | V] where it took the caption; it shares
    every other module and parameter with `block`, which stays as it was."""
    name = adapter.cross_attention
    assert name is not None and _cross_attention(adapter, block) is not None  # cached_attentions checked
    attn = getattr(block, name)
    keys = attn.to_k.out_features
    attn_view = copy.copy(attn)  # a shallow copy: its own module table, the same submodules
    attn_view._modules = {
        **attn._modules,
        "to_k": _Columns(0, keys),
        "to_v": _Columns(keys, keys + attn.to_v.out_features),
    }
    view = copy.copy(block)
    view._modules = {**block._modules, name: attn_view}
    return view


def with_kv(adapter: Adapter, cond: Cond, name: str) -> Cond:
    """`cond` with the entry the cross-attention reads replaced by a block's [K | V]."""
    return {**cond, adapter.cross_context: cond[name]}


def block_cond_names(adapter: Adapter, kv_names: tuple[str, ...]) -> tuple[str, ...]:
    """A block segment's conditioning inputs: the adapter's, with the caption replaced by `kv_names`."""
    if not kv_names:
        return adapter.block_inputs
    return tuple(x for n in adapter.block_inputs for x in (kv_names if n == adapter.cross_context else (n,)))
