"""`verify`: every bundle segment against its PyTorch module, then every plan end to end.

At every resolution in the manifest: per segment, on random inputs and on inputs recorded from a
real trajectory on the engine; end to end, the final latents of each bundled plan from the engine
(ONNX Runtime by default, any registered bundle backend) against the torch reference. Both sides
get the same resolved request (runtime.generator.Generator.resolve). The comparator, its budgets
(compare.BUDGETS, ("*", the bundle's precision)) and its rows are ilf_deploy.engines.compare's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from ilf_deploy.build.export.build import example_tensors
from ilf_deploy.build.export.segments import segment_specs
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Generator, Request
from ilf_deploy.core.runtime.manifest import CROSS_KV_SEGMENT
from ilf_deploy.core.runtime.pipeline import facts_from_manifest
from ilf_deploy.engines.backends import open_bundle_generator
from ilf_deploy.engines.backends.pytorch import TorchGenerator, bundle_model
from ilf_deploy.engines.compare import (
    Budget,
    Check,
    TrajectoryRecorder,
    budget,
    compare_latents,
    compare_segment,
    held_out_request,
    recording,
    runner_of,
    runner_outputs,
)
from ilf_deploy.engines.compare.comparator import SegmentFn


def bundle_budget(bundle: Bundle, backend: str = "onnxruntime") -> Budget:
    """What `verify` holds `backend` running the bundle to, against PyTorch."""
    return budget(backend, bundle.manifest.precision)


def torch_outputs(specs: dict[str, Any]) -> SegmentFn:
    """The PyTorch side: each segment's module (export.segments) on the same numpy feeds."""

    def run(name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        spec = specs[name]
        with torch.no_grad():
            args = [torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in spec.inputs]
            args = [a.float() if a.is_floating_point() else a for a in args]
            out = spec.module(*args)
        out = out if isinstance(out, tuple) else (out,)
        return {n: t.float().numpy() for n, t in zip(spec.outputs, out, strict=True)}

    return run


@dataclass
class _Sides:
    bundle: Bundle
    loaded: Any  # loading.LoadedModel
    engine: Generator
    reference: TorchGenerator
    limits: Budget
    progress: Callable[[str], None] | None

    def __post_init__(self) -> None:
        manifest = self.bundle.manifest
        cached_kv = CROSS_KV_SEGMENT in manifest.segments  # as the bundle was built
        specs = segment_specs(
            self.loaded, list(manifest.cut_points), "feedback" in manifest.segments, cached_kv
        )
        self.ours = runner_outputs(self.engine.segments)
        self.theirs = torch_outputs({s.name: s for s in specs})

    def segment(self, name: str, samples: list[dict[str, np.ndarray]], inputs: str, size: str) -> list[Check]:
        if self.progress and inputs == "random":
            self.progress(f"segment {name} ({size})")
        row = compare_segment(name, self.ours, self.theirs, samples, self.limits.segment, inputs, size)
        return [] if row is None else [row]


def verify_bundle(
    bundle: Bundle,
    request: Request | None = None,
    progress: Callable[[str], None] | None = None,
    model: str | None = None,
    backend: str = "onnxruntime",
) -> list[Check]:
    """Checks at every bundled resolution; `model` replaces the bundle's own torch model (a
    `--no-copy-model` bundle), refused when its config hash differs from the manifest's."""
    limits = bundle_budget(bundle, backend)
    loaded = bundle_model(bundle, model)
    engine = open_bundle_generator(bundle, backend)
    reference = TorchGenerator(loaded, facts=facts_from_manifest(bundle))
    sides = _Sides(bundle, loaded, engine, reference, limits, progress)
    request = request or held_out_request(bundle)
    checks: list[Check] = []
    for height, width in bundle.manifest.resolutions:
        checks += _verify_size(sides, replace(request, height=height, width=width))
    return checks


def _verify_size(sides: _Sides, request: Request) -> list[Check]:
    """Random-input segments, every plan end to end (recording the engine's feeds), then the
    recorded segments, at the request's size."""
    bundle, engine, reference = sides.bundle, sides.engine, sides.reference
    height, width = request.height or 0, request.width or 0
    size = f"{height}x{width}"
    random_inputs = {k: v.detach().numpy() for k, v in example_tensors(sides.loaded, (height, width)).items()}
    checks: list[Check] = []
    for name in bundle.manifest.segments:
        checks += sides.segment(name, [random_inputs], "random", size)
    to_numpy = runner_of(engine).to_numpy
    recorder = TrajectoryRecorder(bundle, 1, bundle.manifest.segments, all_feeds=True, to_numpy=to_numpy)
    for plan_name in bundle.plan_names:
        if sides.progress:
            sides.progress(f"plan {plan_name} ({size})")
        plan = bundle.plan(plan_name)
        with recording(engine, recorder):
            got = engine.latents_to_numpy(engine.generate_latents(plan, request))
            engine.decode(got)  # so the VAE decoder is checked on real latents too
        want = reference.latents_to_numpy(reference.generate_latents(plan, request))
        checks.append(compare_latents(plan_name, got, want, sides.limits.end_to_end, size))
    for name in bundle.manifest.segments:
        checks += sides.segment(name, recorder.feeds(name), "trajectory", size)
    return checks
