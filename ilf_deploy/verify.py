"""`verify`: every ONNX segment against its PyTorch module, then every plan end to end.

Per segment, on random inputs and on inputs recorded from a real ONNX Runtime trajectory; end to
end, the final latents of each bundled plan from ONNX Runtime against the torch reference.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .errors import ConfigError
from .export.build import example_tensors
from .export.segments import segment_specs
from .loading import load_model
from .reference import TorchGenerator
from .runtime.bundle import Bundle
from .runtime.generator import Request
from .runtime.pipeline import BundleGenerator

# Relative L2 error budgets: (per segment, end-to-end latents)
TOLERANCES = {"fp32": (1e-4, 1e-3), "fp16": (1e-2, 5e-2)}


@dataclass
class Check:
    kind: str  # "segment (random)", "segment (trajectory)", "end-to-end"
    name: str
    rel_l2: float
    max_abs: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.rel_l2)) and self.rel_l2 <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def compare(kind: str, name: str, got: np.ndarray, want: np.ndarray, tolerance: float) -> Check:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if got.shape != want.shape:
        return Check(kind, name, float("inf"), float("inf"), tolerance)
    scale = max(float(np.linalg.norm(want)), 1e-12)
    return Check(
        kind, name, float(np.linalg.norm(got - want)) / scale, float(np.abs(got - want).max()), tolerance
    )


class _Recorder:
    """Keeps the first feeds each segment sees during a real trajectory."""

    def __init__(self) -> None:
        self.feeds: dict[str, dict[str, np.ndarray]] = {}

    def __call__(self, name: str, feeds: dict[str, np.ndarray]) -> None:
        self.feeds.setdefault(name, {k: np.array(v) for k, v in feeds.items()})


def verify_bundle(
    bundle: Bundle, request: Request | None = None, progress: Callable[[str], None] | None = None
) -> list[Check]:
    if not bundle.manifest.get("torch_model"):
        raise ConfigError(
            "this bundle has no torch model inside (--no-copy-model); nothing to verify against"
        )
    seg_tol, e2e_tol = TOLERANCES[bundle.manifest["precision"]]
    model = load_model(bundle.path / bundle.manifest["torch_model"])
    specs = {
        s.name: s
        for s in segment_specs(
            model, bundle.manifest["cut_points"], "feedback" in bundle.manifest["segments"]
        )
    }
    request = request or Request(prompt="a small red circle on a blue background", class_label=1, seed=0)
    generator = BundleGenerator(bundle)
    recorder = _Recorder()
    generator.segments.recorder = recorder

    checks: list[Check] = []
    resolution = tuple(bundle.manifest["resolutions"][0])
    random_inputs = {k: v.detach().numpy() for k, v in example_tensors(model, resolution).items()}
    for name in bundle.manifest["segments"]:
        if progress:
            progress(f"segment {name}")
        checks.append(_check_segment("segment (random)", specs[name], generator, random_inputs, seg_tol))

    torch_generator = TorchGenerator(model)
    for plan_name in bundle.plan_names:
        if progress:
            progress(f"plan {plan_name}")
        plan = bundle.plan(plan_name)
        got = generator.generate_latents(plan, request)
        generator.decode(got)  # so the VAE decoder is checked on real latents too
        want = torch_generator.generate_latents(plan, request).numpy()
        checks.append(compare("end-to-end", plan_name, got, want, e2e_tol))
    for name, feeds in recorder.feeds.items():
        checks.append(_check_segment("segment (trajectory)", specs[name], generator, feeds, seg_tol))
    return checks


def _check_segment(kind, spec, generator: BundleGenerator, values: dict[str, np.ndarray], tolerance) -> Check:
    feeds = {n: values[n] for n in spec.inputs}
    got = generator.segments.session(spec.name)(feeds)
    with torch.no_grad():
        args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.inputs]
        args = [a.float() if a.is_floating_point() else a for a in args]
        want = spec.module(*args)
    want = want if isinstance(want, tuple) else (want,)
    worst = None
    for out_name, tensor in zip(spec.outputs, want, strict=True):
        check = compare(kind, spec.name, got[out_name], tensor.float().numpy(), tolerance)
        worst = check if worst is None or check.rel_l2 > worst.rel_l2 else worst
    assert worst is not None
    return worst
