"""`ilf-deploy tune`: the fastest engine x precision on this machine whose output stays within budget.

Candidates: every installed CPU backend with every precision it can run on the bundle: ONNX
Runtime fp32 (the reference) and the bundle's ORT variants (int8-dynamic, int8-qdq, fp8-qdq);
OpenVINO f32, bf16 (only where the CPU has AVX512_BF16 or AMX), the bundle's int8-ov variants and
its int8-qdq (Q/DQ ONNX that OpenVINO also reads); the bundle's PyTorch model in fp32 and bf16 when
the bundle carries it. TensorRT is a GPU engine: not a candidate here.

Each candidate is checked against ONNX Runtime fp32 by the comparator `verify-variant` uses
(ilf_deploy.compare: its segments on a held-out trajectory's feeds, then the end-to-end latents,
held to compare.BUDGETS for its engine and precision); one that fails is timed and recorded, never
chosen. Every candidate that opens is timed on one denoising step (the plan's
steps up to its first feedback step: an ILF step with the inner loop), round-robin so that a
machine's slow moments hit every candidate alike; the fastest median within budget wins. The
result goes to `BUNDLE/tuning.json` with this machine's fingerprint; `--backend auto`
(backends/auto.py) reads it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .backends import REGISTRY, open_bundle_generator
from .backends.auto import (
    FALLBACK_BACKEND,
    TUNING_FILE,
    TUNING_SCHEMA,
    bundle_digest,
    engine_label,
)
from .backends.machine import fingerprint
from .compare import Budget, Check, Reference, budget, compare_to_reference, held_out_request, run_reference
from .errors import ConfigError, IlfError
from .plan import StepPlan
from .runtime.bundle import Bundle, strict_json, write_atomic
from .runtime.generator import Generator, Request

MAX_ROUNDS = 7


@dataclass
class Candidate:
    backend: str
    variant: str | None  # a bundle variant, or an engine precision (OpenVINO "bf16")
    budget: Budget | None  # None: the reference itself
    segments: list[str] = field(default_factory=list)  # compared segment by segment
    fidelity: list[Check] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds per step, one per round
    error: str | None = None  # why it was not measured (not installed, did not open...)
    options: dict[str, Any] = field(default_factory=dict)  # the backend's (torch: dtype)

    @property
    def label(self) -> str:
        return engine_label(self.backend, self.variant, self.options)

    @property
    def ok(self) -> bool:
        return self.error is None and all(f.ok for f in self.fidelity)

    @property
    def ms_per_step(self) -> float | None:
        return 1000 * statistics.median(self.times) if self.times else None

    def to_dict(self, reference_ms: float | None) -> dict[str, Any]:
        ms = self.ms_per_step
        return {
            "backend": self.backend,
            "variant": self.variant,
            "options": self.options,
            "label": self.label,
            "ms_per_step": ms,
            "speedup": reference_ms / ms if ms and reference_ms else None,
            "rounds": len(self.times),
            "budget": self.budget.to_dict() if self.budget else None,
            "fidelity": [f.to_dict() for f in self.fidelity],
            "ok": self.ok,
            "error": self.error,
        }


def candidates(bundle: Bundle) -> list[Candidate]:
    """Every backend x precision that could run `bundle` here (uninstalled ones carry an error);
    each with the budget of compare.BUDGETS for its engine and precision."""
    all_segments = list(bundle.manifest.segments)
    variants = bundle.manifest.variants
    own = bundle.manifest.precision  # the precision of the bundle's own graphs

    def variant(backend: str, name: str) -> Candidate:
        entry = variants[name]
        return Candidate(backend, name, budget(backend, entry.mode), list(entry.segments))

    found = [Candidate(FALLBACK_BACKEND, None, None)]
    found += [variant("onnxruntime", n) for n, e in variants.items() if "onnxruntime" in e.engines]
    if "openvino" in REGISTRY:
        missing = REGISTRY["openvino"].missing()
        ov = [Candidate("openvino", None, budget("openvino", own), all_segments)]
        if missing is None:
            from .backends.openvino import cpu_has_bf16

            if cpu_has_bf16():
                ov.append(Candidate("openvino", "bf16", budget("openvino", "bf16"), all_segments))
        ov += [variant("openvino", n) for n, e in variants.items() if "openvino" in e.engines]
        for candidate in ov:
            if missing is not None:
                candidate.error = f"not installed: pip install 'ilf-deploy[{REGISTRY['openvino'].extra}]'"
        found += ov
    if bundle.manifest.torch_model and "torch" in REGISTRY:  # no segment calls: end to end only
        found.append(Candidate("torch", None, budget("torch", own)))
        found.append(Candidate("torch", None, budget("torch", "bf16"), options={"dtype": "bf16"}))
    return found


def pick_winner(found: list[Candidate]) -> Candidate:
    """The fastest timed candidate within its budget (the reference always is: it is fp32 itself)."""
    return min((c for c in found if c.ok and c.times), key=lambda c: c.ms_per_step or float("inf"))


def timing_plan(plan: StepPlan) -> StepPlan:
    """The plan's steps up to its first feedback step (all of them for a plan without one)."""
    first = next((i for i, step in enumerate(plan.steps) if step.feedback), len(plan.steps) - 1)
    return dataclasses.replace(plan, name=f"{plan.name}[:{first + 1}]", steps=plan.steps[: first + 1])


def tune(
    bundle_path: str | Path,
    plan: str | None = None,
    budget_s: float = 300.0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    include: Callable[[Candidate], bool] | None = None,
    digest: str | None = None,
) -> dict[str, Any]:
    """Check and time every candidate, write BUNDLE/tuning.json; returns what it wrote.

    `budget_s` bounds the timing rounds (at least one round always runs), which start after the
    fidelity runs (those also warm every engine up); `include` filters the candidates (tests,
    benchmarks); `digest` pins the bundle (refused unless it is that one)."""
    if budget_s <= 0:
        raise ConfigError(f"--budget-s must be > 0, got {budget_s:g}")
    started = time.perf_counter()
    bundle = Bundle.load(bundle_path, digest=digest)
    plan_name = plan or bundle.default_plan
    step_plan = bundle.plan(plan_name)
    request = held_out_request(bundle)
    found = [c for c in candidates(bundle) if include is None or include(c) or c.budget is None]
    options = {"threads": threads} if threads else {}

    if progress:
        progress(f"{engine_label(FALLBACK_BACKEND, None)} {plan_name} (the reference)")
    base = open_bundle_generator(bundle, FALLBACK_BACKEND, None, **options)
    reference = run_reference(bundle, plan_name, request, generator=base)
    generators = {0: base, **_check_fidelity(bundle, found, reference, options, progress)}
    timed = timing_plan(step_plan)
    _time_rounds(found, generators, timed, request, budget_s, progress)
    reference_ms = found[0].ms_per_step
    winner = pick_winner(found)
    report = {
        "schema": TUNING_SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint(),
        "bundle_digest": bundle_digest(bundle),
        "plan": plan_name,
        "timed": {"plan": timed.name, "steps": timed.num_steps, "threads": threads},
        "request": dataclasses.asdict(request),
        "candidates": [c.to_dict(reference_ms) for c in found],
        "winner": {
            "backend": winner.backend,
            "variant": winner.variant,
            "options": winner.options,
            "label": winner.label,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_atomic(
        bundle.path / TUNING_FILE,
        (json.dumps(strict_json(report), indent=2, allow_nan=False) + "\n").encode(),
    )
    return report


def _check_fidelity(
    bundle: Bundle,
    found: list[Candidate],
    reference: Reference,
    options: dict[str, Any],
    progress: Callable[[str], None] | None,
) -> dict[int, Generator]:
    """Each candidate against the reference (the comparator); returns the generators that opened,
    by candidate index (timed even beyond budget: the table shows what they would gain)."""
    generators: dict[int, Generator] = {}
    for index, candidate in enumerate(found):
        if candidate.budget is None or candidate.error is not None:
            continue
        if progress:
            progress(f"{candidate.label}: fidelity on {reference.name}")
        try:
            engine_options = {**candidate.options, **(options if candidate.backend != "torch" else {})}
            generator = open_bundle_generator(bundle, candidate.backend, candidate.variant, **engine_options)
            candidate.fidelity = compare_to_reference(
                generator, reference, candidate.segments, candidate.budget
            )
        except IlfError as exc:  # e.g. a variant OpenVINO cannot read
            candidate.error = str(exc)
            continue
        generators[index] = generator
    return generators


def _time_rounds(
    found: list[Candidate],
    generators: dict[int, Generator],
    timed: StepPlan,
    request: Request,
    budget_s: float,
    progress: Callable[[str], None] | None,
) -> None:
    """Round-robin timing of `timed` on every generator until `budget_s` is spent (at least one
    round, at most MAX_ROUNDS); each round's seconds per step go to the candidate's `times`."""
    timing_started = time.perf_counter()  # the budget is the timing's: fidelity runs always finish
    for rounds in range(MAX_ROUNDS):
        if rounds and time.perf_counter() - timing_started > budget_s:
            break
        order = list(generators)
        order = order[rounds % len(order) :] + order[: rounds % len(order)]  # rotate who goes first
        if progress:
            progress(f"timing round {rounds + 1} of at most {MAX_ROUNDS}")
        for index in order:
            generator = generators[index]
            start = time.perf_counter()
            generator.latents_to_numpy(generator.generate_latents(timed, request))
            found[index].times.append((time.perf_counter() - start) / timed.num_steps)
