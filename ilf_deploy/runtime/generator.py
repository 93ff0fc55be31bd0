"""Request -> conditioning -> plan -> latents -> image, shared by the torch and bundle generators."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..plan import StepPlan
from .loop import Segments, denoise

Array = Any  # a torch tensor or a numpy array, whichever the backend computes with


@dataclass
class Request:
    prompt: str = ""
    negative_prompt: str = ""
    class_label: int | None = None
    guidance_scale: float = 4.5
    seed: int = 0
    height: int | None = None
    width: int | None = None


@dataclass(frozen=True)
class ModelFacts:
    """What a generator needs to know about the model, whatever runs it."""

    architecture: str
    latent_channels: int
    patch_size: int
    vae_scale_factor: int
    default_image_size: int
    num_classes: int = 0
    uses_size_conditions: bool = False


class Generator(ABC):
    facts: ModelFacts
    segments: Segments

    @abstractmethod
    def encode_prompt(self, prompt: str) -> tuple[Array, Array]:
        """(prompt embeddings (1, L, C), attention mask (1, L)) as the PixArt pipelines compute them."""

    @abstractmethod
    def decode(self, latents: Array) -> np.ndarray:
        """Latents -> uint8 images (B, H, W, 3)."""

    @abstractmethod
    def array(self, value: np.ndarray) -> Array:
        """A numpy array in the backend's array type."""

    @abstractmethod
    def concat(self, arrays: list[Array]) -> Array: ...

    def latent_size(self, request: Request) -> tuple[int, int]:
        size = self.facts.default_image_size
        height, width = request.height or size, request.width or size
        factor = self.facts.vae_scale_factor * self.facts.patch_size
        if height <= 0 or width <= 0 or height % factor or width % factor:
            raise ConfigError(
                f"height and width must be positive multiples of {factor}, got {height}x{width}"
            )
        if self.facts.architecture == "dit" and height != width:
            raise ConfigError("DiT generates square images only")
        return height // self.facts.vae_scale_factor, width // self.facts.vae_scale_factor

    def initial_latents(self, request: Request) -> np.ndarray:
        """Seeded N(0, 1) noise; numpy's generator so every backend starts from the same latents."""
        shape = (1, self.facts.latent_channels, *self.latent_size(request))
        return np.random.default_rng(request.seed).standard_normal(shape, dtype=np.float32)

    def inputs(self, request: Request, guided: bool, latent_hw: tuple[int, int]) -> dict[str, Array]:
        """The model's conditioning inputs, batched [uncond; cond] when guiding."""
        if self.facts.architecture == "dit":
            null = self.facts.num_classes
            if request.class_label is None:
                raise ConfigError("DiT models need --class-label")
            if not 0 <= request.class_label < null:
                raise ConfigError(f"class label must be in 0..{null - 1}, got {request.class_label}")
            labels = [null, request.class_label] if guided else [request.class_label]
            return {"class_labels": self.array(np.array(labels, dtype=np.int64))}
        embeds, mask = self.encode_prompt(request.prompt)
        if guided:
            neg_embeds, neg_mask = self.encode_prompt(request.negative_prompt)
            embeds, mask = self.concat([neg_embeds, embeds]), self.concat([neg_mask, mask])
        out = {"prompt_embeds": embeds, "prompt_mask": mask}
        if self.facts.uses_size_conditions:
            height, width = (v * self.facts.vae_scale_factor for v in latent_hw)
            batch = embeds.shape[0]
            out["resolution"] = self.array(np.array([[height, width]] * batch, dtype=np.float32))
            out["aspect_ratio"] = self.array(np.array([[height / width]] * batch, dtype=np.float32))
        return out

    def generate_latents(
        self,
        plan: StepPlan,
        request: Request,
        latents: np.ndarray | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> Array:
        if latents is None:
            latents = self.initial_latents(request)
        expected = (1, self.facts.latent_channels, *self.latent_size(request))
        if tuple(latents.shape) != expected:
            raise ConfigError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
        guided = request.guidance_scale > 1.0
        inputs = self.inputs(request, guided, expected[2:])
        x = self.array(np.asarray(latents, dtype=np.float32))
        return denoise(self.segments, plan, x, inputs, request.guidance_scale, on_step)
