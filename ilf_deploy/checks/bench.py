"""`bench`: per-stage latency of a bundle's plans, and measured against predicted speedup."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.generator import Generator, Request

# The text encoder on a prompt not seen before (the runs reuse a cached embedding); not in latency.
COLD_PROMPT = "text encoder (cold prompt; not in latency)"


@dataclass
class PlanResult:
    plan: str
    steps: int
    block_forwards: int  # as run: an adaptive plan's are decided at run time
    latencies: list[float]  # seconds, end to end (cached prompt embedding .. VAE decode), one per run
    stages: dict[str, tuple[int, float]] = field(default_factory=dict)  # stage -> (calls, median seconds)

    @property
    def latency(self) -> float:
        return statistics.median(self.latencies)

    def to_dict(self) -> dict:
        return {
            "plan": self.plan,
            "steps": self.steps,
            "block_forwards": self.block_forwards,
            "latency_s": self.latency,
            "latencies_s": self.latencies,
            "images_per_s": 1.0 / self.latency,
            "stages": {k: {"calls": c, "seconds": s} for k, (c, s) in self.stages.items()},
        }


def bench_plans(
    generator: Generator,
    plans: list[StepPlan],
    request: Request,
    runs: int = 3,
    warmup: int = 1,
    progress: Callable[[str], None] | None = None,
) -> list[PlanResult]:
    """Median of `runs` runs after `warmup` for each plan; stages from the segments' own timers.

    Plans take turns run by run (ABAB...), so that a change in machine load hits every plan alike.
    A run's prompt embedding is cached after the warm-up (as `serve` caches a recurring prompt), so
    each run also encodes the prompt afresh, outside its latency: the COLD_PROMPT stage.
    """
    timings = generator.segments.timings  # every backend records its stage times (Segments)
    latencies: dict[str, list[float]] = {plan.name: [] for plan in plans}
    per_run: dict[str, list[dict[str, tuple[int, float]]]] = {plan.name: [] for plan in plans}
    ran = {plan.name: plan.block_forwards for plan in plans}  # as run (an adaptive plan decides)
    for index in range(warmup + runs):
        for plan in plans:
            if progress:
                progress(f"{plan.name} run {index + 1}/{warmup + runs}")
            timings.clear()
            start = time.perf_counter()
            latents = generator.generate_latents(plan, request)
            generated = time.perf_counter()
            generator.decode(latents)
            end = time.perf_counter()
            ran[plan.name] = (generator.last_block_forwards or [plan.block_forwards])[0]
            if index < warmup:
                continue
            latencies[plan.name].append(end - start)
            stages = {name: (len(calls), sum(calls)) for name, calls in timings.items()}
            in_loop = sum(s for name, (_, s) in stages.items() if name != "vae_decoder")
            stages["scheduler + glue"] = (plan.num_steps, (generated - start) - in_loop)
            cold = _cold_prompt_seconds(generator, request)
            if cold is not None:
                stages[COLD_PROMPT] = (1, cold)
            per_run[plan.name].append(stages)
    results = []
    for plan in plans:
        runs_stages = per_run[plan.name]
        names = runs_stages[0].keys() if runs_stages else []
        stages = {n: (runs_stages[0][n][0], statistics.median(r[n][1] for r in runs_stages)) for n in names}
        results.append(PlanResult(plan.name, plan.num_steps, ran[plan.name], latencies[plan.name], stages))
    return results


def _cold_prompt_seconds(generator: Generator, request: Request) -> float | None:
    """The text encoder on the request's prompt as a new prompt costs it (no cache), tokenizer
    included; None for models without a prompt (DiT)."""
    if not request.prompt or generator.facts.architecture == "dit":
        return None
    start = time.perf_counter()
    generator.encode_prompt(request.prompt)
    return time.perf_counter() - start


def baseline_of(results: list[PlanResult]) -> PlanResult | None:
    """The plain plan with the most steps is what speedups are measured against."""
    plain = [r for r in results if r.plan.startswith("base-")]
    return max(plain, key=lambda r: r.steps) if plain else None


def summary(results: list[PlanResult]) -> list[dict]:
    base = baseline_of(results)
    rows = []
    for r in results:
        row = {**r.to_dict()}
        if base is not None:
            measured = base.latency / r.latency
            predicted = base.block_forwards / r.block_forwards
            row.update(
                baseline=base.plan,
                measured_speedup=measured,
                predicted_speedup=predicted,
                speedup_ratio=measured / predicted,
            )
        rows.append(row)
    return rows


def plot(results: list[PlanResult], path: Path) -> None:
    """A horizontal bar per plan (median latency), drawn with Pillow to avoid a plotting dependency."""
    from PIL import Image, ImageDraw

    width, bar, pad, label = 720, 28, 12, 150
    height = pad * 2 + len(results) * (bar + pad)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    longest = max(r.latency for r in results)
    for i, r in enumerate(results):
        top = pad + i * (bar + pad)
        length = int((width - label - 2 * pad - 120) * r.latency / longest)
        draw.text((pad, top + 8), r.plan, fill="black")
        draw.rectangle([label, top, label + length, top + bar], fill=(70, 110, 190))
        text = f"{r.latency * 1000:.0f} ms, {r.block_forwards} blk"
        draw.text((label + length + 6, top + 8), text, fill="black")
    image.save(path)
