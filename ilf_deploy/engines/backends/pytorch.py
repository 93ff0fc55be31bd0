"""The PyTorch backend, and the reference runner: executes any step plan with an adapter + ILF module.

Every other backend is checked against this one, and this one is checked against diffusers'
own pipelines (tests/test_pipeline_parity.py). It runs a model directory, or the model a bundle
carries (or the one `verify --model` names) with the bundle's request defaults.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import torch

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.bundle import Bundle, BundleError, sha256_file, write_atomic
from ilf_deploy.core.runtime.generator import Generator, ModelFacts, Request
from ilf_deploy.core.runtime.pipeline import facts_from_manifest
from ilf_deploy.core.runtime.runner import Timings
from ilf_deploy.model.adapters import Adapter, Cond, State
from ilf_deploy.model.ilf import FeedbackModule, inner_loop, run_blocks
from ilf_deploy.model.loading import LoadedModel, load_model, sana_prompt_format, torch_device


class TorchSegments:
    """The `Segments` of runtime.loop, backed by the torch modules."""

    compiles_per_shape = False  # eager modules run every shape as it comes

    def __init__(
        self, adapter: Adapter, feedback: FeedbackModule | None = None, device: torch.device | None = None
    ) -> None:
        self.adapter = adapter
        self.device = device or torch.device("cpu")
        self.feedback = feedback
        self.latent_channels = adapter.latent_channels
        self.num_blocks = adapter.num_blocks
        self.loop = feedback.loop if feedback is not None else None
        self.dtype = next(adapter.transformer.parameters()).dtype
        # Stage times as the bundle backends name them. On CUDA they are launch times (no sync).
        self.timings = Timings()

    def context(self, inputs: dict[str, torch.Tensor]) -> Cond:
        with self.timings.measure("context"):
            return self.adapter.context(inputs)

    def conditioning(self, timestep: float, context: Cond) -> Cond:
        with self.timings.measure("time"):
            return self.adapter.conditioning(
                torch.tensor([timestep], dtype=torch.float32, device=self.device), context
            )

    def embed(self, latents: torch.Tensor, cond: Cond) -> State:
        with self.timings.measure("embed"):
            return self.adapter.embed(latents, cond)

    def blocks(self, start: int, end: int, state: State, cond: Cond) -> State:
        with self.timings.measure(f"blocks_{start:02d}_{end:02d}"):
            return run_blocks(self.adapter, start, end, state, cond)

    def inner_loop(self, state: State, cond: Cond, cond_post: Cond) -> State:
        assert self.feedback is not None  # check_plan refuses feedback plans without a module
        with self.timings.measure("inner loop + feedback"):
            return inner_loop(self.adapter, self.feedback, state, cond, cond_post)

    def final(self, state: State, cond: Cond, height: int, width: int) -> torch.Tensor:
        with self.timings.measure("final"):
            return self.adapter.final(state, cond, height, width)

    def concat(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(arrays)

    def open_all(self) -> None:
        """The modules are loaded already."""

    def keep_static_shapes(self, count: int) -> None:
        """Eager modules run every shape as it comes."""


class TorchGenerator(Generator):
    """Prompt -> conditioning -> plan -> latents -> image, all in PyTorch, on `device` (cpu, cuda...).

    Moves `model` to `device`. The initial noise is drawn with numpy on the host, so every device
    starts from the same latents. `facts` (from a bundle's manifest) replace the model's own, so a
    bundle's torch model resolves a request exactly as the bundle's engines do."""

    backend = "torch"

    def __init__(
        self, model: LoadedModel, device: str | torch.device = "cpu", facts: ModelFacts | None = None
    ) -> None:
        self.device = torch_device(device)
        self.model = model.to(self.device)
        self.segments = TorchSegments(model.adapter, model.feedback, self.device)
        adapter = model.adapter
        size = model.default_image_size
        self.facts = facts or ModelFacts(
            architecture=model.architecture,
            latent_channels=adapter.latent_channels,
            patch_size=adapter.patch_size,
            vae_scale_factor=model.vae_scale_factor,
            default_size=(size, size),
            num_classes=getattr(adapter, "num_classes", 0),
            uses_size_conditions=getattr(adapter, "uses_size_conditions", False),
            position_ids="img_ids" in adapter.context_inputs,
            guidance=model.guidance,
        )

    @property
    def adapter(self) -> Adapter:
        return self.model.adapter

    def inference_context(self) -> torch.inference_mode:
        return torch.inference_mode()

    def array(self, value: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(value).to(self.device)
        return tensor.to(self.segments.dtype) if tensor.is_floating_point() else tensor

    def concat(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(arrays)

    @torch.no_grad()
    def encode_negative_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        if self.model.text_pipeline is not None:
            return self._encode_with_pipeline(prompt, negative=True)
        return self.encode_prompt(prompt)

    def _encode_with_pipeline(self, prompt: str, negative: bool) -> dict[str, torch.Tensor]:
        with self.segments.timings.measure("text_encoder"):
            encoded = encode_with_pipeline(self.model, prompt, self.device, negative=negative)
        return {
            name: value.to(self.segments.dtype) if value.is_floating_point() else value
            for name, value in encoded.items()
        }

    @torch.no_grad()
    def encode_prompt(self, prompt: str) -> dict[str, torch.Tensor]:
        if self.model.text_pipeline is not None:  # SD3, Flux, Sana: the pipeline's own encode_prompt
            return self._encode_with_pipeline(prompt, negative=False)
        if self.model.tokenizer is None or self.model.text_encoder is None:
            raise ConfigError(f"{self.model.source} has no tokenizer/text encoder; pass a pipeline directory")
        tokens = self.model.tokenizer(
            prompt.lower().strip(),  # as the PixArt pipelines' _text_preprocessing without clean_caption
            padding="max_length",
            max_length=self.adapter.max_sequence_length,  # type: ignore[attr-defined]
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        with self.segments.timings.measure("text_encoder"):
            embeds = self.model.text_encoder(ids, attention_mask=mask)[0]
        return {"prompt_embeds": embeds.to(self.segments.dtype), "prompt_mask": mask}

    @torch.no_grad()
    def generate_latents(self, plan, request, latents=None, on_step=None) -> torch.Tensor:
        if isinstance(latents, torch.Tensor):
            latents = latents.detach().float().cpu().numpy()
        return super().generate_latents(plan, request, latents, on_step)

    @torch.no_grad()
    def decode(self, latents) -> np.ndarray:
        if self.model.vae is None:
            raise ConfigError(f"{self.model.source} has no VAE; pass a pipeline directory")
        vae = self.model.vae
        latents = torch.as_tensor(latents).to(device=self.device, dtype=vae.dtype)
        latents = latents / vae.config.scaling_factor
        if getattr(vae.config, "shift_factor", None) is not None:  # SD3, Flux: the VAE's latent shift
            latents = latents + vae.config.shift_factor
        with self.segments.timings.measure("vae_decoder"):
            images = vae.decode(latents).sample
        images = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float().cpu().numpy()
        return (images * 255).round().astype(np.uint8)


def encode_with_pipeline(
    model: LoadedModel, prompt: str, device: torch.device, negative: bool = False
) -> dict[str, torch.Tensor]:
    """SD3's CLIP-L + CLIP-G + T5, Flux's CLIP + T5 or Sana's Gemma-2 embeddings, by the pipeline's
    `encode_prompt` (the reference every other text path is checked against), with its default
    sequence length. Sana encodes a `negative` prompt as SanaPipeline does its negative prompt:
    without the instruction (then the select-index keeps every token)."""
    pipe = model.text_pipeline
    assert pipe is not None
    if model.architecture == "sana":
        fmt = sana_prompt_format()
        embeds, mask, _, _ = pipe.encode_prompt(
            prompt,
            do_classifier_free_guidance=False,
            device=device,
            max_sequence_length=fmt.max_sequence_length,
            complex_human_instruction=None if negative else list(fmt.complex_human_instruction),
        )
        return {"prompt_embeds": embeds, "prompt_mask": mask}
    if model.architecture == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt, None, None, device=device, do_classifier_free_guidance=False
        )
    else:
        embeds, pooled, _ = pipe.encode_prompt(prompt, None, device=device)
    return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}


def bundle_model(bundle: Bundle, model: str | Path | None = None) -> LoadedModel:
    """The PyTorch model of a bundle: the copy inside it, or `model` (a directory) when given; a
    model whose config hash differs from the manifest's is refused."""
    if model is None:
        if not bundle.manifest.torch_model:
            raise BundleError(
                "this bundle was built without its torch model (--no-copy-model); "
                "pass the model directory with --model"
            )
        return load_model(bundle.path / bundle.manifest.torch_model)
    loaded = load_model(model)
    want, got = bundle.manifest.config_hash, loaded.config_hash
    if want != got:
        raise BundleError(
            f"{model} is not the model this bundle was built from (config hash {got[:12]}, "
            f"the bundle's {str(want)[:12]})"
        )
    return loaded


COMPILE_CACHE_DIR = "torch_compile_cache"  # in the bundle, beside openvino_cache/; not a manifest file
COMPILE_CACHE_SEAL = "ilf-seal.json"  # in it: every other file's sha256, written at a clean exit
SEAL_FORMAT = "ilf-inductor-cache-1"
log = logging.getLogger("ilf_deploy.torch")
_sealed_at_exit: set[Path] = set()


def _cache_files(cache: Path) -> dict[str, str]:
    return {
        str(p.relative_to(cache)): sha256_file(p)
        for p in sorted(cache.rglob("*"))
        if p.is_file() and p.name != COMPILE_CACHE_SEAL
    }


def check_compile_cache(cache: Path) -> bool:
    """Inductor imports its cached kernels by name, never checking their bytes: a cache whose files
    are not exactly those its seal lists (a file swapped, edited or added since, or no seal: a
    process that did not exit cleanly) is emptied, logged, and compiled again. True: kept."""
    if not any(p.is_file() for p in cache.rglob("*")):
        return True
    try:
        seal = json.loads((cache / COMPILE_CACHE_SEAL).read_text("utf-8"))
        kept = seal == {"format": SEAL_FORMAT, "files": _cache_files(cache)}
    except (OSError, ValueError):
        kept = False
    if not kept:
        log.warning("Inductor cache %s does not match its seal: emptied, recompiling", cache)
        shutil.rmtree(cache)
        cache.mkdir()
    return kept


def seal_compile_cache(cache: Path) -> None:
    """Record every file of the cache (at exit: Inductor writes kernels as blocks meet new shapes)."""
    if cache.is_dir():
        seal = {"format": SEAL_FORMAT, "files": _cache_files(cache)}
        write_atomic(cache / COMPILE_CACHE_SEAL, json.dumps(seal, sort_keys=True).encode())


def use_compile_cache(cache: Path) -> None:
    """Make `cache` the process's Inductor cache (read on every compile) where it is writable, checked
    against its seal on the process's first use only: what is added after that is this process's own
    kernels (a second compiled engine, e.g. `tune`'s torch fp32 after its bf16), sealed at exit. A
    read-only bundle leaves Inductor's default cache."""
    import os

    try:
        cache.mkdir(exist_ok=True)
        if not os.access(cache, os.W_OK):
            return
        if cache.resolve() not in _sealed_at_exit:
            check_compile_cache(cache)
            _sealed_at_exit.add(cache.resolve())
            atexit.register(seal_compile_cache, cache.resolve())
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache.resolve())
    except OSError:
        pass


def open_generator(
    bundle: Bundle,
    variant: str | None = None,
    device: str = "cpu",
    model: str | Path | None = None,
    dtype: str | None = None,
    compile: bool = False,
) -> TorchGenerator:
    """The registry's entry: the bundle's torch model (or `model`), with the bundle's defaults.
    `dtype="bf16"` runs the transformer and feedback in bfloat16 (`tune`'s torch bf16 candidate;
    the text encoder stays fp32, as in diffusers' bf16 pipelines the latents follow the model).
    `compile=True` compiles every transformer block and the feedback block with `torch.compile`
    (Inductor; `compile_blocks`)."""
    if variant is not None:
        raise ConfigError(f"variant {variant!r} runs on a bundle engine (e.g. onnxruntime), not torch")
    if dtype not in (None, "fp32", "bf16"):
        raise ConfigError(f"the torch backend's dtype is fp32 or bf16, got {dtype!r}")
    loaded = bundle_model(bundle, model)
    if dtype == "bf16":
        loaded.adapter.transformer.to(torch.bfloat16)
        if loaded.feedback is not None:
            loaded.feedback.to(torch.bfloat16)
    generator = TorchGenerator(loaded, device, facts_from_manifest(bundle))
    if compile:
        compile_blocks(loaded, bundle.path / COMPILE_CACHE_DIR)
    return generator


def compile_blocks(model: LoadedModel, cache: Path | None = None) -> None:
    """`torch.compile` every transformer block and the feedback block in place (Inductor: fused CPU
    kernels, CUDA kernels on a GPU). Weights are not frozen: Inductor's `freezing` (and
    `max_autotune`) measured no faster on one PixArt-XL block in bf16 on 2 Zen 4 cores (72-74 ms a
    call, compiled with or without them; eager 75-77), and freezing keeps a second copy of the
    weights; on an AMX CPU, unmeasured, they may pay. Each block is
    compiled on its first call and the generated code cached on disk, in `cache` where it is
    writable (Inductor's FX graph cache: a second process skips most of the work), else in
    Inductor's default directory. The whole backbone is not compiled as one graph: plans call block
    ranges, so one graph per block serves every plan."""
    if cache is not None:
        use_compile_cache(cache)
    blocks = list(model.adapter.blocks) + ([model.feedback.block] if model.feedback is not None else [])
    for block in blocks:
        block.compile(dynamic=None)  # static shapes first, dynamic after a second shape


def profile_block_changes(generator: TorchGenerator, plan: StepPlan, requests: list[Request]) -> np.ndarray:
    """Block Caching's profile (003, eq. 6): mean relative L1 change of each block's output
    between consecutive steps of `plan` (a baseline plan), averaged over `requests`."""
    adapter = generator.adapter
    outputs: list[list[torch.Tensor]] = []

    def record(_module, _inputs, output):
        # An MMDiT block returns (text, image) tokens (SD3's last: (None, image)): all of them count.
        parts = output if isinstance(output, tuple) else (output,)
        outputs[-1].append(torch.cat([p.detach().flatten(1) for p in parts if p is not None], dim=1))

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
