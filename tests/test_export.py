"""The exporter (export/onnx.py): what the torch.export path must keep of the TorchScript bundles."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import torch

from ilf_deploy.export.build import example_tensors
from ilf_deploy.export.onnx import export_segment, onnx_io
from ilf_deploy.export.segments import segment_specs


def _segment(model, name: str):
    return next(
        spec for spec in segment_specs(model, [0, model.adapter.num_blocks], False) if spec.name == name
    )


def _run(path, names, args) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True) if n in wanted})


def test_the_timestep_embedding_matches_torch_as_tightly_as_torchscript_did(tiny_models, tmp_path):
    """The sinusoid frequencies are computed by torch, not folded with numpy's exp (one ulp off:
    3e-6 rel. L2 after sin(1000 f)); TorchScript's segment was at ~2e-7."""
    model = tiny_models["pixart-alpha"]
    spec = _segment(model, "time")
    examples = example_tensors(model, (model.default_image_size,) * 2)
    args = (torch.tensor([999.0, 500.3]), *(examples[n] for n in spec.inputs[1:]))
    export_segment(spec.module, args, tmp_path / "time.onnx", spec.inputs, spec.outputs, model.architecture)
    with torch.no_grad():
        want = spec.module(*args)
    for got, ref in zip(_run(tmp_path / "time.onnx", spec.inputs, args), want, strict=True):
        assert np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy()) < 1e-6


def test_inputs_and_outputs_are_the_ones_torchscript_wrote(tiny_models, tmp_path):
    """PixArt-α 1024's `context` does not read its size conditions (TorchScript left them out), and
    DiT's `context` passes the labels through under both names."""
    cases = [
        (tiny_models["pixart-alpha-1024"], ["prompt_embeds", "prompt_mask"]),
        (tiny_models["dit"], ["class_labels"]),
    ]
    for index, (model, inputs) in enumerate(cases):
        spec = _segment(model, "context")
        examples = example_tensors(model, (model.default_image_size,) * 2)
        args = tuple(examples[n] for n in spec.inputs)
        path = tmp_path / f"{index}.onnx"
        export_segment(spec.module, args, path, spec.inputs, spec.outputs, model.architecture)
        io_in, io_out = onnx_io(path)
        assert [v["name"] for v in io_in] == inputs
        assert [v["name"] for v in io_out] == list(spec.outputs)
        assert io_in[0]["shape"][0] == "batch"
