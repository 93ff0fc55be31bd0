"""Export segments to ONNX, then check and shape-infer them.

Two exporters (`exporter`): torch.export (`torch.onnx.export(dynamo=True)`, opset 20, onnxscript)
exports every segment of every family; the TorchScript exporter (`dynamo=False`, opset 17) exports
PixArt's and DiT's (not SD3.5's or Flux's q/k `rms_norm`). `auto`, the default, takes TorchScript
for PixArt and DiT: the same manifests and the same parity with torch (~1e-7) in a fifth of the
time (docs/bundles.md); `dynamo` takes torch.export for them too. Three tables of dynamic axes, by
the family's state (`axes_kind`): single-stream token sequences (PixArt, DiT), two streams (SD3,
Flux), a token grid (Sana). torch.export takes one path for every family (`_program_options`): the
program unoptimized, its input-free values computed by torch, its constants folded.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ilf_deploy.build.export.cross_kv import is_kv_name
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.model.adapters import MMDIT_ARCHITECTURES

OPSET = 17  # the TorchScript exporter's
DYNAMO_OPSET = 20
EXPORTERS = ("auto", "dynamo", "torchscript")
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
# SD3, Flux: the text length is fixed per bundle (every tokenizer pads to its
# max_length), so only the batch, the image tokens and what follows from them are dynamic.
_MMDIT_AXES: dict[str, dict[int, str]] = {
    **_AXES,
    "input_ids": {0: "batch"},
    "prompt_embeds": {0: "batch"},
    "rope_cos": {1: "rotary_tokens"},  # text + image tokens
    "rope_sin": {1: "rotary_tokens"},
    "img_ids": {0: "tokens"},
    "txt_ids": {},
}


# Sana: its state is the token grid (B, h, w, D), both grid axes dynamic; the text
# encoder's ids are as long as the prompt format makes them (an instructed prompt is longer than a
# negative one), its outputs as long as the transformer reads (the select-index's length).
_GRID_AXES: dict[str, dict[int, str]] = {
    **_MMDIT_AXES,
    "hidden": {0: "batch", 1: "grid_height", 2: "grid_width"},
    "hidden_out": {0: "batch", 1: "grid_height", 2: "grid_width"},
    "feed": {0: "batch", 1: "grid_height", 2: "grid_width"},
    "input_ids": {0: "batch", 1: "text_tokens"},
    "attention_mask": {0: "batch", 1: "text_tokens"},
    "prompt_mask": {0: "batch"},
    "context": {0: "batch"},
    "context_bias": {0: "batch"},
}


def axes_kind(architecture: str) -> str:
    """Which table of dynamic axes a family's segments use: "tokens" (PixArt, DiT: `_AXES`),
    "mmdit" (SD3, Flux: `_MMDIT_AXES`) or "grid" (Sana: `_GRID_AXES`)."""
    return "mmdit" if architecture in MMDIT_ARCHITECTURES else "grid" if architecture == "sana" else "tokens"


def dynamic_axes(names: Sequence[str], kind: str = "tokens") -> dict[str, dict[int, str]]:
    """Every tensor is dynamic in batch (but the ids: their positions); token and pixel axes as
    the table of `kind` (`axes_kind`) says."""
    axes = {"tokens": _AXES, "mmdit": _MMDIT_AXES, "grid": _GRID_AXES}[kind]

    def table_name(name: str) -> str:  # a block's cached caption K/V has the caption's axes
        return "context" if is_kv_name(name) else name

    return {name: axes.get(table_name(name), {} if name.endswith("_ids") else {0: "batch"}) for name in names}


def check_exporter(exporter: str) -> None:
    if exporter not in EXPORTERS:
        raise ConfigError(f"--exporter must be one of {', '.join(EXPORTERS)}, got {exporter!r}")


def uses_torchscript(architecture: str, exporter: str = "auto") -> bool:
    """Whether `exporter` (`EXPORTERS`) exports an `architecture` model's segments with TorchScript;
    a family TorchScript cannot export is refused in one line."""
    check_exporter(exporter)
    tokens = axes_kind(architecture) == "tokens"
    if exporter == "torchscript" and not tokens:
        raise ConfigError(f"--exporter torchscript cannot export {architecture} (PixArt, DiT only): use auto")
    return tokens and exporter != "dynamo"


def export_segment(
    module: nn.Module,
    args: tuple[torch.Tensor, ...],
    path: Path,
    inputs: Sequence[str],
    outputs: Sequence[str],
    architecture: str = "pixart-alpha",
    exporter: str = "auto",
) -> None:
    """Write `module(*args)` of an `architecture` model to `path` with `exporter` (`EXPORTERS`);
    weights go to one `path.data` file when they pass 1 GB.

    The exporter writes into a scratch directory first: for graphs over protobuf's 2 GB limit it
    leaves one file per tensor, which must not end up in (and be hashed into) the bundle.
    """
    import onnx

    kind = axes_kind(architecture)
    torchscript = uses_torchscript(architecture, exporter)
    path.parent.mkdir(parents=True, exist_ok=True)
    module.eval()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as scratch:
        raw = Path(scratch) / path.name
        # torch.export logs its progress and warns about what it specializes
        with torch.no_grad(), warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            logging.getLogger("torch.onnx").setLevel(logging.ERROR)
            if torchscript:
                options = _torchscript_options(inputs, outputs)
            else:
                options = _program_options(module, args, inputs, kind)
                module = options.pop("program")
            program = torch.onnx.export(
                module, args, str(raw), input_names=list(inputs), output_names=list(outputs), **options
            )
        model = onnx.load(str(raw))  # also reads any per-tensor files the exporter wrote
        if not torchscript:
            _name_passthroughs(model, inputs)
            _constants_from_torch(model, program.exported_program)
            _fold_constants(model)
            if kind == "tokens":  # as the TorchScript exporter writes these bundles: used inputs only
                _drop_unused_inputs(model)
            _name_dims(model, [*inputs, *outputs], kind)
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


def _structured(module: nn.Module, flat: list[dict]) -> tuple:
    """One dynamic-shapes entry per input, as torch.export sees `forward(a, *rest)`: (a, (rest...))."""
    import inspect

    params = list(inspect.signature(module.forward).parameters.values())
    fixed = sum(p.kind is p.POSITIONAL_OR_KEYWORD for p in params)
    varargs = any(p.kind is p.VAR_POSITIONAL for p in params)
    return (*flat[:fixed], tuple(flat[fixed:])) if varargs and len(flat) > fixed else tuple(flat)


def _program_options(
    module: nn.Module, args: tuple[torch.Tensor, ...], inputs: Sequence[str], kind: str
) -> dict:
    """Every family (PixArt, DiT: "tokens"; SD3, Flux: "mmdit"; Sana: "grid"): the module through
    `torch.export.export` first, the program then to the ONNX exporter. Exported inside
    `torch.onnx.export`, whose capture defers shape checks to run time, the diffusers attention's
    `view(batch, heads, -1, text)` of PixArt's caption mask cannot be proven to divide and the
    export fails; here it exports.

    Dims: "tokens" and "mmdit" with `Dim.AUTO` on each axis (torch.export works out that the image
    tokens are the latent grid's over the patch, the rotary tokens text + image tokens, and keeps
    fixed an axis the model fixes); "grid" with one named dimension per axis name, shared by every
    input that has it (`Dim.AUTO` would give each input's batch its own symbol, and the caption
    mask's `view` then fails), but the text length, whose range is the model's (Sana's select-index:
    at least its length; Gemma-2's sliding window: at most that).

    The program goes to ONNX unoptimized (`_fold_constants` folds its constants only): onnxscript's
    optimizer rewrites `x + c` to `x` for any scalar |c| < 1e-8 (its `add_0` rule's tolerance), which
    drops the `+ 1e-15` of Sana's linear attention (`num / (den + 1e-15)`): a token whose ReLU'd
    query is all zero then divides 0 by 0 (NaN) where torch gives 0; its rules also drop `x * c` and
    `x / c` for c within 1e-5 of 1. ONNX Runtime and OpenVINO optimize the graph themselves."""
    axes = dynamic_axes(inputs, kind)
    if kind == "grid":
        dims: dict[str, object] = {"text_tokens": torch.export.Dim.AUTO}
        flat = [
            {axis: dims.setdefault(name, torch.export.Dim(name, min=1)) for axis, name in axes[n].items()}
            for n in inputs
        ]
    else:
        flat = [{axis: torch.export.Dim.AUTO for axis in axes[name]} for name in inputs]
    program = torch.export.export(module, args, dynamic_shapes=_structured(module, flat), strict=False)
    return dict(
        program=program,
        opset_version=DYNAMO_OPSET,
        dynamo=True,
        external_data=True,
        verbose=False,
        optimize=False,
    )


def _constants_from_torch(model, program: torch.export.ExportedProgram) -> None:
    """Every value of the graph that depends on no input and no weight (the sinusoid frequencies
    of a timestep embedding: `exp(-log(10000) * arange(d) / d)`), computed by torch and written in
    as an initializer, so that `_fold_constants` does not compute it with numpy: one ulp off torch's
    `exp` there, multiplied by a timestep up to 1000 inside `sin`, put 3e-6 (rel. L2) into PixArt's
    timestep embedding, 15x the error of the rest of the segment. The exporter names each value
    after the node of the (decomposed) program that computes it."""
    import onnx

    constants: dict[str, torch.Tensor] = {}
    for node in program.graph.nodes:
        if node.op != "call_function" or any(n.name not in constants for n in node.all_input_nodes):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda n: constants[n.name])
        value = node.target(*args, **kwargs)
        if isinstance(value, torch.Tensor):
            constants[node.name] = value
    computed = {name for node in model.graph.node for name in node.output}
    for name in computed & constants.keys():
        model.graph.initializer.append(onnx.numpy_helper.from_array(constants[name].detach().numpy(), name))
    kept = [node for node in model.graph.node if not set(node.output) <= constants.keys()]
    del model.graph.node[:]
    model.graph.node.extend(kept)


def _fold_constants(model) -> None:
    """Of onnxscript's optimizer, constant folding only (not its rewrites: `_program_options`), so the
    linear layers' weights reach their MatMuls as initializers (not through a Transpose), as
    `quantize` finds them and the engines read them."""
    from onnxscript import optimizer

    optimizer.fold_constants(model)
    optimizer.remove_unused_nodes(model)


def _name_passthroughs(model, inputs: Sequence[str]) -> None:
    """An output that is an input as it is (DiT's `context` and `time` pass the class labels and
    the timestep through) is one value to the exporter, named after the output: give the input its
    name back and the output an Identity, as the TorchScript exporter wrote it. The Identity goes
    first: other nodes may read the value too (SD3's last, `context_pre_only` block reads the text
    tokens it passes through)."""
    from onnx import helper

    for value, name in zip(model.graph.input, inputs, strict=True):
        if value.name != name:
            model.graph.node.insert(
                0, helper.make_node("Identity", [name], [value.name], name=f"pass_{name}")
            )
            value.name = name


def _drop_unused_inputs(model) -> None:
    """Graph inputs no node reads (PixArt-α's size conditions in the `context` segment): the
    TorchScript exporter left them out, and the manifests of PixArt and DiT bundles never listed them."""
    used = {name for node in model.graph.node for name in node.input}
    used |= {output.name for output in model.graph.output}
    unused = [value for value in model.graph.input if value.name not in used]
    for value in unused:
        model.graph.input.remove(value)


def _name_dims(model, names: Sequence[str], kind: str) -> None:
    """torch.export names dynamic dims s0, s1…: rename those of the graph's inputs and outputs (and
    every use of them inside) to the names of `kind`'s table, which the manifest records and
    TensorRT's profiles read (engines/backends/tensorrt.py `dim_ranges`)."""
    axes = dynamic_axes(names, kind)
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
