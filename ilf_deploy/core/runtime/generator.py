"""Request -> conditioning -> plan -> latents -> image, shared by the torch and bundle generators."""

from __future__ import annotations

import contextlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.memory import GIB, MemoryGauge
from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.cache import CacheState
from ilf_deploy.core.runtime.loop import Segments, denoise

log = logging.getLogger("ilf_deploy.runtime")

Array = Any  # a torch tensor or a numpy array, whichever the backend computes with


# The diffusers pipelines' defaults: PixArt 4.5, DiT 4.0, SD3 7.0, Flux.1-dev 3.5 (embedded guidance).
DEFAULT_GUIDANCE = {"dit": 4.0, "sd3": 7.0, "flux": 3.5}


def default_guidance(architecture: str, guidance_free: bool = False) -> float:
    """A model without guidance (Flux.1-schnell: no CFG, no guidance embedding) runs at 1.0."""
    return 1.0 if guidance_free else DEFAULT_GUIDANCE.get(architecture, 4.5)


@dataclass
class Request:
    """One image's request. Fields left None are filled by `Generator.resolve`, in one place, from
    the bundle (or model): every backend then sees the same resolved request."""

    prompt: str = ""
    negative_prompt: str = ""
    class_label: int | None = None
    guidance_scale: float | None = None
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
    default_size: tuple[int, int]  # (height, width) in pixels when a request names none
    num_classes: int = 0
    uses_size_conditions: bool = False
    resolutions: tuple[tuple[int, int], ...] = ()  # the sizes a bundle was built for; () = any
    # Flux: rotary positions from image/text ids (inputs `img_ids`, `txt_ids` as FluxPipeline makes them)
    position_ids: bool = False
    # How the guidance scale reaches the model: "cfg" (classifier-free, [uncond; cond] rows),
    # "embedded" (Flux.1-dev: an input of the time embedding, one row per image) or "none" (schnell).
    guidance: str = "cfg"


class Generator(ABC):
    """Request -> image on one backend. `segments` is what the loop runs; its `timings` (seconds
    per call, by stage) feed `bench`'s per-stage table and `serve`'s stage metrics."""

    facts: ModelFacts
    segments: Segments
    backend: str = ""  # the registry name it was opened with
    variant: str | None = None  # its precision variant (or an engine precision, e.g. OpenVINO bf16)
    choice: str | None = None  # `--backend auto`: which engine it chose and why (one line)
    # The bundle it was opened from (the backend registry sets it); None: a model run directly (the
    # torch runner on a checkpoint). Servers and batch jobs read it, never load the bundle again.
    bundle: Bundle | None = None
    # Per image of the last generate_batch: the block forwards that ran (an adaptive plan decides
    # them at run time; for every other plan they are the plan's `block_forwards`).
    last_block_forwards: list[int] = []  # noqa: RUF012 (replaced, never mutated)

    @abstractmethod
    def encode_prompt(self, prompt: str) -> dict[str, Array]:
        """The model's text inputs for one prompt, by name, each with a batch axis of 1: PixArt
        `prompt_embeds` (1, L, C) and `prompt_mask` (1, L); SD3 and Flux `prompt_embeds` and
        `pooled_prompt_embeds` (1, C'), as each family's diffusers pipeline computes them."""

    @abstractmethod
    def decode(self, latents: Array) -> np.ndarray:
        """Latents -> uint8 images (B, H, W, 3)."""

    @abstractmethod
    def array(self, value: np.ndarray) -> Array:
        """A numpy array in the backend's array type."""

    @abstractmethod
    def concat(self, arrays: list[Array]) -> Array: ...

    def opened_bundle(self, digest: str | None = None) -> Bundle:
        """The bundle this engine runs, refused unless it is the pinned `digest` (None: any): an
        engine handed to a server or a batch job stands for the bundle it was opened from."""
        if self.bundle is None:
            raise ConfigError(f"the {self.backend or 'given'} engine runs a model, not a bundle")
        return self.bundle.check_pin(digest)

    def inference_context(self) -> contextlib.AbstractContextManager:
        """The scope a server runs engine work in (the torch backend: inference mode)."""
        return contextlib.nullcontext()

    def latents_to_numpy(self, latents: Array) -> np.ndarray:
        """Final latents on the host (torch tensors, on any device, included)."""
        if hasattr(latents, "detach"):
            latents = latents.detach().float().cpu().numpy()
        return np.asarray(latents, dtype=np.float32)

    def encode_negative_prompt(self, prompt: str) -> dict[str, Array]:
        """A negative (unconditional) prompt's text inputs: `encode_prompt`'s, except in a family whose
        pipeline encodes negatives differently (SanaPipeline: without its instruction template)."""
        return self.encode_prompt(prompt)

    def encode_cached(self, prompt: str, negative: bool = False) -> dict[str, Array]:
        """`encode_prompt` (or `encode_negative_prompt`) with a small cache: the empty negative
        prompt recurs in every request."""
        cache: dict[tuple[bool, str], dict[str, Array]] = self.__dict__.setdefault("_prompt_cache", {})
        key = (negative, prompt)
        if key not in cache:
            if len(cache) >= 256:
                cache.pop(next(iter(cache)))  # oldest first
            cache[key] = self.encode_negative_prompt(prompt) if negative else self.encode_prompt(prompt)
        return cache[key]

    def resolve(self, request: Request) -> Request:
        """The request with every default decided: size and guidance."""
        height, width = self.facts.default_size
        guidance = request.guidance_scale
        if guidance is None:
            guidance = default_guidance(self.facts.architecture, self.facts.guidance == "none")
        return replace(
            request, height=request.height or height, width=request.width or width, guidance_scale=guidance
        )

    def latent_size(self, request: Request) -> tuple[int, int]:
        request = self.resolve(request)
        height, width = request.height, request.width
        assert height is not None and width is not None
        sizes = self.facts.resolutions
        if sizes and (height, width) not in sizes:
            built = ", ".join(f"{h}x{w}" for h, w in sizes)
            raise ConfigError(
                f"the bundle was built for {built}, not {height}x{width}; rebuild with --resolutions"
            )
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
        """One request's conditioning inputs, as [uncond, cond] rows when guiding."""
        return self.batch_inputs([request], guided, latent_hw)

    def batch_inputs(
        self, requests: list[Request], guided: bool, latent_hw: tuple[int, int]
    ) -> dict[str, Array]:
        """Conditioning for a batch, ordered [uncond_1..n; cond_1..n] when guiding (the loop's layout)."""
        if self.facts.architecture == "dit":
            null = self.facts.num_classes
            for request in requests:
                if request.class_label is None:
                    raise ConfigError("DiT models need --class-label")
                if not 0 <= request.class_label < null:
                    raise ConfigError(f"class label must be in 0..{null - 1}, got {request.class_label}")
            labels = [r.class_label for r in requests]
            labels = [null] * len(labels) + labels if guided else labels
            return {"class_labels": self.array(np.array(labels, dtype=np.int64))}
        encoded = [self.encode_cached(r.prompt) for r in requests]
        if guided:
            encoded = [self.encode_cached(r.negative_prompt, negative=True) for r in requests] + encoded
        out = {name: self.concat([e[name] for e in encoded]) for name in encoded[0]}
        batch = len(encoded)
        if self.facts.uses_size_conditions:
            height, width = (v * self.facts.vae_scale_factor for v in latent_hw)
            out["resolution"] = self.array(np.array([[height, width]] * batch, dtype=np.float32))
            out["aspect_ratio"] = self.array(np.array([[height / width]] * batch, dtype=np.float32))
        if self.facts.position_ids:  # FluxPipeline's ids: text all 0, image (0, row, col) per 2x2 patch
            rows, cols = (v // 2 for v in latent_hw)
            img_ids = np.zeros((rows, cols, 3), np.float32)
            img_ids[..., 1] += np.arange(rows)[:, None]
            img_ids[..., 2] += np.arange(cols)[None, :]
            out["img_ids"] = self.array(img_ids.reshape(rows * cols, 3))
            out["txt_ids"] = self.array(np.zeros((out["prompt_embeds"].shape[1], 3), np.float32))
        if self.facts.guidance == "embedded":
            scales = [float(r.guidance_scale or 0.0) for r in requests]
            out["guidance"] = self.array(np.array(scales, np.float32))
        return out

    def generate_latents(
        self,
        plan: StepPlan,
        request: Request,
        latents: np.ndarray | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> Array:
        """One image's final latents (1, C, h, w)."""
        return self.generate_batch(plan, [request], None if latents is None else [latents], on_step)

    def generate_batch(
        self,
        plan: StepPlan,
        requests: list[Request],
        latents: list[np.ndarray] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> Array:
        """Several requests of one size in one batch: every segment call serves them all (an
        adaptive op runs its blocks on the images that refresh: core/runtime/cache.py)."""
        if not requests:
            raise ConfigError("no requests to generate")
        requests = [self.resolve(r) for r in requests]
        shape = (1, self.facts.latent_channels, *self.latent_size(requests[0]))
        if any(self.latent_size(r) != shape[2:] for r in requests[1:]):
            raise ConfigError("a batch must share one image size")
        if latents is None:
            latents = [self.initial_latents(r) for r in requests]
        for array in latents:
            if tuple(array.shape) != shape:
                raise ConfigError(f"latents must have shape {shape}, got {tuple(array.shape)}")
        scales = [max(float(r.guidance_scale or 0.0), 1.0) for r in requests]
        # Embedded guidance (Flux.1-dev) is an input of the model, not [uncond; cond] rows.
        guided = self.facts.guidance == "cfg" and any(scale > 1.0 for scale in scales)
        inputs = self.batch_inputs(requests, guided, shape[2:])
        x = self.array(np.concatenate([np.asarray(a, dtype=np.float32) for a in latents]))
        # One scale for the batch when all agree (a float); else per-image scales broadcast over (C, h, w).
        guidance = (
            scales[0]
            if len(set(scales)) == 1
            else self.array(np.array(scales, np.float32)[:, None, None, None])
        )
        cache = CacheState(len(requests), guided)
        p = self.facts.patch_size
        plan = plan.for_image_tokens((shape[2] // p) * (shape[3] // p))  # a size-dependent schedule
        latents_out = denoise(self.segments, plan, x, inputs, guidance if guided else 1.0, on_step, cache)
        self.last_block_forwards = cache.block_forwards
        return latents_out


def warm_up(
    generator: Generator,
    plan: StepPlan,
    request: Request,
    batch_sizes: tuple[int, ...],
    memory: MemoryGauge | None = None,
) -> tuple[int, ...]:
    """A server's warm-up, before it says ready: `request` run to the image once at each micro-batch
    size it will form (core/batching.py's buckets), so that an engine which compiles per input shape
    has every one compiled (kept static: `Segments.keep_static_shapes`) before the first request,
    then every other segment opened (`Segments.open_all`). Called on the server's own generator
    object, so that a wrapper's `generate_batch` runs too.

    Returns the sizes warmed, which the server then forms its engine calls of. Where each size is
    a compiled model of its own (`Segments.compiles_per_shape`: OpenVINO, ~2.3 GB a size for the
    PixArt-XL int8 blocks), a size stops the warm-up, with every larger one, when the most memory an
    earlier size took would not fit in what is available less the margin (core/memory.py): a larger
    batch then runs as chunks of the sizes warmed, instead of the server being killed for memory."""
    memory = memory or MemoryGauge()
    warmed: list[int] = []
    most = 0  # the most resident memory one size's warm-up took
    generator.segments.keep_static_shapes(len(batch_sizes))
    with generator.inference_context():  # torch: inference mode
        for size in batch_sizes:
            if warmed and generator.segments.compiles_per_shape and not memory.room_for(most):
                log.warning(
                    "batches of at most %d images, not %d: a batch size is compiled on its own and one "
                    "took %.1f GiB, more than is left free (%.1f GiB available, %.1f GiB kept free); "
                    "larger batches run as chunks of %s (--max-batch %d says so up front)",
                    warmed[-1], batch_sizes[-1], most / GIB, (memory.available() or 0) / GIB,
                    memory.margin() / GIB, ", ".join(map(str, warmed)), warmed[-1],
                )  # fmt: skip
                generator.segments.keep_static_shapes(len(warmed))
                break
            before = memory.resident()
            generator.decode(generator.generate_batch(plan, [request] * size))
            after = memory.resident()
            if before is not None and after is not None:
                most = max(most, after - before)
            warmed.append(size)
        generator.segments.open_all()  # e.g. ORT: every session, not just this plan's
    return tuple(warmed)
