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

from ilf_deploy.build.export.cross_kv import (
    FEEDBACK,
    KVProjection,
    block_cond_names,
    cached_attentions,
    kv_name,
    reading_cached_kv,
    with_kv,
)
from ilf_deploy.core.runtime.manifest import CROSS_KV_SEGMENT
from ilf_deploy.core.state import add_scaled
from ilf_deploy.model.adapters import Adapter, feed_name, output_name
from ilf_deploy.model.ilf import FeedbackModule

if TYPE_CHECKING:
    from ilf_deploy.model.loading import LoadedModel


Outputs = tuple[torch.Tensor, ...] | torch.Tensor  # a segment's outputs (one tensor: as it is)


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
    """Latents (and, where the model has one, the host-computed positional table) -> image tokens."""

    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.adapter, self.transformer = adapter, adapter.transformer

    def forward(self, latents: torch.Tensor, *pos_embed: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed_tokens(latents, *pos_embed)


class ContextSegment(nn.Module):
    def __init__(self, adapter: Adapter) -> None:
        super().__init__()
        self.adapter, self.transformer = adapter, adapter.transformer

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.adapter.context(dict(zip(self.adapter.context_inputs, inputs, strict=True)))
        return tuple(out[name] for name in self.adapter.context_outputs)


class _BlockKV(nn.Module):
    """Stands where a block stands (`blocks.N`) with its attention's K/V projection under the
    attention's name, so that the exported nodes carry the block's scope."""

    def __init__(self, name: str, attention: nn.Module) -> None:
        super().__init__()
        self.name = name
        self.add_module(name, KVProjection(attention))

    def forward(self, context: torch.Tensor) -> torch.Tensor:
        return self.get_submodule(self.name)(context)


class CrossKVSegment(nn.Module):
    """The projected caption -> every block's cross-attention [K | V] (export/cross_kv.py), in the
    order of `attentions` (entry name -> attention). The graph's nodes are scoped as the blocks'
    own (`/blocks.3/attn2/to_k/MatMul`), so quantization selects and treats these projections as it
    does inside the blocks (quantize.LINEAR_NODE)."""

    def __init__(self, adapter: Adapter, attentions: dict[str, nn.Module]) -> None:
        super().__init__()
        assert adapter.cross_attention is not None  # cached_attentions found some
        self.blocks = nn.ModuleList(_BlockKV(adapter.cross_attention, a) for a in attentions.values())

    def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tuple(block(context) for block in self.blocks)


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
    """Blocks start..end on the model's state (one tensor per `Adapter.state_names`). Inside the ILF
    loop it also takes a feed per state tensor: block i sees h + s_i * feed (eqs. 2–3), and feed = 0
    gives the plain first pass, so one graph serves both passes. With `cached_kv` its blocks read
    their caption [K | V] from the context segment's entries (export/cross_kv.py)."""

    def __init__(
        self,
        adapter: Adapter,
        start: int,
        end: int,
        feedback: FeedbackModule | None,
        cached_kv: bool = False,
    ) -> None:
        super().__init__()
        self.adapter, self.start, self.end = adapter, start, end
        blocks = list(adapter.blocks[start : end + 1])
        self.kv_names = tuple(kv_name(i) for i in range(start, end + 1)) if cached_kv else ()
        if cached_kv:
            blocks = [reading_cached_kv(adapter, block) for block in blocks]
        self.blocks = nn.ModuleList(blocks)
        self.cond_names = block_cond_names(adapter, self.kv_names)
        self.scales = None
        if feedback is not None:
            b, _ = feedback.loop
            self.scales = nn.Parameter(feedback.scales.detach()[start - b : end - b + 1].clone())

    def forward(self, *args: torch.Tensor) -> Outputs:
        names = self.adapter.state_names
        state, args = dict(zip(names, args[: len(names)], strict=True)), args[len(names) :]
        if self.scales is not None:
            feed, args = dict(zip(names, args[: len(names)], strict=True)), args[len(names) :]
        cond = dict(zip(self.cond_names, args, strict=True))
        for i, block in enumerate(self.blocks):
            if self.scales is not None:
                state = add_scaled(state, self.scales[i], feed)
            block_cond = with_kv(self.adapter, cond, self.kv_names[i]) if self.kv_names else cond
            state = self.adapter.run_block(block, state, block_cond)
        return _outputs(state, names)


class FeedbackSegment(nn.Module):
    """The feedback block on the loop's output state -> f_feed, one tensor per state tensor."""

    def __init__(self, adapter: Adapter, feedback: FeedbackModule, cached_kv: bool = False) -> None:
        super().__init__()
        self.adapter = adapter
        self.block = reading_cached_kv(adapter, feedback.block) if cached_kv else feedback.block
        self.kv_names = (kv_name(FEEDBACK),) if cached_kv else ()
        self.cond_names = block_cond_names(adapter, self.kv_names)

    def forward(self, *args: torch.Tensor) -> Outputs:
        names = self.adapter.state_names
        state = dict(zip(names, args[: len(names)], strict=True))
        cond = dict(zip(self.cond_names, args[len(names) :], strict=True))
        if self.kv_names:
            cond = with_kv(self.adapter, cond, self.kv_names[0])
        return _outputs(self.adapter.run_block(self.block, state, cond), names)


def _outputs(state: dict[str, torch.Tensor], names: tuple[str, ...]) -> Outputs:
    """A segment's outputs in state order (a lone tensor where the state has one, as bundles had it)."""
    out = tuple(state[name] for name in names)
    return out[0] if len(out) == 1 else out


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


class PipelineTextSegment(nn.Module):
    """SD3 (CLIP-L, CLIP-G, T5) or Flux (CLIP, T5): token ids of each tokenizer -> `prompt_embeds`
    and `pooled_prompt_embeds`, as the pipeline's `encode_prompt` computes them (no attention masks:
    the pipelines pass none; clip_skip None)."""

    def __init__(self, pipe: nn.Module, architecture: str) -> None:
        super().__init__()
        self.architecture = architecture
        if architecture == "sd3":
            self.clips = nn.ModuleList([pipe.text_encoder, pipe.text_encoder_2])
            self.t5 = pipe.text_encoder_3
        else:
            self.clips = nn.ModuleList([pipe.text_encoder])
            self.t5 = pipe.text_encoder_2

    def forward(self, *ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        *clip_ids, t5_ids = ids
        t5 = self.t5(t5_ids)[0]
        if self.architecture != "sd3":  # Flux: CLIP's pooled output, T5's sequence
            return t5, self.clips[0](clip_ids[0], output_hidden_states=False).pooler_output
        hidden, pooled = [], []
        for encoder, tokens in zip(self.clips, clip_ids, strict=True):
            out = encoder(tokens, output_hidden_states=True)
            hidden.append(out.hidden_states[-2])  # (B, 77, C_i): the penultimate layer
            pooled.append(out[0])  # text_embeds: the projection of the pooled token
        clip = torch.cat(hidden, dim=-1)  # (B, 77, C_L + C_G)
        clip = nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # to T5's width
        return torch.cat([clip, t5], dim=-2), torch.cat(pooled, dim=-1)


class SanaTextSegment(nn.Module):
    """Sana: Gemma-2 on token ids + mask -> `prompt_embeds` and `prompt_mask` as `SanaPipeline.encode_prompt`
    hands them to the transformer: of the hidden states and the mask, the first token and the last
    `length - 1` (its select-index). The instruction template is the tokenizer's concern (the ids
    carry it); a prompt without it (a negative one, `length` tokens) passes whole. The id length
    is dynamic: an instructed prompt is longer than a negative one."""

    def __init__(self, encoder: nn.Module, length: int) -> None:
        super().__init__()
        self.encoder, self.length = encoder, length

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(input_ids, attention_mask=attention_mask)[0]
        last = self.length - 1
        embeds = torch.cat([hidden[:, :1], hidden[:, -last:]], dim=1)
        mask = torch.cat([attention_mask[:, :1], attention_mask[:, -last:]], dim=1)
        return embeds, mask


class VaeDecoderSegment(nn.Module):
    """Scaled latents -> images in [0, 1] (B, 3, H, W); SD3/Flux latents are also shifted."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae
        self.scaling = float(vae.config.scaling_factor)
        self.shift = float(getattr(vae.config, "shift_factor", None) or 0.0)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents / self.scaling
        if self.shift:
            latents = latents + self.shift
        images = self.vae.decode(latents).sample
        return (images / 2 + 0.5).clamp(0, 1)


def block_ranges(cut_points: list[int]) -> list[tuple[int, int]]:
    """Cut points [0, 8, 20, 28] -> inclusive block ranges [(0, 7), (8, 19), (20, 27)]."""
    return [(a, b - 1) for a, b in pairwise(cut_points)]


def tokenizer_inputs(count: int) -> tuple[str, ...]:
    """The text encoder's id inputs for `count` tokenizers: input_ids, input_ids_2, input_ids_3."""
    return tuple("input_ids" if i == 0 else f"input_ids_{i + 1}" for i in range(count))


def segment_specs(
    model: LoadedModel, cut_points: list[int], with_feedback: bool, cache_cross_kv: bool = False
) -> list[SegmentSpec]:
    """Every segment of a bundle cut at `cut_points`, in export order; `cache_cross_kv`: the caption
    cross-attentions' K and V from the context segment, where the model has them (export/cross_kv.py)."""
    adapter, feedback = model.adapter, model.feedback if with_feedback else None
    loop = feedback.loop if feedback else None
    state = adapter.state_names
    outputs = tuple(output_name(n) for n in state)
    feeds = tuple(feed_name(n) for n in state)
    embed_inputs = ("latents", "pos_embed") if adapter.uses_positions else ("latents",)
    attentions = cached_attentions(adapter, feedback.block if feedback else None) if cache_cross_kv else {}
    cached = bool(attentions)
    specs = [
        SegmentSpec("embed", EmbedSegment(adapter), embed_inputs, ("hidden",)),
        SegmentSpec("context", ContextSegment(adapter), adapter.context_inputs, adapter.context_outputs),
        SegmentSpec(
            "time", TimeSegment(adapter), ("timestep", *adapter.time_context_inputs), adapter.time_outputs
        ),
    ]
    if cached:
        module = CrossKVSegment(adapter, attentions)
        specs.append(SegmentSpec(CROSS_KV_SEGMENT, module, (adapter.cross_context,), tuple(attentions)))
    for start, end in block_ranges(cut_points):
        inside = loop is not None and loop[0] <= start and end <= loop[1]
        module = BlocksSegment(adapter, start, end, feedback if inside else None, cached)
        names = (*state, *feeds, *module.cond_names) if inside else (*state, *module.cond_names)
        specs.append(SegmentSpec(f"blocks_{start:02d}_{end:02d}", module, names, outputs, (start, end)))
    if feedback is not None:
        module = FeedbackSegment(adapter, feedback, cached)
        specs.append(SegmentSpec("feedback", module, (*state, *module.cond_names), feeds))
    specs.append(SegmentSpec("final", FinalSegment(adapter), ("hidden", *adapter.final_inputs), ("tokens",)))
    if model.architecture == "sana":  # Gemma-2 with the pipeline's token selection, fp32
        from ilf_deploy.model.loading import sana_prompt_format

        length = sana_prompt_format().max_sequence_length
        module = SanaTextSegment(model.text_pipeline.text_encoder, length)
        inputs, outputs = ("input_ids", "attention_mask"), ("prompt_embeds", "prompt_mask")
        specs.append(SegmentSpec("text_encoder", module, inputs, outputs, keep_fp32=True))
    elif model.text_pipeline is not None:  # SD3, Flux: every text encoder in one segment, fp32
        count = 3 if model.architecture == "sd3" else 2
        module = PipelineTextSegment(model.text_pipeline, model.architecture)
        outputs = ("prompt_embeds", "pooled_prompt_embeds")
        specs.append(SegmentSpec("text_encoder", module, tokenizer_inputs(count), outputs, keep_fp32=True))
    elif model.text_encoder is not None:
        # T5 overflows in fp16, so the text encoder always stays fp32 (as PixArt deployments do).
        module = TextEncoderSegment(model.text_encoder)
        inputs = ("input_ids", "attention_mask")
        specs.append(SegmentSpec("text_encoder", module, inputs, ("prompt_embeds",), keep_fp32=True))
    if model.vae is not None:
        decoder = VaeDecoderSegment(model.vae)
        specs.append(SegmentSpec("vae_decoder", decoder, ("latents",), ("images",), keep_fp32=True))
    return specs
