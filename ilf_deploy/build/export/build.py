"""Build a bundle: export every segment the bundle's plans need, plus text encoder and VAE decoder."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import itertools
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ilf_deploy.build.export.cross_kv import cached_attentions, project_kv
from ilf_deploy.build.export.onnx import check_exporter, export_segment, onnx_io, uses_torchscript
from ilf_deploy.build.export.segments import segment_specs, tokenizer_inputs
from ilf_deploy.core.errors import ConfigError, IlfError, check_at_least
from ilf_deploy.core.files import staged_directory, sweep_staged
from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.bundle import (
    SCHEMA_VERSION,
    schema_version_for,
    sha256_file,
    strict_json,
    tool_versions,
    write_manifest,
)
from ilf_deploy.core.runtime.request import MAX_SIDE
from ilf_deploy.model.adapters import feed_name, make_adapter
from ilf_deploy.model.loading import LoadedModel, load_model, sana_prompt_format

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16}
BACKENDS = ("onnxruntime", "tensorrt")  # tensorrt: TensorRT engines too, built inside the workspace
DEFAULT_PLANS = ("base-20", "ilf-10", "cache-20")


@dataclass(frozen=True)
class BuildOptions:
    plans: Sequence[str] = DEFAULT_PLANS
    precision: str = "fp32"
    max_batch: int = 1
    resolutions: Sequence[tuple[int, int]] = ()  # (height, width) in pixels; default: the model's
    copy_model: bool = True  # keep the source pipeline inside, for the torch backend and `verify`
    force: bool = False
    backend: str = "onnxruntime"
    exporter: str = "auto"  # export/onnx.py EXPORTERS: auto = TorchScript for PixArt/DiT, else torch.export
    cache_cross_kv: bool = (
        True  # caption cross-attention K/V once per image (PixArt, Sana: export/cross_kv.py)
    )


def build_bundle(
    source: str | Path,
    out: Path,
    options: BuildOptions = BuildOptions(),
    progress: Callable[[str, int, int], None] | None = None,
) -> Path:
    """Export into a staging directory beside `out` (with `backend="tensorrt"`, build the TensorRT
    engines there too) and rename it into place once, only when everything succeeded."""
    _check_options(options)
    out = Path(out)
    with contextlib.suppress(OSError):
        sweep_staged(out)  # a killed --force build's previous bundle is given back first
    if out.exists() and not options.force and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{out} exists; choose another --out or pass --force to replace it")
    if not out.parent.is_dir():
        raise ConfigError(f"output directory {out.parent} does not exist")
    if options.backend == "tensorrt":  # no GPU or no TensorRT: said before the export, not after it
        from ilf_deploy.engines.backends.tensorrt import current_environment

        current_environment()
    model = load_model(source)
    uses_torchscript(model.architecture, options.exporter)  # a family it cannot export: refused now
    texts = model.text_encoder is not None or model.text_pipeline is not None
    if model.vae is None or (model.architecture != "dit" and not texts):
        raise ConfigError(
            f"{source} is not a full pipeline directory (a bundle needs the text encoder and VAE)"
        )
    resolutions = list(options.resolutions) or [(model.default_image_size,) * 2]
    _check_resolutions(model, resolutions)
    plans = _resolve_plans(model, options.plans, resolutions)
    try:
        with staged_directory(out, replace=options.force) as tmp:
            manifest = _export_all(model, plans, resolutions, options, tmp, progress)
            manifest["files"] = {
                str(p.relative_to(tmp)): sha256_file(p) for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            write_manifest(tmp, manifest)
            if options.backend == "tensorrt":
                _build_engines(tmp, progress)
    except Exception as exc:
        os_error = _os_error(exc)
        if os_error is None:
            raise
        raise _build_error(os_error, out) from None
    return out


def _check_options(options: BuildOptions) -> None:
    if options.precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {options.precision!r}")
    check_at_least("max batch", options.max_batch)
    if options.backend not in BACKENDS:
        raise ConfigError(f"--backend must be {' or '.join(BACKENDS)}, got {options.backend!r}")
    check_exporter(options.exporter)


def _resolve_plans(
    model: LoadedModel, specs: Sequence[str], resolutions: list[tuple[int, int]]
) -> list[StepPlan]:
    """The bundle's plans; a schedule that depends on the size (Flux-dev) is tabulated for every
    bundle resolution."""
    loop = model.feedback.loop if model.feedback else None
    plans = [model.resolve_plan(p, resolutions) for p in specs]
    if len({p.name for p in plans}) != len(plans):
        raise ConfigError("two plans have the same name")
    for plan in plans:
        if plan.feedback_steps and (model.feedback is None or plan.loop != loop):
            raise ConfigError(
                f"plan {plan.name!r} needs the feedback module for loop {plan.loop}; the model has {loop}"
            )
    return plans


def _build_engines(workspace: Path, progress: Callable[[str, int, int], None] | None) -> None:
    """TensorRT engines for the bundle being built, in its workspace: the bundle is renamed into
    place once, with its engines and the manifest that lists them."""
    from ilf_deploy.engines.backends.tensorrt import build_engines

    def report(name: str, index: int, total: int) -> None:
        if progress:
            progress(f"{name} engine", index, total)

    build_engines(workspace, progress=report)


# -- file-system errors: one line ------------------------------------------------------------------

_NO_SPACE = {errno.ENOSPC, errno.EDQUOT}
_NO_PERMISSION = {errno.EACCES, errno.EPERM, errno.EROFS}


class BuildError(IlfError):
    """A build the file system stopped (a full disk, no permission); it left nothing behind."""


def _os_error(exc: BaseException) -> OSError | None:
    """The OSError behind `exc` (itself, or what it was raised from), if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen and not isinstance(current, IlfError):
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _build_error(exc: OSError, out: Path) -> BuildError:
    """One line: what the file system said, where, and what to do about it."""
    reason, filename, code = exc.strerror or str(exc) or type(exc).__name__, exc.filename, exc.errno
    if isinstance(exc, shutil.Error) and exc.args and isinstance(exc.args[0], list) and exc.args[0]:
        _, filename, reason = exc.args[0][0]  # copytree collects (src, dst, why) for every file
        code = next((c for c in (*_NO_SPACE, *_NO_PERMISSION) if os.strerror(c) in str(reason)), None)
    detail = f" ({filename})" if filename else ""
    if code in _NO_SPACE:
        hint = "free space or choose another --out"
    elif code in _NO_PERMISSION:
        hint = f"check the permissions of {out.parent} or choose another --out"
    else:
        hint = "choose another --out"
    return BuildError(f"build failed: {reason} while writing {out}{detail}; {hint}")


def _check_resolutions(model: LoadedModel, resolutions: Sequence[tuple[int, int]]) -> None:
    factor = model.vae_scale_factor * model.adapter.patch_size
    for height, width in resolutions:
        if height <= 0 or width <= 0 or height % factor or width % factor:
            raise ConfigError(f"resolution {height}x{width} must be positive multiples of {factor}")
        if max(height, width) > MAX_SIDE:  # what a request may ask for (core/runtime/request.py)
            raise ConfigError(f"resolution {height}x{width}: each side must be at most {MAX_SIDE} pixels")
        if model.architecture == "dit" and height != width:
            raise ConfigError("DiT generates square images only")


def _export_segments(
    model, cut_points: list[int], with_feedback: bool, options, example, root: Path, progress
):
    """Every segment to onnx/NAME.onnx; returns their manifest entries (file, I/O, blocks)."""
    dtype = PRECISIONS[options.precision]
    examples = example_tensors(model, example)

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(dtype) if t.is_floating_point() else t

    kv = options.cache_cross_kv
    specs = segment_specs(model, cut_points, with_feedback, kv)
    if dtype != torch.float32:  # one low-precision copy of the backbone; the model stays fp32
        low_specs = {s.name: s for s in segment_specs(_cast(model, dtype), cut_points, with_feedback, kv)}
    segments = {}
    for index, spec in enumerate(specs):
        if progress:
            progress(spec.name, index, len(specs))
        low = dtype != torch.float32 and not spec.keep_fp32
        module = low_specs[spec.name].module if low else spec.module
        args = tuple(cast(examples[n]) if low else examples[n] for n in spec.inputs)
        path = root / "onnx" / f"{spec.name}.onnx"
        export_segment(module, args, path, spec.inputs, spec.outputs, model.architecture, options.exporter)
        io_in, io_out = onnx_io(path)
        segments[spec.name] = {
            "file": f"onnx/{spec.name}.onnx",
            "inputs": io_in,
            "outputs": io_out,
            "blocks": spec.blocks,
        }
    if progress:
        progress("plans", len(specs), len(specs))
    return segments


def _write_positions(model, resolutions, root: Path) -> list[list[int]]:
    """positions/HxW.npy per latent size (models whose embed reads a positional table); returns the
    latent sizes."""
    latent_sizes = []
    for height, width in resolutions:
        h, w = height // model.vae_scale_factor, width // model.vae_scale_factor
        if model.adapter.uses_positions:
            (root / "positions").mkdir(exist_ok=True)
            pos = model.adapter.pos_embed(h, w).detach().to(torch.float32).numpy()
            np.save(root / "positions" / f"{h}x{w}.npy", pos)
        latent_sizes.append([h, w])
    return latent_sizes


def _export_all(model, plans, resolutions, options, root: Path, progress) -> dict:
    adapter, feedback = model.adapter, model.feedback
    cut_points = sorted({p for plan in plans for p in plan.cut_points})
    loop = feedback.loop if feedback else None
    with_feedback = feedback is not None and any(plan.feedback_steps for plan in plans)
    segments = _export_segments(model, cut_points, with_feedback, options, resolutions[0], root, progress)
    latent_sizes = _write_positions(model, resolutions, root)
    (root / "plans").mkdir()
    for plan in plans:
        plan.save(root / "plans" / f"{plan.name}.json")
    tokenizer, tokenizers = None, _write_tokenizers(model, root)
    if model.architecture == "sana":
        tokenizer = _write_sana_tokenizer(model, root)
    elif model.tokenizer is not None:
        (root / "tokenizer").mkdir()
        model.tokenizer.backend_tokenizer.save(str(root / "tokenizer" / "tokenizer.json"))
        tokenizer = {
            "file": "tokenizer/tokenizer.json",
            "max_length": adapter.max_sequence_length,
            "pad_id": int(model.tokenizer.pad_token_id or 0),
        }
        converted = _openvino_tokenizer(model.tokenizer, tokenizer, root)
        if converted is not None:  # the C++ runtime's tokenizer (cpp/, docs/cpp.md)
            tokenizer["openvino"] = converted
    if options.copy_model and model.path is not None:
        shutil.copytree(model.path, root / "model", ignore=shutil.ignore_patterns(".*"))
    manifest = {
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
        "scheduler": strict_json(model.scheduler_config),
        "torch_model": "model" if options.copy_model and model.path is not None else None,
        "tools": tool_versions(),
        **({"tokenizers": tokenizers} if tokenizers else {}),
    }
    manifest["schema_version"] = schema_version_for(manifest)
    return manifest


def _write_sana_tokenizer(model: LoadedModel, root: Path) -> dict:
    """Sana's Gemma tokenizer with `SanaPipeline`'s prompt format (schema 5): a prompt is the
    instruction followed by the lower-cased prompt, padded and truncated to `instruction_max_length`;
    a negative prompt is itself, to `max_length` (the text encoder's select-index keeps that many)."""
    fmt = sana_prompt_format()
    hf = model.text_pipeline.tokenizer
    (root / "tokenizer").mkdir()
    hf.backend_tokenizer.save(str(root / "tokenizer" / "tokenizer.json"))
    spec = {
        "file": "tokenizer/tokenizer.json",
        "max_length": fmt.max_sequence_length,
        "pad_id": int(hf.pad_token_id or 0),
        "instruction": fmt.instruction,
        "instruction_max_length": instructed_length(hf),
    }
    converted = _openvino_tokenizer(hf, spec, root)
    if converted is not None:  # the C++ runtime's tokenizer (cpp/, docs/cpp.md)
        spec["openvino"] = converted
    return spec


def instructed_length(tokenizer) -> int:
    """The ids an instructed Sana prompt pads and truncates to: the instruction's tokens (with <bos>)
    + max_sequence_length - 2, as `SanaPipeline._get_gemma_prompt_embeds` computes it."""
    fmt = sana_prompt_format()
    return len(tokenizer.encode(fmt.instruction)) + fmt.max_sequence_length - 2


def _write_tokenizers(model: LoadedModel, root: Path) -> list[dict]:
    """SD3/Flux: every tokenizer of the pipeline, padded to the lengths its `encode_prompt` uses by
    default (CLIP: 77; T5: the pipeline's max_sequence_length), in the text encoder's input order,
    each with its OpenVINO conversion where that is exact (`_openvino_tokenizer`)."""
    pipe = model.text_pipeline
    if pipe is None or model.architecture == "sana":  # one tokenizer: _write_sana_tokenizer
        return []
    names = ["tokenizer", "tokenizer_2", "tokenizer_3"][: 3 if model.architecture == "sd3" else 2]
    t5_length = default_max_sequence_length(pipe)
    specs = []
    for index, (name, input_name) in enumerate(zip(names, tokenizer_inputs(len(names)), strict=True)):
        hf = getattr(pipe, name)
        (root / name).mkdir()
        hf.backend_tokenizer.save(str(root / name / "tokenizer.json"))
        last = index == len(names) - 1  # the T5 tokenizer
        length = t5_length if last else int(pipe.tokenizer_max_length)
        pad = hf.pad_token_id if hf.pad_token_id is not None else 0
        spec = {
            "file": f"{name}/tokenizer.json",
            "max_length": length,
            "pad_id": int(pad),
            "input": input_name,
        }
        converted = _openvino_tokenizer(hf, spec, root)
        if converted is not None:  # the C++ runtime's tokenizer for this input (schema 6)
            spec["openvino"] = converted
        specs.append(spec)
    return specs


def default_max_sequence_length(pipe) -> int:
    """The T5 length a diffusers pipeline's `encode_prompt` pads to by default (SD3 256, Flux 512)."""
    import inspect

    return int(inspect.signature(pipe.encode_prompt).parameters["max_sequence_length"].default)


def example_tensors(model: LoadedModel, resolution: tuple[int, int]) -> dict[str, torch.Tensor]:
    """One consistent set of example inputs (batch 2, as with guidance) for tracing every segment."""
    adapter = model.adapter
    gen = torch.Generator().manual_seed(0)
    h, w = (r // model.vae_scale_factor for r in resolution)
    batch = 2
    ex: dict[str, torch.Tensor] = {
        "latents": torch.randn(batch, adapter.latent_channels, h, w, generator=gen),
        "timestep": torch.full((batch,), 500.0),
    }
    if adapter.uses_positions:
        ex["pos_embed"] = adapter.pos_embed(h, w).detach().float()
    if model.text_pipeline is not None:  # SD3, Flux: real inputs, as the reference generator makes them
        ex.update(_pipeline_examples(model, (h, w), batch))
    elif model.architecture == "dit":
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
        feedback = model.feedback.block if model.feedback is not None else None
        for name, attention in cached_attentions(adapter, feedback).items():  # cached K/V (cross_kv.py)
            ex[name] = project_kv(attention, cond[adapter.cross_context])
        state = adapter.embed(ex["latents"], cond)
        ex.update(state)
        for name, value in state.items():
            ex[feed_name(name)] = torch.randn(value.shape, generator=gen)
    return ex


def _pipeline_examples(model: LoadedModel, latent_hw: tuple[int, int], batch: int) -> dict[str, torch.Tensor]:
    """SD3/Flux example inputs: every tokenizer's ids and the generator's conditioning inputs."""
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.engines.backends.pytorch import TorchGenerator

    pipe = model.text_pipeline
    generator = TorchGenerator(model)
    size = (latent_hw[0] * model.vae_scale_factor, latent_hw[1] * model.vae_scale_factor)
    request = generator.resolve(Request(prompt="an example prompt", height=size[0], width=size[1]))
    with torch.no_grad():
        ex = dict(generator.batch_inputs([request] * batch, False, latent_hw))
    if model.architecture == "sana":  # an instructed prompt's ids, as the bundle's tokenizer makes them
        fmt = sana_prompt_format()
        tokens = pipe.tokenizer(
            fmt.instruction + "an example prompt",
            padding="max_length",
            max_length=instructed_length(pipe.tokenizer),
            truncation=True,
            return_tensors="pt",
        )
        ex["input_ids"], ex["attention_mask"] = (
            tokens.input_ids.repeat(batch, 1),
            tokens.attention_mask.repeat(batch, 1),
        )
        return ex
    names = ["tokenizer", "tokenizer_2", "tokenizer_3"][: 3 if model.architecture == "sd3" else 2]
    for index, (name, input_name) in enumerate(zip(names, tokenizer_inputs(len(names)), strict=True)):
        last = index == len(names) - 1
        length = default_max_sequence_length(pipe) if last else int(pipe.tokenizer_max_length)
        tokens = getattr(pipe, name)(
            "an example prompt", padding="max_length", max_length=length, truncation=True, return_tensors="pt"
        )
        ex[input_name] = tokens.input_ids.repeat(batch, 1)
    return ex


def _cast(model: LoadedModel, dtype: torch.dtype) -> LoadedModel:
    """The backbone and feedback in `dtype` (copies); text encoder and VAE are not exported from it."""
    transformer = copy.deepcopy(model.adapter.transformer).to(dtype)
    feedback = copy.deepcopy(model.feedback).to(dtype) if model.feedback is not None else None
    adapter = make_adapter(model.architecture, transformer)
    return dataclasses.replace(model, adapter=adapter, feedback=feedback)


def _model_facts(model: LoadedModel) -> dict:
    adapter = model.adapter
    facts: dict = {
        "num_blocks": adapter.num_blocks,
        "latent_channels": adapter.latent_channels,
        "out_channels": adapter.out_channels,
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
    if adapter.state_names != ("hidden",):  # schema 4 (MMDiTs); single-stream bundles stay 2
        facts.update(
            state=list(adapter.state_names),
            state_init=dict(adapter.state_init),
            token_layout=adapter.token_layout,
            guidance=model.guidance,
            position_ids="img_ids" in adapter.context_inputs,
        )
    return facts


# What the converted tokenizer must tokenise exactly as `tokenizers` does before a bundle lists it.
_TOKENIZER_PROBES = (
    "a small red circle on a blue background",
    "",
    "A BIG Blue, square! at the top-left of a xyzzy scene.",
    "  spaces\tand\nnewlines  ",
    "über straße café 4k",
    "red " * 400,  # longer than any max_length: truncated, the end-of-sequence token kept
)


def _openvino_tokenizer(hf_tokenizer, spec: dict, root: Path) -> str | None:
    """The tokenizer of `spec` converted by openvino-tokenizers (openvino_tokenizer.xml beside its
    tokenizer.json, what the C++ runtime in cpp/ runs) where that package is installed and the
    conversion reproduces the runtime's `tokenizers` ids, padding and attention mask on
    _TOKENIZER_PROBES, as given and lower-cased (PixArt and Sana lower-case, SD3 and Flux do not); else
    None (the C++ runtime then takes --token-ids). With Sana's instruction (schema 5) it pads to
    instruction_max_length: instructed prompts must match there, and a prompt alone (a negative prompt)
    in its first max_length ids, which C++ keeps (Gemma appends nothing, so truncation keeps a prefix)."""
    try:
        import openvino as ov
        from openvino_tokenizers import convert_tokenizer
        from tokenizers import Tokenizer
    except ImportError:
        return None
    instruction = spec.get("instruction")
    length = spec.get("instruction_max_length", spec["max_length"])
    checks = [(instruction or "", length)]  # (text before the probe, ids compared)
    if instruction is not None:
        checks.append(("", spec["max_length"]))
    references = {}
    for _, size in checks:  # as runtime.pipeline sets them up
        references[size] = Tokenizer.from_file(str(root / spec["file"]))
        references[size].enable_truncation(size)
        pad_token = references[size].id_to_token(spec["pad_id"])
        references[size].enable_padding(length=size, pad_id=spec["pad_id"], pad_token=pad_token)
    try:
        model = convert_tokenizer(hf_tokenizer, max_length=length, use_max_padding=True, truncation=True)
        compiled = ov.Core().compile_model(model, "CPU")
        for prompt in _TOKENIZER_PROBES:
            for text, (prefix, size) in itertools.product({prompt, prompt.lower().strip()}, checks):
                want = references[size].encode(prefix + text)
                got = compiled([np.array([prefix + text])])
                if got["input_ids"].shape != (1, length) or got["attention_mask"].shape != (1, length):
                    return None  # C++ expects exactly `length` ids (openvino.cpp)
                ids, mask = got["input_ids"][0, :size].tolist(), got["attention_mask"][0, :size].tolist()
                if (ids, mask) != (want.ids, want.attention_mask):
                    return None
    except Exception:  # a tokenizer (or a version) openvino-tokenizers does not convert
        return None
    folder = (root / spec["file"]).parent
    ov.save_model(model, str(folder / "openvino_tokenizer.xml"))
    return f"{folder.relative_to(root).as_posix()}/openvino_tokenizer.xml"
