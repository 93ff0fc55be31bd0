"""Generation from a bundle, on ONNX Runtime (default) or the PyTorch reference inside the bundle.

Nothing here imports diffusers or transformers: prompts are tokenised with the `tokenizers`
library from the bundle's tokenizer.json; the torch backend is imported only when asked for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import ConfigError
from .bundle import Bundle, BundleError
from .generator import Generator, ModelFacts, Request
from .onnxruntime import OrtSegments

BACKENDS = ("onnxruntime", "torch", "tensorrt")


def facts_from_manifest(bundle: Bundle) -> ModelFacts:
    model = bundle.model
    return ModelFacts(
        architecture=bundle.architecture,
        latent_channels=int(model["latent_channels"]),
        patch_size=int(model["patch_size"]),
        vae_scale_factor=int(model["vae_scale_factor"]),
        default_image_size=int(bundle.manifest["resolutions"][0][0]),
        num_classes=int(model.get("num_classes", 0)),
        uses_size_conditions=bool(model.get("uses_size_conditions", False)),
    )


class BundleGenerator(Generator):
    """Runs a bundle's plans with ONNX Runtime: text encoder, segments, VAE decoder."""

    def __init__(
        self,
        bundle: Bundle,
        providers: list[str] | None = None,
        threads: int | None = None,
        variant: str | None = None,
    ) -> None:
        self.bundle = bundle
        self.facts = facts_from_manifest(bundle)
        self.segments = OrtSegments(bundle, providers, threads, variant)
        self._tokenizer = None

    def latent_size(self, request: Request) -> tuple[int, int]:
        height = request.height or self.bundle.manifest["resolutions"][0][0]
        width = request.width or self.bundle.manifest["resolutions"][0][1]
        if [height, width] not in self.bundle.manifest["resolutions"]:
            sizes = ", ".join(f"{h}x{w}" for h, w in self.bundle.manifest["resolutions"])
            raise ConfigError(
                f"the bundle was built for {sizes}, not {height}x{width}; rebuild with --height/--width"
            )
        return super().latent_size(Request(height=height, width=width))

    def array(self, value: np.ndarray) -> np.ndarray:
        return value

    def concat(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from tokenizers import Tokenizer

            spec = self.bundle.manifest.get("tokenizer")
            if not spec:
                raise ConfigError(
                    "this bundle has no tokenizer (class-conditional model); pass --class-label"
                )
            tokenizer = Tokenizer.from_file(str(self.bundle.path / spec["file"]))
            length = int(spec["max_length"])
            tokenizer.enable_truncation(length)
            tokenizer.enable_padding(
                length=length,
                pad_id=int(spec["pad_id"]),
                pad_token=tokenizer.id_to_token(int(spec["pad_id"])),
            )
            self._tokenizer = tokenizer
        return self._tokenizer

    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        encoding = self.tokenizer.encode(prompt.lower().strip())  # as the PixArt pipelines preprocess
        ids = np.array([encoding.ids], dtype=np.int64)
        mask = np.array([encoding.attention_mask], dtype=np.int64)
        embeds = self.segments.run("text_encoder", {"input_ids": ids, "attention_mask": mask})[
            "prompt_embeds"
        ]
        return embeds, mask

    def decode(self, latents: np.ndarray) -> np.ndarray:
        images = self.segments.run("vae_decoder", {"latents": np.asarray(latents, dtype=np.float32)})[
            "images"
        ]
        return (images.transpose(0, 2, 3, 1) * 255).round().clip(0, 255).astype(np.uint8)


def open_generator(
    source: str | Path,
    backend: str = "onnxruntime",
    verify_hashes: bool = True,
    variant: str | None = None,
    device: str = "cpu",
) -> Generator:
    """A generator for a bundle (ONNX Runtime, optionally a precision variant, or its torch model).

    `device` is where the torch backend runs; ONNX Runtime runs here on the CPU, TensorRT on the GPU."""
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if device != "cpu" and backend != "torch":
        raise ConfigError(f"--device {device} is for the torch backend; {backend} chooses its own")
    bundle = Bundle.load(source, verify_hashes)
    if variant is not None:
        bundle.segment_spec("embed", variant)  # fails early with the list of variants
        if backend == "torch":
            raise ConfigError(f"variant {variant!r} runs on onnxruntime or tensorrt, not torch")
    if backend == "tensorrt":  # engines built by `ilf-deploy build-engines`; needs a GPU + TensorRT
        from ..backends.tensorrt import open_trt_generator

        return open_trt_generator(bundle, variant)
    if backend == "onnxruntime":
        return BundleGenerator(bundle, variant=variant)
    if not bundle.manifest.get("torch_model"):
        raise BundleError(
            "this bundle was built without its torch model (--no-copy-model); use --backend onnxruntime"
        )
    from ..loading import load_model
    from ..reference import TorchGenerator

    return TorchGenerator(load_model(bundle.path / bundle.manifest["torch_model"]), device)
