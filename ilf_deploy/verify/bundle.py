"""`verify`: every bundle segment against its PyTorch module, then every plan end to end.

At every resolution in the manifest: per segment, on random inputs and on inputs recorded from a
real trajectory on the engine; end to end, the final latents of each bundled plan from the engine
(ONNX Runtime by default, any registered bundle backend) against the torch reference. Both sides
get the same resolved request (runtime.generator.Generator.resolve).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import torch

from ..backends import open_bundle_generator
from ..backends.pytorch import TorchGenerator, bundle_model
from ..errors import ConfigError
from ..export.build import example_tensors
from ..export.segments import segment_specs
from ..runtime.bundle import Bundle
from ..runtime.generator import Generator, Request
from ..runtime.pipeline import facts_from_manifest

# Relative L2 error budgets: (per segment, end-to-end latents)
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 5e-2)}


@dataclass
class Check:
    kind: str  # "segment (random)", "segment (trajectory)", "end-to-end"
    name: str
    rel_l2: float
    max_abs: float
    tolerance: float
    size: str = ""  # the resolution checked, HxW

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.rel_l2)) and self.rel_l2 <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


class ShapeMismatch(ConfigError):
    """The engine and the reference disagree on a shape: a bug, never a tolerance question."""


def compare(kind: str, name: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> Check:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        raise ShapeMismatch(
            f"{kind} {name}: the engine gave shape {got.shape}, the PyTorch reference {want.shape}"
        )
    scale = max(float(np.linalg.norm(want)), 1e-12)
    return Check(
        kind, name, float(np.linalg.norm(got - want)) / scale, float(np.abs(got - want).max()), tolerance
    )


class _Recorder:
    """Keeps the first feeds each segment sees during a real trajectory."""

    def __init__(self, to_numpy: Callable[[Any], np.ndarray]) -> None:
        self.feeds: dict[str, dict[str, np.ndarray]] = {}
        self.to_numpy = to_numpy

    def __call__(self, name: str, feeds: dict[str, Any]) -> None:
        if name not in self.feeds:
            self.feeds[name] = {k: np.array(self.to_numpy(v)) for k, v in feeds.items()}


def verify_bundle(
    bundle: Bundle,
    request: Request | None = None,
    progress: Callable[[str], None] | None = None,
    model: str | None = None,
    backend: str = "onnxruntime",
) -> list[Check]:
    """Checks at every bundled resolution; `model` replaces the bundle's own torch model (a
    `--no-copy-model` bundle), refused when its config hash differs from the manifest's."""
    seg_tol, e2e_tol = TOLERANCES[bundle.manifest.precision]
    loaded = bundle_model(bundle, model)
    specs = {
        s.name: s
        for s in segment_specs(
            loaded, list(bundle.manifest.cut_points), "feedback" in bundle.manifest.segments
        )
    }
    request = request or Request(prompt="a small red circle on a blue background", class_label=1, seed=0)
    generator = open_bundle_generator(bundle, backend)
    reference = TorchGenerator(loaded, facts=facts_from_manifest(bundle))
    checks: list[Check] = []
    for height, width in bundle.manifest.resolutions:
        size = f"{height}x{width}"
        sized = replace(request, height=height, width=width)
        random_inputs = {k: v.detach().numpy() for k, v in example_tensors(loaded, (height, width)).items()}
        for name in bundle.manifest.segments:
            if progress:
                progress(f"segment {name} ({size})")
            checks.append(
                _check_segment("segment (random)", specs[name], generator, random_inputs, seg_tol, size)
            )
        recorder = _Recorder(generator.segments.to_numpy)
        generator.segments.recorder = recorder
        for plan_name in bundle.plan_names:
            if progress:
                progress(f"plan {plan_name} ({size})")
            plan = bundle.plan(plan_name)
            got = generator.latents_to_numpy(generator.generate_latents(plan, sized))
            generator.decode(got)  # so the VAE decoder is checked on real latents too
            want = reference.latents_to_numpy(reference.generate_latents(plan, sized))
            checks.append(replace(compare("end-to-end", plan_name, got, want, e2e_tol), size=size))
        generator.segments.recorder = None
        for name, feeds in recorder.feeds.items():
            checks.append(
                _check_segment("segment (trajectory)", specs[name], generator, feeds, seg_tol, size)
            )
    return checks


def _check_segment(
    kind, spec, generator: Generator, values: dict[str, np.ndarray], tolerance: float, size: str
) -> Check:
    runner = generator.segments
    feeds = {n: values[n] for n in spec.inputs}
    got = runner.run(spec.name, {n: runner.array(v) for n, v in feeds.items()})
    with torch.no_grad():
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.inputs]
        args = [a.float() if a.is_floating_point() else a for a in args]
        want = spec.module(*args)
    want = want if isinstance(want, tuple) else (want,)
    worst = None
    for out_name, tensor in zip(spec.outputs, want, strict=True):
        check = compare(kind, spec.name, runner.to_numpy(got[out_name]), tensor.float().numpy(), tolerance)
        check.size = size
        worst = check if worst is None or check.rel_l2 > worst.rel_l2 else worst
    assert worst is not None
    return worst
