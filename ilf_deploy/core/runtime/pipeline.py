"""Generation from a bundle on any engine: tokenizer, text encoder, the plan loop, VAE decoder.

Nothing here imports diffusers, transformers or an engine's SDK: prompts are tokenised with the
`tokenizers` library from the bundle's tokenizer.json, and every segment call goes through the
backend's `SegmentRunner` (ilf_deploy.engines.backends picks it by name).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Generator, ModelFacts, Request
from ilf_deploy.core.runtime.runner import SegmentRunner


def facts_from_manifest(bundle: Bundle) -> ModelFacts:
    """The model facts every backend opened on `bundle` shares: its first resolution is the default."""
    model, resolutions = bundle.model, bundle.manifest.resolutions
    return ModelFacts(
        architecture=bundle.architecture,
        latent_channels=model.latent_channels,
        patch_size=model.patch_size,
        vae_scale_factor=model.vae_scale_factor,
        default_size=resolutions[0],
        num_classes=model.num_classes,
        uses_size_conditions=model.uses_size_conditions,
        resolutions=resolutions,
        position_ids=model.position_ids,
        guidance=model.guidance,
    )


class BundleGenerator(Generator):
    """Runs a bundle's plans on one engine's segments: text encoder, segments, VAE decoder."""

    def __init__(self, bundle: Bundle, runner: SegmentRunner) -> None:
        self.bundle = bundle
        self.facts = facts_from_manifest(bundle)
        self.segments = runner
        self.backend = runner.backend
        self.variant = runner.variant

    def array(self, value: np.ndarray) -> Any:
        return self.segments.array(value)

    def concat(self, arrays: list[Any]) -> Any:
        return self.segments.concat(arrays)

    @property
    def tokenizer(self):
        """The bundle's tokenizer, padded and truncated to its max_length."""
        spec = self.bundle.manifest.tokenizer
        return self._padded_tokenizer(spec.max_length if spec is not None else 0)

    def _padded_tokenizer(self, length: int):
        """The bundle's tokenizer padded and truncated to `length` (Sana's instructed prompts are longer)."""
        padded: dict[int, Any] = self.__dict__.setdefault("_padded", {})
        if length not in padded:
            tokenizer = self.bundle.tokenizer()
            spec = self.bundle.manifest.tokenizer
            assert spec is not None  # else bundle.tokenizer() raised
            tokenizer.enable_truncation(length)
            tokenizer.enable_padding(
                length=length, pad_id=spec.pad_id, pad_token=tokenizer.id_to_token(spec.pad_id)
            )
            padded[length] = tokenizer
        return padded[length]

    @property
    def tokenizers(self) -> list[tuple[str, Any]]:
        """Schema 4 (SD3, Flux): (text_encoder input, tokenizer padded and truncated to its length)."""
        if "_tokenizers" not in self.__dict__:
            loaded = []
            for spec in self.bundle.manifest.tokenizers:
                tokenizer = self.bundle.tokenizer(spec)
                tokenizer.enable_truncation(spec.max_length)
                pad = tokenizer.id_to_token(spec.pad_id)
                tokenizer.enable_padding(length=spec.max_length, pad_id=spec.pad_id, pad_token=pad)
                loaded.append((spec.input, tokenizer))
            self.__dict__["_tokenizers"] = loaded
        return self.__dict__["_tokenizers"]

    def encode_prompt(self, prompt: str) -> dict[str, Any]:
        return self._encode(prompt, negative=False)

    def encode_negative_prompt(self, prompt: str) -> dict[str, Any]:
        return self._encode(prompt, negative=True)

    def _encode(self, prompt: str, negative: bool) -> dict[str, Any]:
        if self.bundle.manifest.tokenizers:  # SD3, Flux: the prompt as is, through every tokenizer
            feeds = {
                name: self.array(np.array([tokenizer.encode(prompt).ids], dtype=np.int64))
                for name, tokenizer in self.tokenizers
            }
            with self.segments.activate():
                return dict(self.segments.run("text_encoder", feeds))
        spec = self.bundle.manifest.tokenizer
        if spec is None:
            self.bundle.tokenizer()  # raises the one-line "no tokenizer" error
        assert spec is not None
        text, length = spec.text_and_length(prompt, negative)  # Sana: the instruction, on prompts
        encoding = self._padded_tokenizer(length).encode(text)
        ids = self.array(np.array([encoding.ids], dtype=np.int64))
        mask = self.array(np.array([encoding.attention_mask], dtype=np.int64))
        with self.segments.activate():
            out = self.segments.run("text_encoder", {"input_ids": ids, "attention_mask": mask})
        # Sana's text encoder returns the mask of the tokens it keeps; PixArt's keeps them all
        return {"prompt_embeds": out["prompt_embeds"], "prompt_mask": out.get("prompt_mask", mask)}

    def generate_batch(
        self,
        plan: StepPlan,
        requests: list[Request],
        latents: list[np.ndarray] | None = None,
        on_step: Callable[[int], None] | None = None,
    ) -> Any:
        with self.segments.activate():
            return super().generate_batch(plan, requests, latents, on_step)

    def decode(self, latents: Any) -> np.ndarray:
        with self.segments.activate():
            images = self.segments.run("vae_decoder", {"latents": self.array(latents)})["images"]
            array = self.segments.to_numpy(images).astype(np.float32)
        return (array.transpose(0, 2, 3, 1) * 255).round().clip(0, 255).astype(np.uint8)

    def latents_to_numpy(self, latents: Any) -> np.ndarray:
        return self.segments.to_numpy(latents).astype(np.float32)
