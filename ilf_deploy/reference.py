"""The PyTorch reference runner: executes any step plan with an adapter + ILF module.

Every other backend is checked against this one, and this one is checked against diffusers'
own pipelines (tests/test_pipeline_parity.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .adapters import Adapter, Cond
from .errors import ConfigError
from .ilf import FeedbackModule, inner_loop, run_blocks
from .loading import LoadedModel
from .plan import StepPlan
from .runtime.loop import denoise


class TorchSegments:
    """The `Segments` of runtime.loop, backed by the torch modules."""

    def __init__(self, adapter: Adapter, feedback: FeedbackModule | None = None) -> None:
        self.adapter = adapter
        self.feedback = feedback
        self.latent_channels = adapter.latent_channels
        self.num_blocks = adapter.num_blocks
        self.loop = feedback.loop if feedback is not None else None
        self.dtype = next(adapter.transformer.parameters()).dtype

    def context(self, inputs: dict[str, torch.Tensor]) -> Cond:
        return self.adapter.context(inputs)

    def conditioning(self, timestep: float, context: Cond) -> Cond:
        return self.adapter.conditioning(torch.tensor([timestep], dtype=torch.float32), context)

    def embed(self, latents: torch.Tensor) -> torch.Tensor:
        return self.adapter.embed(latents)

    def blocks(self, start: int, end: int, hidden: torch.Tensor, cond: Cond) -> torch.Tensor:
        return run_blocks(self.adapter, start, end, hidden, cond)

    def inner_loop(self, hidden: torch.Tensor, cond: Cond, cond_post: Cond) -> torch.Tensor:
        assert self.feedback is not None  # check_plan refuses feedback plans without a module
        return inner_loop(self.adapter, self.feedback, hidden, cond, cond_post)

    def final(self, hidden: torch.Tensor, cond: Cond, height: int, width: int) -> torch.Tensor:
        return self.adapter.final(hidden, cond, height, width)

    def concat(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(arrays)


@dataclass
class Request:
    prompt: str = ""
    negative_prompt: str = ""
    class_label: int | None = None
    guidance_scale: float = 4.5
    seed: int = 0
    height: int | None = None
    width: int | None = None


class TorchGenerator:
    """Prompt -> conditioning -> plan -> latents -> image, all in PyTorch."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.segments = TorchSegments(model.adapter, model.feedback)

    @property
    def adapter(self) -> Adapter:
        return self.model.adapter

    def latent_size(self, request: Request) -> tuple[int, int]:
        size = self.model.default_image_size
        height, width = request.height or size, request.width or size
        factor = self.model.vae_scale_factor * self.adapter.patch_size
        if height % factor or width % factor:
            raise ConfigError(f"height and width must be multiples of {factor}, got {height}x{width}")
        if self.model.architecture == "dit" and height != width:
            raise ConfigError("DiT generates square images only")
        return height // self.model.vae_scale_factor, width // self.model.vae_scale_factor

    def initial_latents(self, request: Request) -> torch.Tensor:
        h, w = self.latent_size(request)
        generator = torch.Generator().manual_seed(request.seed)
        shape = (1, self.adapter.latent_channels, h, w)
        return torch.randn(shape, generator=generator, dtype=self.segments.dtype)

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """T5 embeddings as the PixArt pipelines compute them (lower-cased, padded to max length)."""
        if self.model.tokenizer is None or self.model.text_encoder is None:
            raise ConfigError(f"{self.model.source} has no tokenizer/text encoder; pass a pipeline directory")
        tokens = self.model.tokenizer(
            prompt.lower().strip(),
            padding="max_length",
            max_length=self.adapter.max_sequence_length,  # type: ignore[attr-defined]
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        embeds = self.model.text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask)[0]
        return embeds.to(self.segments.dtype), tokens.attention_mask

    def inputs(self, request: Request, guided: bool, latent_hw: tuple[int, int]) -> dict[str, torch.Tensor]:
        """The adapter's inputs, batched [uncond; cond] when guiding."""
        if self.model.architecture == "dit":
            if request.class_label is None:
                raise ConfigError("DiT models need --class-label")
            null = self.adapter.num_classes  # type: ignore[attr-defined]
            if not 0 <= request.class_label < null:
                raise ConfigError(f"class label must be in 0..{null - 1}, got {request.class_label}")
            labels = [null, request.class_label] if guided else [request.class_label]
            return {"class_labels": torch.tensor(labels)}
        embeds, mask = self.encode_prompt(request.prompt)
        if guided:
            neg_embeds, neg_mask = self.encode_prompt(request.negative_prompt)
            embeds, mask = torch.cat([neg_embeds, embeds]), torch.cat([neg_mask, mask])
        out = {"prompt_embeds": embeds, "prompt_mask": mask}
        if self.adapter.uses_size_conditions:  # type: ignore[attr-defined]
            height, width = (v * self.model.vae_scale_factor for v in latent_hw)
            batch = embeds.shape[0]
            out["resolution"] = torch.tensor([[height, width]], dtype=torch.float32).repeat(batch, 1)
            out["aspect_ratio"] = torch.tensor([[height / width]], dtype=torch.float32).repeat(batch, 1)
        return out

    @torch.no_grad()
    def generate_latents(
        self,
        plan: StepPlan,
        request: Request,
        latents: torch.Tensor | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        if latents is None:
            latents = self.initial_latents(request)
        else:
            expected = (1, self.adapter.latent_channels, *self.latent_size(request))
            if tuple(latents.shape) != expected:
                raise ConfigError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
            latents = latents.to(self.segments.dtype)
        guided = request.guidance_scale > 1.0
        inputs = self.inputs(request, guided, tuple(latents.shape[-2:]))  # type: ignore[arg-type]
        return denoise(self.segments, plan, latents, inputs, request.guidance_scale, on_step)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Latents -> uint8 images (B, H, W, 3)."""
        if self.model.vae is None:
            raise ConfigError(f"{self.model.source} has no VAE; pass a pipeline directory")
        vae = self.model.vae
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().numpy()
        return (images * 255).round().astype(np.uint8)


def profile_block_changes(generator: TorchGenerator, plan: StepPlan, requests: list[Request]) -> np.ndarray:
    """Block Caching's profile (003, eq. 6): mean relative L1 change of each block's output
    between consecutive steps of `plan` (a baseline plan), averaged over `requests`."""
    adapter = generator.adapter
    outputs: list[list[torch.Tensor]] = []

    def record(_module, _inputs, output):
        outputs[-1].append(output.detach().clone())

    hooks = [block.register_forward_hook(record) for block in adapter.blocks]
    total = np.zeros((plan.num_steps, adapter.num_blocks))
    try:
        for request in requests:
            per_step: list[list[torch.Tensor]] = []
            outputs.clear()

            def on_step(_index: int, per_step=per_step) -> None:
                per_step.append(list(outputs[-1]))
                outputs.append([])

            outputs.append([])
            generator.generate_latents(plan, request, on_step=on_step)
            for s in range(1, plan.num_steps):
                for i in range(adapter.num_blocks):
                    now, before = per_step[s][i], per_step[s - 1][i]
                    total[s, i] += float((now - before).abs().sum() / now.abs().sum().clamp_min(1e-12))
    finally:
        for hook in hooks:
            hook.remove()
    return total / max(len(requests), 1)
