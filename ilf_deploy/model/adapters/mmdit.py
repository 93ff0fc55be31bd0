"""Two-stream MMDiTs: SD3/SD3.5 (`SD3Transformer2DModel`) and Flux.1 (`FluxTransformer2DModel`).

Their blocks carry image tokens **and** text tokens, so the state between blocks is
`{"hidden": image tokens (B, N, D), "text": text tokens (B, L, D)}`; the text stream starts as the
projected prompt embedding (`context()`), and only the image stream reaches the final layer.
SD3's last joint block is `context_pre_only`: it returns no text tokens; nothing after it reads
them, so its state carries the text tokens it was given, unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.model.adapters.base import Adapter, Cond, State


class SD3Adapter(Adapter):
    """Mirrors `SD3Transformer2DModel.forward`, cut at block boundaries.

    Inputs: `prompt_embeds` (B, L, joint_attention_dim) — CLIP-L/G and T5 as `StableDiffusion3Pipeline`
    concatenates them — and `pooled_prompt_embeds` (B, pooled_projection_dim). The time embedding
    reads the pooled prompt, so it is computed per (timestep, prompt).
    """

    architecture = "sd3"
    context_inputs = ("prompt_embeds", "pooled_prompt_embeds")
    context_outputs = ("text_context",)
    time_context_inputs = ("pooled_prompt_embeds",)
    time_outputs = ("temb",)
    block_inputs = ("temb",)
    final_inputs = ("temb",)
    state_names = ("hidden", "text")
    state_init = {"text": "text_context"}  # noqa: RUF012

    def pos_embed(self, height: int, width: int) -> torch.Tensor:
        """(1, N, D): the centre crop of SD3's positional table that `PatchEmbed` adds."""
        patch = self.transformer.pos_embed
        most = patch.pos_embed_max_size * self.patch_size
        if max(height, width) > most:
            raise ConfigError(
                f"this SD3 model generates latents of at most {most}x{most}, not {height}x{width}"
            )
        return patch.cropped_pos_embed(height, width)

    def context(self, inputs: Cond) -> Cond:
        return {
            "text_context": self.transformer.context_embedder(inputs["prompt_embeds"]),
            "pooled_prompt_embeds": inputs["pooled_prompt_embeds"],  # passes through to time_cond
        }

    def time_cond(self, timestep: torch.Tensor, context: Cond) -> Cond:
        return {"temb": self.transformer.time_text_embed(timestep, context["pooled_prompt_embeds"])}

    def embed(self, latents: torch.Tensor, cond: Cond) -> State:
        hidden = self.embed_tokens(latents, self.pos_embed(*latents.shape[-2:])).contiguous()
        return {"hidden": hidden, "text": cond["text_context"]}

    def run_block(self, block: nn.Module, state: State, cond: Cond) -> State:
        text, hidden = block(
            hidden_states=state["hidden"], encoder_hidden_states=state["text"], temb=cond["temb"]
        )
        return {"hidden": hidden, "text": state["text"] if text is None else text}

    def final_tokens(self, state: State, cond: Cond) -> torch.Tensor:
        t = self.transformer
        return t.proj_out(t.norm_out(state["hidden"], cond["temb"]))

    def feedback_template(self, loop_end: int) -> int:
        return 0  # a full joint block: the last one (context_pre_only) drops the text stream


class FluxAdapter(Adapter):
    """Mirrors `FluxTransformer2DModel.forward`, cut at block boundaries; blocks are the double-stream
    blocks followed by the single-stream ones (both take and return image and text tokens).

    Latents are (B, 16, h, w) everywhere outside the transformer: `embed` packs them 2x2 into
    tokens (B, h/2·w/2, 64) as `FluxPipeline._pack_latents`, and `final` unpacks the output, so the
    loop, the scheduler and the VAE see diffusers' unpacked layout. Inputs: `prompt_embeds`
    (B, L, 4096-like) from T5, `pooled_prompt_embeds` (B, 768-like) from CLIP, `img_ids` (N, 3) and
    `txt_ids` (L, 3) as the pipeline makes them, and for guidance-distilled models (dev) `guidance`
    (B,) — the guidance scale, embedded like the timestep (no classifier-free guidance).
    """

    architecture = "flux"
    time_outputs = ("temb",)
    block_inputs = ("temb", "rope_cos", "rope_sin")
    final_inputs = ("temb",)
    context_outputs = ("text_context", "rope_cos", "rope_sin")
    state_names = ("hidden", "text")
    state_init = {"text": "text_context"}  # noqa: RUF012
    token_layout = "packed"
    uses_positions = False  # rotary positions come from ids, in the context segment

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__(transformer)
        self._blocks = nn.ModuleList(
            [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        )

    @property
    def blocks(self) -> nn.ModuleList:
        return self._blocks

    @property
    def num_double_blocks(self) -> int:
        return len(self.transformer.transformer_blocks)

    @property
    def guidance_embedded(self) -> bool:
        return bool(self.config.guidance_embeds)

    @property
    def context_inputs(self) -> tuple[str, ...]:
        return ("prompt_embeds", "pooled_prompt_embeds", "txt_ids", "img_ids", *self.guidance_inputs)

    @property
    def guidance_inputs(self) -> tuple[str, ...]:
        return ("guidance",) if self.guidance_embedded else ()

    @property
    def time_context_inputs(self) -> tuple[str, ...]:
        return ("pooled_prompt_embeds", *self.guidance_inputs)

    @property
    def latent_channels(self) -> int:
        return int(self.config.in_channels) // 4  # 2x2 packed

    @property
    def learned_sigma(self) -> bool:
        return False

    @property
    def patch_size(self) -> int:
        return 2  # the pipeline's 2x2 packing: latent sizes must be even

    @property
    def sample_size(self) -> int:
        return 128  # FluxPipeline.default_sample_size

    def context(self, inputs: Cond) -> Cond:
        t = self.transformer
        cos, sin = t.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"]), dim=0))
        out = {
            "text_context": t.context_embedder(inputs["prompt_embeds"]),
            # (1, L + N, head_dim): a leading axis that is not the batch's (core/runtime/cache.py take_cond)
            "rope_cos": cos[None],
            "rope_sin": sin[None],
        }
        for name in self.time_context_inputs:
            out[name] = inputs[name]
        return out

    def time_cond(self, timestep: torch.Tensor, context: Cond) -> Cond:
        t, dtype = self.transformer, self.dtype
        # FluxPipeline passes t / 1000 and the transformer multiplies by 1000: the same float rounding.
        timestep = (timestep / 1000).to(dtype) * 1000
        pooled = context["pooled_prompt_embeds"]
        if not self.guidance_embedded:
            return {"temb": t.time_text_embed(timestep, pooled)}
        guidance = context["guidance"].to(dtype) * 1000
        return {"temb": t.time_text_embed(timestep, guidance, pooled)}

    def embed_tokens(self, latents: torch.Tensor, pos_embed: torch.Tensor | None = None) -> torch.Tensor:
        return self.transformer.x_embedder(pack(latents))

    def embed(self, latents: torch.Tensor, cond: Cond) -> State:
        return {"hidden": self.embed_tokens(latents), "text": cond["text_context"]}

    def run_block(self, block: nn.Module, state: State, cond: Cond) -> State:
        text, hidden = block(
            hidden_states=state["hidden"],
            encoder_hidden_states=state["text"],
            temb=cond["temb"],
            image_rotary_emb=(cond["rope_cos"][0], cond["rope_sin"][0]),
        )
        return {"hidden": hidden, "text": text}

    def final_tokens(self, state: State, cond: Cond) -> torch.Tensor:
        t = self.transformer
        return t.proj_out(t.norm_out(state["hidden"], cond["temb"]))

    def final(self, state: State, cond: Cond, height: int, width: int) -> torch.Tensor:
        return unpack(self.final_tokens(state, cond), height, width)

    def feedback_template(self, loop_end: int) -> int:
        return loop_end  # a block of the class that ends the loop: double- or single-stream


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, h, w) -> (B, h/2·w/2, 4C), as `FluxPipeline._pack_latents`."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, h/2, w/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h/2·w/2, 4C) -> (B, C, h, w), as `FluxPipeline._unpack_latents` (sizes in latent pixels)."""
    b, _, channels = tokens.shape
    x = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, channels // 4, height, width)
