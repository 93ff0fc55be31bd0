"""The exporters (build/export/onnx.py): torch.export (`--exporter dynamo`) writes PixArt's and DiT's
segments as TorchScript (`auto`'s choice for them) does: the same inputs and outputs, the same parity
with torch, a bundle whose plans give the same latents; a family TorchScript cannot export is refused."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from ilf_deploy.build.export.build import BuildOptions, build_bundle, example_tensors
from ilf_deploy.build.export.onnx import export_segment, onnx_io, uses_torchscript
from ilf_deploy.build.export.segments import segment_specs
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.engines.backends import open_generator

EXPORTERS = ("torchscript", "dynamo")


def _segment(model, name: str):
    return next(
        spec for spec in segment_specs(model, [0, model.adapter.num_blocks], False) if spec.name == name
    )


def _run(path, names, args) -> list[np.ndarray]:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {n: a.numpy() for n, a in zip(names, args, strict=True) if n in wanted})


@pytest.mark.parametrize(
    ("family", "exporter"),
    [
        ("pixart-alpha", "torchscript"),
        ("pixart-alpha", "dynamo"),
        ("sd3", "auto"),
        ("flux", "auto"),
        ("flux-schnell", "auto"),
    ],
)
def test_the_timestep_embedding_matches_torch(request, tmp_path, family, exporter):
    """torch.export, every family: the sinusoid frequencies are computed by torch, not folded with
    numpy's exp (one ulp off, after sin(1000 f): PixArt 3e-6 rel. L2, SD3 3.8e-6, Flux-dev 1.7e-5,
    Flux-schnell 2.2e-6), and the graph is not rewritten by onnxscript's optimizer. Measured: PixArt
    2.0e-7 (as TorchScript), SD3 1.6e-7, Flux-dev 2.9e-7 (with its guidance embedding)."""
    models = request.getfixturevalue("tiny_models" if family.startswith("pixart") else "mmdit_models")
    model = models[family]
    spec = _segment(model, "time")
    examples = example_tensors(model, (model.default_image_size,) * 2)
    args = (torch.tensor([999.0, 500.3]), *(examples[n] for n in spec.inputs[1:]))
    path = tmp_path / "time.onnx"
    export_segment(spec.module, args, path, spec.inputs, spec.outputs, model.architecture, exporter)
    with torch.no_grad():
        want = spec.module(*args)
    for got, ref in zip(_run(path, spec.inputs, args), want, strict=True):
        assert np.linalg.norm(got - ref.numpy()) / np.linalg.norm(ref.numpy()) < 5e-7


def test_both_exporters_write_the_same_inputs_and_outputs(tiny_models, tmp_path):
    """PixArt-α 1024's `context` does not read its size conditions (left out), and DiT's `context`
    passes the labels through under both names; every dim named alike."""
    cases = [
        (tiny_models["pixart-alpha-1024"], ["prompt_embeds", "prompt_mask"]),
        (tiny_models["dit"], ["class_labels"]),
    ]
    for index, (model, inputs) in enumerate(cases):
        spec = _segment(model, "context")
        examples = example_tensors(model, (model.default_image_size,) * 2)
        args = tuple(examples[n] for n in spec.inputs)
        written = []
        for exporter in EXPORTERS:
            path = tmp_path / f"{index}-{exporter}.onnx"
            export_segment(spec.module, args, path, spec.inputs, spec.outputs, model.architecture, exporter)
            written.append(onnx_io(path))
        io_in, io_out = written[0]
        assert [v["name"] for v in io_in] == inputs
        assert [v["name"] for v in io_out] == list(spec.outputs)
        assert io_in[0]["shape"][0] == "batch"
        assert written[1] == written[0]


def test_a_dynamo_bundle_is_the_torchscript_bundle(tiny_dirs, tiny_bundles, tmp_path):
    """A whole tiny PixArt bundle through torch.export: every segment's I/O as `auto`'s (TorchScript)
    bundle, and each plan's final latents within float rounding of it on ONNX Runtime."""
    options = BuildOptions(plans=("base-4", "ilf-4", "cache-6"), exporter="dynamo")
    dynamo = build_bundle(tiny_dirs["pixart-alpha"], tmp_path / "dynamo", options)
    generators = [open_generator(tiny_bundles["pixart-alpha"]), open_generator(dynamo)]
    manifests = [json.loads((g.bundle.path / "manifest.json").read_text()) for g in generators]
    specs = [{name: (s["inputs"], s["outputs"]) for name, s in m["segments"].items()} for m in manifests]
    assert specs[1] == specs[0]
    request = Request(prompt="a red circle", seed=3)
    for plan in ("base-4", "ilf-4", "cache-6"):
        latents = [np.asarray(g.generate_latents(g.bundle.plan(plan), request)) for g in generators]
        assert np.linalg.norm(latents[1] - latents[0]) / np.linalg.norm(latents[0]) < 1e-5, plan


def test_torchscript_is_refused_where_it_cannot_export():
    assert uses_torchscript("pixart-alpha") and uses_torchscript("dit", "torchscript")
    assert not uses_torchscript("pixart-sigma", "dynamo") and not uses_torchscript("flux")
    with pytest.raises(ConfigError, match="cannot export flux"):
        uses_torchscript("flux", "torchscript")
    with pytest.raises(ConfigError, match="--exporter must be one of"):
        uses_torchscript("dit", "onnx")
