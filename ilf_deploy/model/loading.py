"""Load a diffusion transformer (+ ILF feedback) from a diffusers directory or a hub id."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ilf_deploy.core.errors import ConfigError, ModelLoadError
from ilf_deploy.core.plan import StepPlan, resolve_plan
from ilf_deploy.core.schedulers import (
    DIT_SCHEDULER_CONFIG,
    FLUX_DEV_SCHEDULER_CONFIG,
    FLUX_SCHNELL_SCHEDULER_CONFIG,
    PIXART_SCHEDULER_CONFIG,
    SANA_SCHEDULER_CONFIG,
    SD3_SCHEDULER_CONFIG,
    for_image_tokens,
    for_pipeline,
)
from ilf_deploy.model.adapters import PIPELINE_ARCHITECTURES, TRANSFORMER_ARCHITECTURES, Adapter, make_adapter
from ilf_deploy.model.ilf import FEEDBACK_DIR, FeedbackModule

DEFAULT_MODEL = (
    Path(__file__).parents[1] / "default_model"
)  # the embedded model; `make default-model` retrains
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a pipeline needs from a hub repo: configs, tokenizer files and safetensors weights.
HUB_PATTERNS = ["*.json", "*.txt", "*.model", "*.safetensors", "feedback/*"]
# Families whose prompts the diffusers pipeline encodes (`LoadedModel.text_pipeline`).
TEXT_PIPELINE_ARCHITECTURES = ("sd3", "flux", "sana")
# The VAE's downsampling where a bare transformer directory has none: Sana's DC-AE 32x, else 8x.
_DEFAULT_VAE_SCALE = {"sana": 32}
AUTO_PLAN = "auto"  # `--plan auto` (backends.plans.AUTO_PLAN, for bundles: the plan search's choice)
MODEL_AUTO_PLAN = "ilf-10"  # what `auto` means for a model directory


def torch_device(name: str | torch.device) -> torch.device:
    """`name` as a torch device this machine has (cpu, cuda, cuda:N), else a one-line ConfigError."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {str(name)!r}; e.g. cpu, cuda, cuda:1") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {str(name)!r}: this PyTorch sees no CUDA GPU")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ConfigError(
                f"device {str(name)!r}: this machine has {count} CUDA GPU(s), cuda:0..{count - 1}"
            )
    elif device.type != "cpu":
        raise ConfigError(f"device {str(name)!r}: only cpu and cuda are supported")
    return device


@dataclass
class LoadedModel:
    architecture: str
    source: str
    adapter: Adapter
    scheduler_config: dict[str, Any]
    feedback: FeedbackModule | None = None
    tokenizer: Any | None = None
    text_encoder: nn.Module | None = None
    vae: nn.Module | None = None
    path: Path | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    # SD3, Flux, Sana: the diffusers pipeline holding their text encoders and tokenizers (transformer
    # shared); the torch reference encodes prompts with its own `encode_prompt`.
    text_pipeline: Any | None = None

    @property
    def guidance(self) -> str:
        """How a guidance scale reaches the model (runtime.generator.ModelFacts.guidance)."""
        if self.architecture != "flux":
            return "cfg"
        return "embedded" if self.adapter.config.guidance_embeds else "none"

    @property
    def vae_scale_factor(self) -> int:
        if self.vae is None:
            return _DEFAULT_VAE_SCALE.get(self.architecture, 8)
        config = self.vae.config  # AutoencoderKL: block_out_channels; AutoencoderDC (Sana): encoder_...
        levels = (
            config.encoder_block_out_channels if self.architecture == "sana" else config.block_out_channels
        )
        return 2 ** (len(levels) - 1)

    @property
    def config_hash(self) -> str:
        """sha256 of the transformer's config: a bundle records it, `verify --model` compares it."""
        config = json.dumps(dict(self.adapter.config), sort_keys=True, default=str)
        return hashlib.sha256(config.encode()).hexdigest()

    @property
    def default_image_size(self) -> int:
        return self.adapter.sample_size * self.vae_scale_factor

    def to(self, device: str | torch.device) -> LoadedModel:
        """Move every torch part (transformer, feedback, text encoder, VAE) to `device`."""
        for part in (self.adapter.transformer, self.feedback, self.text_encoder, self.vae):
            if part is not None:
                part.to(device)
        if self.text_pipeline is not None:
            self.text_pipeline.to(device)
        return self

    def image_tokens(self, height: int, width: int) -> int:
        """The transformer's image tokens at height x width pixels (what a flow shift depends on)."""
        factor = self.vae_scale_factor * self.adapter.patch_size
        return (height // factor) * (width // factor)

    def resolve_plan(
        self, spec: str, sizes: Sequence[tuple[int, int]] = (), say: Callable[[str], None] | None = None
    ) -> StepPlan:
        """A plan file or preset for this model: depth, scheduler, and the feedback's loop and t_post.
        Where the schedule depends on the image size (Flux-dev), it is made for each of `sizes`
        (height, width in pixels; default: the model's default size). `auto` is ilf-10 here (a model
        has no plan search; `say` gets why): bundles resolve specs in backends.plans."""
        if spec == AUTO_PLAN:
            if say is not None:
                say(f"auto plan: {MODEL_AUTO_PLAN} (a model has no plan search; build a bundle and tune it)")
            spec = MODEL_AUTO_PLAN
        fb = self.feedback.config if self.feedback is not None else None
        loop, t_post = (fb.loop, fb.t_post) if fb is not None else (None, "rescale")
        size = self.default_image_size
        tokens = [self.image_tokens(h, w) for h, w in sizes or [(size, size)]]
        config = for_image_tokens(self.scheduler_config, tokens)
        return resolve_plan(spec, self.adapter.num_blocks, config, loop, t_post)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from None


def resolve_source(source: str | Path) -> Path:
    """A local directory, `default` (the embedded model), or a hub id downloaded to the local cache."""
    if str(source) == "default" and not Path("default").exists():
        source = DEFAULT_MODEL
    path = Path(source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"{source} is a file; expected a diffusers pipeline or transformer directory"
            )
        return path
    text = str(source)
    if not HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelLoadError(f"model directory {source} does not exist")
    return download(text)


def download(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=HUB_PATTERNS))
    except Exception as exc:  # network, auth, missing repo: all the user can act on is the message
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelLoadError(
            f"could not fetch {repo_id!r} from the hub ({reason}); pass a local directory"
        ) from None


def detect_architecture(path: Path) -> tuple[str, bool]:
    """(architecture, is_pipeline_dir) for a pipeline directory or a bare transformer directory."""
    if (path / "model_index.json").is_file():
        name = _read_json(path / "model_index.json").get("_class_name", "")
        if name not in PIPELINE_ARCHITECTURES:
            known = ", ".join(PIPELINE_ARCHITECTURES)
            raise ModelLoadError(f"unknown architecture: pipeline {name!r} in {path} (supported: {known})")
        return PIPELINE_ARCHITECTURES[name], True
    if (path / "config.json").is_file():
        name = _read_json(path / "config.json").get("_class_name", "")
        if name not in TRANSFORMER_ARCHITECTURES:
            known = ", ".join(TRANSFORMER_ARCHITECTURES)
            raise ModelLoadError(f"unknown architecture: model {name!r} in {path} (supported: {known})")
        return TRANSFORMER_ARCHITECTURES[name], False
    raise ModelLoadError(f"{path} is not a diffusers directory (no model_index.json or config.json)")


def load_model(
    source: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    with_pipeline: bool = True,
    with_feedback: bool = True,
) -> LoadedModel:
    """Load transformer, feedback and (for pipeline directories) tokenizer, text encoder and VAE.

    `with_feedback=False` ignores `feedback/` (training a new one: it may hold only a checkpoint)."""
    path = resolve_source(source)
    architecture, is_pipeline = detect_architecture(path)
    quiet_huggingface()
    transformer_dir = path / "transformer" if is_pipeline else path
    try:
        transformer = _load_transformer(architecture, transformer_dir, dtype)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelLoadError(f"cannot load the transformer from {transformer_dir}: {exc}") from None
    transformer.eval().requires_grad_(False)
    adapter = make_adapter(architecture, transformer)
    default_scheduler = default_scheduler_config(architecture, adapter.config)
    scheduler_path = path / "scheduler" / "scheduler_config.json"
    scheduler_config = _read_json(scheduler_path) if scheduler_path.is_file() else dict(default_scheduler)
    if architecture in ("sd3", "flux"):  # the pipeline decides how flow sigmas are prepared
        scheduler_config = for_pipeline(scheduler_config, architecture)
    model = LoadedModel(architecture, str(source), adapter, scheduler_config, path=path)
    feedback_dir = path / FEEDBACK_DIR
    if with_feedback and feedback_dir.is_dir():
        model.feedback = FeedbackModule.load(feedback_dir, adapter).eval().requires_grad_(False)
    if is_pipeline and with_pipeline:
        _load_pipeline_parts(model, path, dtype)
    return model


def quiet_huggingface() -> None:
    """Our own progress and errors replace the libraries' per-file bars and warnings."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()


def default_scheduler_config(architecture: str, transformer_config: Mapping[str, Any]) -> dict[str, Any]:
    """The scheduler a bare transformer directory runs with: its family's reference checkpoint's."""
    if architecture == "dit":
        return dict(DIT_SCHEDULER_CONFIG)
    if architecture == "sd3":
        return dict(SD3_SCHEDULER_CONFIG)
    if architecture == "flux":
        guided = bool(transformer_config.get("guidance_embeds"))
        return dict(FLUX_DEV_SCHEDULER_CONFIG if guided else FLUX_SCHNELL_SCHEDULER_CONFIG)
    if architecture == "sana":
        return dict(SANA_SCHEDULER_CONFIG)
    return dict(PIXART_SCHEDULER_CONFIG)


def _load_transformer(architecture: str, directory: Path, dtype: torch.dtype) -> nn.Module:
    import diffusers

    cls = {
        "dit": diffusers.DiTTransformer2DModel,
        "sd3": diffusers.SD3Transformer2DModel,
        "flux": diffusers.FluxTransformer2DModel,
        "sana": diffusers.SanaTransformer2DModel,
    }.get(architecture, diffusers.PixArtTransformer2DModel)
    return cls.from_pretrained(directory, torch_dtype=dtype)


def _load_text_pipeline(model: LoadedModel, path: Path, dtype: torch.dtype) -> None:
    """SD3/Flux/Sana: the diffusers pipeline, sharing the loaded transformer (text encoders, VAE)."""
    import diffusers

    cls = {
        "sd3": diffusers.StableDiffusion3Pipeline,
        "flux": diffusers.FluxPipeline,
        "sana": diffusers.SanaPipeline,
    }[model.architecture]
    pipe = cls.from_pretrained(path, transformer=model.adapter.transformer, dtype=dtype)
    for part in pipe.components.values():
        if isinstance(part, nn.Module):
            part.eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    model.text_pipeline, model.vae = pipe, pipe.vae


def _load_pipeline_parts(model: LoadedModel, path: Path, dtype: torch.dtype) -> None:
    from diffusers import AutoencoderKL

    try:
        if model.architecture in TEXT_PIPELINE_ARCHITECTURES:
            _load_text_pipeline(model, path, dtype)
            return
        if (path / "vae").is_dir():
            model.vae = (
                AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype).eval().requires_grad_(False)
            )
        if model.architecture != "dit":
            from transformers import AutoTokenizer, T5EncoderModel

            model.tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
            encoder = T5EncoderModel.from_pretrained(path / "text_encoder", torch_dtype=dtype)
            model.text_encoder = encoder.eval().requires_grad_(False)
        else:
            index = _read_json(path / "model_index.json")
            model.extras["id2label"] = index.get("id2label") or {}
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load the pipeline parts of {path}: {exc}") from None


@dataclass(frozen=True)
class SanaPromptFormat:
    """How `SanaPipeline` (its `__call__` defaults) turns a prompt into Gemma-2 inputs: the prompt,
    lower-cased and stripped, is appended to the instruction lines joined by newlines (positive
    prompts only); padded ("right") to `len(tokens(instruction)) + max_sequence_length - 2` tokens
    (negative prompts: `max_sequence_length`); of the encoder's hidden states and the mask, the
    first token and the last `max_sequence_length - 1` are kept (section 3.1 of the Sana paper)."""

    max_sequence_length: int
    complex_human_instruction: tuple[str, ...]

    @property
    def instruction(self) -> str:
        return "\n".join(self.complex_human_instruction)

    def select_index(self) -> list[int]:
        return [0, *range(-self.max_sequence_length + 1, 0)]


def sana_prompt_format() -> SanaPromptFormat:
    """SanaPipeline's own defaults, read from its signature (one copy of the instruction text)."""
    import inspect

    from diffusers import SanaPipeline

    params = inspect.signature(SanaPipeline.__call__).parameters
    return SanaPromptFormat(
        int(params["max_sequence_length"].default), tuple(params["complex_human_instruction"].default)
    )
