"""Build a bundle: export every segment the bundle's plans need, plus text encoder and VAE decoder."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..adapters import make_adapter
from ..errors import ConfigError
from ..loading import LoadedModel, load_model
from ..runtime.bundle import MANIFEST, SCHEMA_VERSION, sha256_file, tool_versions
from .onnx import export_segment, onnx_io
from .segments import segment_specs

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
DEFAULT_PLANS = ("base-20", "ilf-10", "cache-20")


@dataclass(frozen=True)
class BuildOptions:
    plans: Sequence[str] = DEFAULT_PLANS
    precision: str = "fp32"
    max_batch: int = 1
    resolutions: Sequence[tuple[int, int]] = ()  # (height, width) in pixels; default: the model's
    copy_model: bool = True  # keep the source pipeline inside, for the torch backend and `verify`
    force: bool = False


def build_bundle(
    source: str | Path,
    out: Path,
    options: BuildOptions = BuildOptions(),
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Export into a temporary directory and rename it into place only when everything succeeded."""
    if options.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
    if options.max_batch < 1:
        raise ConfigError(f"max batch must be >= 1, got {options.max_batch}")
    out = Path(out)
    if out.exists() and not options.force and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists; choose another --out or pass --force to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"output directory {out.parent} does not exist")
    model = load_model(source)
    if model.vae is None or (model.architecture != "dit" and model.text_encoder is None):
        raise ConfigError(
            f"{source} is not a full pipeline directory (a bundle needs the text encoder and VAE)"
        )
    loop = model.feedback.loop if model.feedback else None
    plans = [model.resolve_plan(p) for p in options.plans]
    if len({p.name for p in plans}) != len(plans):
        raise ConfigError("two plans have the same name")
    for plan in plans:
        if plan.feedback_steps and (model.feedback is None or plan.loop != loop):
            raise ConfigError(
                f"plan {plan.name!r} needs the feedback module for loop {plan.loop}; the model has {loop}"
            )
    resolutions = list(options.resolutions) or [(model.default_image_size,) * 2]
    _check_resolutions(model, resolutions)

    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        manifest = _export_all(model, plans, resolutions, options, tmp, progress)
        manifest["files"] = {
            str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        tmp.chmod(0o755)
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        tmp.rename(out)
        return
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def _check_resolutions(model: LoadedModel, resolutions: Sequence[tuple[int, int]]) -> None:
    factor = model.vae_scale_factor * model.adapter.patch_size
    for height, width in resolutions:
        if height <= 0 or width <= 0 or height % factor or width % factor:
            raise ConfigError(f"resolution {height}x{width} must be positive multiples of {factor}")
        if model.architecture == "dit" and height != width:
            raise ConfigError("DiT generates square images only")


def _export_all(model, plans, resolutions, options, root: Path, progress) -> dict:
    adapter, feedback = model.adapter, model.feedback
    dtype = PRECISIONS[options.precision]
    cut_points = sorted({p for plan in plans for p in plan.cut_points})
    loop = feedback.loop if feedback else None
    examples = example_tensors(model, resolutions[0])

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    with_feedback = feedback is not None and any(plan.feedback_steps for plan in plans)
    specs = segment_specs(model, cut_points, with_feedback)
    if dtype != torch.float32:  # one low-precision copy of the backbone; the model stays fp32
        low_specs = {s.name: s for s in segment_specs(_cast(model, dtype), cut_points, with_feedback)}
    segments = {}
    for index, spec in enumerate(specs):
        if progress:
            progress(spec.name, index, len(specs))
        low = dtype != torch.float32 and not spec.keep_fp32
        module = low_specs[spec.name].module if low else spec.module
        args = tuple(cast(examples[n]) if low else examples[n] for n in spec.inputs)
        path = root / "onnx" / f"{spec.name}.onnx"
        export_segment(module, args, path, spec.inputs, spec.outputs)
        io_in, io_out = onnx_io(path)
        segments[spec.name] = {
            "file": f"onnx/{spec.name}.onnx",
            "inputs": io_in,
            "outputs": io_out,
            "blocks": spec.blocks,
        }
    if progress:
        progress("plans", len(specs), len(specs))

    (root / "positions").mkdir()
    latent_sizes = []
    for height, width in resolutions:
        h, w = height // model.vae_scale_factor, width // model.vae_scale_factor
        pos = adapter.pos_embed(h, w).detach().to(torch.float32).numpy()
        np.save(root / "positions" / f"{h}x{w}.npy", pos)
        latent_sizes.append([h, w])
    (root / "plans").mkdir()
    for plan in plans:
        plan.save(root / "plans" / f"{plan.name}.json")
    tokenizer = None
    if model.tokenizer is not None:
        (root / "tokenizer").mkdir()
        model.tokenizer.backend_tokenizer.save(str(root / "tokenizer" / "tokenizer.json"))
        tokenizer = {
            "file": "tokenizer/tokenizer.json",
            "max_length": adapter.max_sequence_length,
            "pad_id": int(model.tokenizer.pad_token_id or 0),
        }
    if options.copy_model and model.path is not None:
        shutil.copytree(model.path, root / "model", ignore=shutil.ignore_patterns(".*"))
    return {
        "schema_version": SCHEMA_VERSION,
        "architecture": model.architecture,
        "config_hash": model.config_hash,
        "model": _model_facts(model),
        "feedback": {"loop": list(loop)} if loop else None,
        "precision": options.precision,
        "max_batch": options.max_batch,
        "resolutions": [list(r) for r in resolutions],
        "latent_sizes": latent_sizes,
        "cut_points": cut_points,
        "segments": segments,
        "plans": {plan.name: f"plans/{plan.name}.json" for plan in plans},
        "tokenizer": tokenizer,
        "scheduler": model.scheduler_config,
        "torch_model": "model" if options.copy_model and model.path is not None else None,
        "tools": tool_versions(),
    }


def example_tensors(model: LoadedModel, resolution: tuple[int, int]) -> dict[str, torch.Tensor]:
    """One consistent set of example inputs (batch 2, as with guidance) for tracing every segment."""
    adapter = model.adapter
    gen = torch.Generator().manual_seed(0)
    h, w = (r // model.vae_scale_factor for r in resolution)
    batch = 2
    ex: dict[str, torch.Tensor] = {
        "latents": torch.randn(batch, adapter.latent_channels, h, w, generator=gen),
        "pos_embed": adapter.pos_embed(h, w).detach().float(),
        "timestep": torch.full((batch,), 500.0),
    }
    if model.architecture == "dit":
        ex["class_labels"] = torch.tensor([1, adapter.num_classes])
    else:
        length = 8
        ex["input_ids"] = torch.randint(3, 20, (batch, length), generator=gen)
        ex["attention_mask"] = torch.ones(batch, length, dtype=torch.int64)
        ex["prompt_embeds"] = torch.randn(batch, length, model.text_encoder.config.d_model, generator=gen)
        ex["prompt_mask"] = ex["attention_mask"]
        if adapter.uses_size_conditions:
            ex["resolution"] = torch.tensor([list(map(float, resolution))] * batch)
            ex["aspect_ratio"] = torch.tensor([[resolution[0] / resolution[1]]] * batch)
    with torch.no_grad():
        context = adapter.context({k: ex[k] for k in adapter.context_inputs})
        cond = adapter.conditioning(torch.tensor([500.0]), context)
        ex.update(cond)
        ex["hidden"] = adapter.embed_tokens(ex["latents"], ex["pos_embed"])
        ex["feed"] = torch.randn(ex["hidden"].shape, generator=gen)
    return ex


def _cast(model: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """The backbone and feedback in `dtype` (copies); text encoder and VAE are not exported from it."""
    transformer = copy.deepcopy(model.adapter.transformer).to(dtype)
    feedback = copy.deepcopy(model.feedback).to(dtype) if model.feedback is not None else None
    adapter = make_adapter(model.architecture, transformer)
    return dataclasses.replace(model, adapter=adapter, feedback=feedback)


def _model_facts(model: LoadedModel) -> dict:
    adapter = model.adapter
    facts = {
        "num_blocks": adapter.num_blocks,
        "latent_channels": adapter.latent_channels,
        "out_channels": int(adapter.transformer.out_channels),
        "patch_size": adapter.patch_size,
        "sample_size": adapter.sample_size,
        "vae_scale_factor": model.vae_scale_factor,
        "default_image_size": model.default_image_size,
        "context_inputs": list(adapter.context_inputs),
        "uses_size_conditions": bool(getattr(adapter, "uses_size_conditions", False)),
    }
    if model.architecture == "dit":
        facts["num_classes"] = adapter.num_classes
        facts["id2label"] = model.extras.get("id2label", {})
    return facts
