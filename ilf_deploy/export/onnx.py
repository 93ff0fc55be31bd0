"""Export segments to ONNX, then check and shape-infer them.

Two exporters: TorchScript (`dynamo=False`, opset 17) for PixArt and DiT, whose bundles it has
always written; torch.export (`dynamo=True`, opset 20, onnxscript) for SD3 and Flux, whose
blocks TorchScript cannot export (`aten::rms_norm`, SD3.5/Flux's q/k norm). Moving PixArt/DiT to
the dynamo exporter too is left for later (their bundles verify as they are).
"""

from __future__ import annotations

import contextlib
import io
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

OPSET = 17
DYNAMO_OPSET = 20
TWO_GB = 2**31 - 1

# Dynamic axes by tensor name: batch (guidance doubles it), image tokens, text tokens, pixels.
_AXES: dict[str, dict[int, str]] = {
    "latents": {0: "batch", 2: "latent_height", 3: "latent_width"},
    "pos_embed": {1: "tokens"},
    "hidden": {0: "batch", 1: "tokens"},
    "hidden_out": {0: "batch", 1: "tokens"},
    "feed": {0: "batch", 1: "tokens"},
    "tokens": {0: "batch", 1: "tokens"},
    "prompt_embeds": {0: "batch", 1: "text_tokens"},
    "prompt_mask": {0: "batch", 1: "text_tokens"},
    "context": {0: "batch", 1: "text_tokens"},
    "context_bias": {0: "batch", 2: "text_tokens"},
    "input_ids": {0: "batch", 1: "text_tokens"},
    "attention_mask": {0: "batch", 1: "text_tokens"},
    "images": {0: "batch", 2: "height", 3: "width"},
}
# The dynamo exporter (SD3, Flux): the text length is fixed per bundle (every tokenizer pads to its
# max_length), so only the batch, the image tokens and what follows from them are dynamic.
_DYNAMO_AXES: dict[str, dict[int, str]] = {
    **_AXES,
    "input_ids": {0: "batch"},
    "prompt_embeds": {0: "batch"},
    "rope_cos": {1: "rotary_tokens"},  # text + image tokens
    "rope_sin": {1: "rotary_tokens"},
    "img_ids": {0: "tokens"},
    "txt_ids": {},
}


# Sana (dynamo too): its state is the token grid (B, h, w, D), both grid axes dynamic; the text
# encoder's ids are as long as the prompt format makes them (an instructed prompt is longer than a
# negative one), its outputs as long as the transformer reads (the select-index's length).
_GRID_AXES: dict[str, dict[int, str]] = {
    **_DYNAMO_AXES,
    "hidden": {0: "batch", 1: "grid_height", 2: "grid_width"},
    "hidden_out": {0: "batch", 1: "grid_height", 2: "grid_width"},
    "feed": {0: "batch", 1: "grid_height", 2: "grid_width"},
    "input_ids": {0: "batch", 1: "text_tokens"},
    "attention_mask": {0: "batch", 1: "text_tokens"},
    "prompt_mask": {0: "batch"},
    "context": {0: "batch"},
    "context_bias": {0: "batch"},
}


def dynamic_axes(names: Sequence[str], dynamo: bool = False, grid: bool = False) -> dict[str, dict[int, str]]:
    """Every tensor is dynamic in batch (but the ids: their positions); token and pixel axes as
    `_AXES` (TorchScript), `_DYNAMO_AXES` or, for a token-grid state (Sana), `_GRID_AXES` says."""
    axes = _GRID_AXES if grid else _DYNAMO_AXES if dynamo else _AXES
    return {name: axes.get(name, {} if name.endswith("_ids") else {0: "batch"}) for name in names}


def export_segment(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    dynamo: bool = False,
    grid: bool = False,
) -> None:
    """Write `module(*args)` to `path`; weights go to one `path.data` file when they pass 1 GB.
    `grid`: a token-grid model (Sana), exported with torch.export and `_GRID_AXES`.

    The exporter writes into a scratch directory first: for graphs over protobuf's 2 GB limit it
    leaves one file per tensor, which must not end up in (and be hashed into) the bundle.
    """
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        raw = Path(scratch) / path.name
        # tracer warnings about python-int shapes are expected; the dynamo exporter prints its progress
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            if grid:
                options = _grid_options(module, args, inputs)
                module = options.pop("program")
            elif dynamo:
                options = _dynamo_options(module, inputs)
            else:
                options = _torchscript_options(inputs, outputs)
            torch.onnx.export(
                module, args, str(raw), input_names=list(inputs), output_names=list(outputs), **options
            )
        model = onnx.load(str(raw))  # also reads any per-tensor files the exporter wrote
        if grid:
            _fold_constants(model)
        if dynamo or grid:
            _name_dims(model, [*inputs, *outputs], grid)
        weights = sum(len(t.raw_data) for t in model.graph.initializer)
        data = path.with_name(path.name + ".data")
        if weights > TWO_GB // 2:  # keep well clear of protobuf's 2 GB limit
            onnx.save_model(
                model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name
            )
        else:
            onnx.save_model(model, str(path))
    for file in (path, data):
        if file.exists():
            file.chmod(0o644)  # readable by a server running as another user
    onnx.checker.check_model(str(path))
    onnx.shape_inference.infer_shapes_path(str(path))


def _torchscript_options(inputs: Sequence[str], outputs: Sequence[str]) -> dict:
    return dict(
        dynamic_axes=dynamic_axes([*inputs, *outputs]),
        opset_version=OPSET,
        do_constant_folding=True,
        dynamo=False,
    )


def _dynamo_options(module: nn.Module, inputs: Sequence[str]) -> dict:
    """torch.export, with every axis `_DYNAMO_AXES` names (and every batch axis) dynamic where the
    graph lets it be (`Dim.AUTO`: an axis the model fixes stays fixed instead of failing the export)."""
    import logging

    axes = dynamic_axes(inputs, dynamo=True)
    flat = [{axis: torch.export.Dim.AUTO for axis in axes[name]} for name in inputs]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    return dict(
        dynamic_shapes=_structured(module, flat),
        opset_version=DYNAMO_OPSET,
        dynamo=True,
        external_data=True,
        verbose=False,
    )


def _structured(module: nn.Module, flat: list[dict]) -> tuple:
    """One dynamic-shapes entry per input, as torch.export sees `forward(a, *rest)`: (a, (rest...))."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    fixed = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    return (*flat[:fixed], tuple(flat[fixed:])) if varargs and len(flat) > fixed else tuple(flat)


def _grid_options(module: nn.Module, args: tuple[torch.Tensor, ...], inputs: Sequence[str]) -> dict:
    """A token-grid model (Sana): torch.export with one named dimension per axis name, shared by every
    input that has it. `Dim.AUTO` would give each input's batch its own symbol, and the diffusers
    attention's `view(batch, heads, -1, ...)` of the caption mask then fails to export; the program
    is handed to the ONNX exporter as it is, unoptimized: onnxscript's optimizer drops the `+ 1e-15`
    of Sana's linear attention (`num / (den + 1e-15)`), and a token whose ReLU'd query is all zero
    then divides 0 by 0 (NaN) where torch gives 0; ONNX Runtime and OpenVINO optimize the graph
    themselves."""
    import logging

    axes = dynamic_axes(inputs, grid=True)
    # the text length's range is the model's (Sana's select-index: at least its length; Gemma-2's
    # sliding window: at most that): torch.export infers it
    dims: dict[str, object] = {"text_tokens": torch.export.Dim.AUTO}
    flat = [
        {axis: dims.setdefault(name, torch.export.Dim(name, min=1)) for axis, name in axes[n].items()}
        for n in inputs
    ]
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    program = torch.export.export(module, args, dynamic_shapes=_structured(module, flat), strict=False)
    return dict(
        program=program,
        opset_version=DYNAMO_OPSET,
        dynamo=True,
        external_data=True,
        verbose=False,
        optimize=False,
    )


def _fold_constants(model) -> None:
    """Of onnxscript's optimizer, constant folding only (not its rewrites: `_grid_options`), so the
    linear layers' weights reach their MatMuls as initializers (not through a Transpose), as
    `quantize` finds them and the engines read them."""
    from onnxscript import optimizer

    optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)


def _name_dims(model, names: Sequence[str], grid: bool = False) -> None:
    """torch.export names dynamic dims s0, s1…: rename those of the graph's inputs and outputs (and
    every use of them inside) to `_DYNAMO_AXES`' (`_GRID_AXES`') names, which the manifest records
    and TensorRT's profiles read (backends/tensorrt.py `dim_ranges`)."""
    axes = dynamic_axes(names, dynamo=True, grid=grid)
    graph = model.graph
    rename: dict[str, str] = {}
    for value in [*graph.input, *graph.output]:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            name = axes.get(value.name, {}).get(axis)
            if dim.dim_param and name:
                rename.setdefault(dim.dim_param, name)
    for value in [*graph.input, *graph.output, *graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def onnx_io(path: Path) -> tuple[list[dict], list[dict]]:
    """(inputs, outputs) as [{name, shape, dtype}] with symbolic dims as strings."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)

    def describe(values) -> list[dict]:
        out = []
        for value in values:
            tensor = value.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in tensor.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type).name
            out.append({"name": value.name, "shape": dims, "dtype": dtype})
        return out

    initializers = {i.name for i in model.graph.initializer}
    return describe([v for v in model.graph.input if v.name not in initializers]), describe(
        model.graph.output
    )
