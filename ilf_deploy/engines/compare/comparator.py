"""The comparator: run a candidate and a reference, then compare them with a metric and a limit
passed in (shaped like Polygraphy's `Comparator.run` / `Comparator.compare_accuracy`).

- `compare_segment`: one segment on both sides on the same feeds, every output scored (`metrics`),
  the worst held to the budget's segment limit;
- `compare_latents`: a plan's final latents, held to its end-to-end limit;
- `run_reference` + `compare_to_reference`: ONNX Runtime fp32 on the CPU runs the held-out request
  once, recording its segments' feeds; each candidate generator then runs the same plan and request,
  and its segments replay the recorded feeds (`verify-variant`, `verify-engines`, `tune`).

`verify` (bundle vs PyTorch) composes the first two with its own sides: PyTorch modules per segment.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Generator, Request
from ilf_deploy.core.runtime.runner import SegmentRunner
from ilf_deploy.engines.backends.onnxruntime import open_generator as open_ort_generator
from ilf_deploy.engines.backends.plans import resolve_bundle_plan
from ilf_deploy.engines.compare.budgets import Budget
from ilf_deploy.engines.compare.metrics import Limit, Metrics, metrics
from ilf_deploy.engines.compare.recorder import TrajectoryRecorder
from ilf_deploy.engines.compare.result import Check

Feeds = dict[str, np.ndarray]
# One side of a segment comparison: segment name, numpy feeds -> numpy outputs by name.
SegmentFn = Callable[[str, Feeds], dict[str, np.ndarray]]

# The held-out request: not one of calibration's prompts or class labels (calibrate).
HELD_OUT_PROMPT = "a lighthouse on a cliff above a stormy sea"
HELD_OUT_CLASS = 3
HELD_OUT_SEED = 123


def held_out_request(bundle: Bundle, prompt: str | None = None, class_label: int | None = None) -> Request:
    """The request every check runs, per architecture: a prompt for PixArt, a class for DiT."""
    if bundle.architecture == "dit":
        classes = bundle.model.num_classes or HELD_OUT_CLASS + 1
        label = HELD_OUT_CLASS % classes if class_label is None else class_label
        return Request(class_label=label, seed=HELD_OUT_SEED)
    return Request(prompt=prompt or HELD_OUT_PROMPT, seed=HELD_OUT_SEED)


def runner_outputs(runner: Any) -> SegmentFn:
    """A `SegmentRunner` as one side: numpy in, its own arrays inside, numpy out."""

    def run(name: str, feeds: Feeds) -> dict[str, np.ndarray]:
        got = runner.run(name, {k: runner.array(v) for k, v in feeds.items()})
        return {k: np.asarray(runner.to_numpy(v)) for k, v in got.items()}

    return run


def compare_segment(
    name: str,
    candidate: SegmentFn,
    reference: SegmentFn,
    samples: Sequence[Feeds],
    limit: Limit,
    inputs: str = "trajectory",
    size: str = "",
) -> Check | None:
    """Segment `name` on both sides on every sample; every reference output scored. None: no samples."""
    if not samples:
        return None
    scores = []
    for feeds in samples:
        got, want = candidate(name, feeds), reference(name, feeds)
        scores += [metrics(got[key], value, f"segment {name} output {key}") for key, value in want.items()]
    return Check("segment", name, Metrics.worst(scores), limit, len(samples), inputs, size)


def compare_latents(name: str, got: Any, want: Any, limit: Limit, size: str = "") -> Check:
    """A plan's final latents against the reference's."""
    return Check("end-to-end", name, metrics(got, want, f"end-to-end {name}"), limit, size=size)


@contextlib.contextmanager
def recording(generator: Generator, recorder: TrajectoryRecorder | None) -> Iterator[None]:
    """`recorder` sees every segment call of `generator` inside the block."""
    if recorder is None:
        yield
        return
    segments = runner_of(generator)
    segments.recorder = recorder
    try:
        yield
    finally:
        segments.recorder = None


def runner_of(generator: Generator) -> SegmentRunner:
    """The bundle engine under `generator`: recording feeds needs one (the torch runner runs modules,
    not a bundle's segments)."""
    if not isinstance(generator.segments, SegmentRunner):
        raise ConfigError(f"{generator.backend or 'this engine'} runs no bundle segments to record")
    return generator.segments


def generate(generator: Generator, plan: StepPlan, request: Request) -> np.ndarray:
    return np.asarray(generator.latents_to_numpy(generator.generate_latents(plan, request)))


def reference_generator(bundle: Bundle, threads: int | None = None) -> Generator:
    """ONNX Runtime fp32 on the CPU provider: what every fidelity budget is measured against."""
    return open_ort_generator(bundle, None, threads=threads, providers=["CPUExecutionProvider"])


@dataclass
class Reference:
    """One reference run: its plan and request, the final latents and the segment feeds it saw
    (computed once for many candidates: `tune`)."""

    name: str  # the plan's name in the bundle
    plan: StepPlan
    request: Request
    generator: Generator
    latents: np.ndarray
    recorder: TrajectoryRecorder


def run_reference(
    bundle: Bundle,
    plan: str | None = None,
    request: Request | None = None,
    generator: Generator | None = None,
    threads: int | None = None,
    max_samples: int = 4,
    progress: Callable[[str], None] | None = None,
) -> Reference:
    """Run the reference (`generator`, default ONNX Runtime fp32 CPU) on the bundle's `plan` (default:
    its ILF plan) and the held-out `request`, recording up to `max_samples` feeds per segment."""
    name = plan or bundle.default_plan
    step_plan = resolve_bundle_plan(bundle, name)  # the one resolver: a name, auto, a file, a preset
    request = request or held_out_request(bundle)
    generator = generator or reference_generator(bundle, threads)
    recorder = TrajectoryRecorder(bundle, max_samples, to_numpy=runner_of(generator).to_numpy)
    if progress:
        progress(f"reference {name}")
    with recording(generator, recorder):
        latents = generate(generator, step_plan, request)
    return Reference(name, step_plan, request, generator, latents, recorder)


def compare_to_reference(
    candidate: Generator,
    reference: Reference,
    segments: Sequence[str],
    limits: Budget,
    progress: Callable[[str], None] | None = None,
) -> list[Check]:
    """The candidate on the reference's plan and request; then each of `segments` (those it runs
    differently; none for engines without segment calls, e.g. torch) on the reference's recorded
    feeds; the end-to-end row last."""
    if progress:
        progress(f"{candidate.variant or candidate.backend} {reference.name}")
    got = generate(candidate, reference.plan, reference.request)
    ours, theirs = runner_outputs(candidate.segments), runner_outputs(reference.generator.segments)
    rows = []
    for segment in segments:
        if progress:
            progress(f"segment {segment}")
        row = compare_segment(segment, ours, theirs, reference.recorder.feeds(segment), limits.segment)
        if row is not None:
            rows.append(row)
    rows.append(compare_latents(reference.name, got, reference.latents, limits.end_to_end))
    return rows
