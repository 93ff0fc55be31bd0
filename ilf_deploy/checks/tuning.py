"""`ilf-deploy tune`: the fastest engine x precision on this machine whose output stays within budget.

Candidates: every installed CPU backend with every precision it can run on the bundle: ONNX
Runtime fp32 (the reference) and the bundle's ORT variants (int8-dynamic, int8-qdq, fp8-qdq);
OpenVINO f32, bf16 (only where the CPU has AVX512_BF16 or AMX; the bundle's bf16 variant, its
precision policy per segment, instead where it has one), the bundle's int8-ov variants (there also
with bf16 for the ops left unquantised in its segments) and
its int8-qdq (Q/DQ ONNX that OpenVINO also reads); the bundle's PyTorch model in fp32 and bf16,
eager and compiled (`torch.compile` per block, Inductor; the winner's options, `compile` included,
go to tuning.json and `--backend auto` opens the same engine), when the bundle carries it. TensorRT
is a GPU engine: not a candidate here.

Each candidate is checked against ONNX Runtime fp32 by the comparator `verify-variant` uses
(ilf_deploy.engines.compare: its segments on a held-out trajectory's feeds, then the end-to-end latents,
held to compare.BUDGETS for its engine and precision); one that fails is timed and recorded, never
chosen. Every candidate that opens is timed on one denoising step (the plan's
steps up to its first feedback step: an ILF step with the inner loop; the first step of a plan
without one), round-robin so that a
machine's slow moments hit every candidate alike; the fastest median within budget wins, but a
lossy one (int8, bf16, fp8...) only when it is compare.LOSSY_SPEEDUP times as fast as the fastest
exact (fp32) one: accuracy is never traded for nothing. Every engine stays open, so that all are
timed together, while memory allows; on a model too large for that, the open ones are timed as a
group (the reference always among them) and closed before the next opens (`Room`; `--max-open`
caps it). `--budget-s` bounds the whole command; the candidates are checked likeliest winner first
(`likeliest_first`), so that a budget too short for all of them leaves out the least likely. The
result goes to `BUNDLE/tuning.json` with this machine's fingerprint; `--backend auto`
(engines/backends/auto.py) reads it.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ilf_deploy.core.errors import ConfigError, IlfError
from ilf_deploy.core.files import write_report
from ilf_deploy.core.memory import GIB, MemoryGauge
from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Generator, Request
from ilf_deploy.engines.backends import REGISTRY, as_bundle, backend_names, open_bundle_generator
from ilf_deploy.engines.backends.auto import FALLBACK_BACKEND, TUNING_FILE, bundle_digest, engine_label
from ilf_deploy.engines.backends.machine import cpu_has_bf16, cpu_has_int8_dot, fingerprint
from ilf_deploy.engines.backends.plans import resolve_bundle_plan
from ilf_deploy.engines.compare import (
    LOSSY_SPEEDUP,
    Budget,
    Check,
    Reference,
    budget,
    compare_to_reference,
    held_out_request,
    run_reference,
)

MAX_ROUNDS = 7


@dataclass
class Candidate:
    backend: str
    variant: str | None  # a bundle variant, or an engine precision (OpenVINO "bf16")
    budget: Budget | None  # None: the reference itself
    segments: list[str] = field(default_factory=list)  # compared segment by segment
    precision: str = "fp32"  # what its GEMMs compute in: a variant's mode, or the engine's precision
    fidelity: list[Check] = field(default_factory=list)
    times: list[float] = field(default_factory=list)  # seconds per step, one per round
    error: str | None = None  # why it was not measured (not installed, did not open...)
    options: dict[str, Any] = field(default_factory=dict)  # the backend's (torch: dtype)
    resident_bytes: int | None = None  # the memory opening and checking its engine took (Room)
    group: int | None = None  # the group it was timed in (1 unless memory split them; the reference: in all)
    reference_ms: float | None = None  # the reference's median in its group's rounds

    @property
    def label(self) -> str:
        return engine_label(self.backend, self.variant, self.options)

    @property
    def ok(self) -> bool:
        return self.error is None and all(f.ok for f in self.fidelity)

    @property
    def exact(self) -> bool:
        """The reference's numerics (fp32 parity); else lossy (compare.LOSSY_SPEEDUP applies)."""
        return self.budget is None or self.budget.exact

    @property
    def ms_per_step(self) -> float | None:
        return 1000 * statistics.median(self.times) if self.times else None

    def comparable_ms(self, reference_ms: float | None) -> float | None:
        """Its ms per step on the scale of the reference's median over all rounds: scaled by how fast
        the reference ran beside it, so that groups timed at different moments compare (Room); with
        one group, its own median."""
        ms = self.ms_per_step
        if ms is None or not self.reference_ms or not reference_ms:
            return ms
        return ms * reference_ms / self.reference_ms

    def to_dict(self, reference_ms: float | None) -> dict[str, Any]:
        ms = self.ms_per_step
        return {
            "backend": self.backend,
            "variant": self.variant,
            "options": self.options,
            "label": self.label,
            "ms_per_step": ms,
            "speedup": (self.reference_ms or reference_ms) / ms if ms and reference_ms else None,
            "rounds": len(self.times),
            "group": self.group,
            "resident_bytes": self.resident_bytes,
            "budget": self.budget.to_dict() if self.budget else None,
            "fidelity": [f.to_dict() for f in self.fidelity],
            "ok": self.ok,
            "error": self.error,
        }


def candidates(bundle: Bundle) -> list[Candidate]:
    """Every backend x precision that could run `bundle` here (uninstalled ones carry an error);
    each with the budget of compare.BUDGETS for its engine and precision; the reference first, then
    the likeliest winners (`likeliest_first`)."""
    all_segments = list(bundle.manifest.segments)
    variants = bundle.manifest.variants
    own = bundle.manifest.precision  # the precision of the bundle's own graphs
    bf16 = cpu_has_bf16()

    def variant(backend: str, name: str) -> Candidate:
        entry = variants[name]
        return Candidate(backend, name, budget(backend, entry.mode), list(entry.segments), entry.mode)

    found = [Candidate(FALLBACK_BACKEND, None, None, precision=own)]
    found += [variant("onnxruntime", n) for n, e in variants.items() if "onnxruntime" in e.engines]
    if "openvino" in REGISTRY:
        missing = REGISTRY["openvino"].missing()
        ov = [Candidate("openvino", None, budget("openvino", own), all_segments, own)]
        # a bf16 variant (quantize --mode bf16: its policy per segment) replaces the engine's bf16
        if bf16 and missing is None and not any(e.mode == "bf16" for e in variants.values()):
            ov.append(Candidate("openvino", "bf16", budget("openvino", "bf16"), all_segments, "bf16"))
        ov += [variant("openvino", n) for n, e in variants.items() if "openvino" in e.engines]
        for name in (n for n, e in variants.items() if e.mode == "int8-ov" and bf16 and missing is None):
            # int8 GEMMs, and bf16 (not f32) for the ops NNCF left unquantised in those segments and
            # for the other reduced-precision ones (`cross_kv`): AMX has tiles for both; held to the
            # variant's own int8-ov budget, every segment that runs in reduced precision compared
            mixed = variant("openvino", name)
            mixed.segments += [
                n for n in bundle.manifest.reduced_precision_segments if n not in mixed.segments
            ]
            ov.append(dataclasses.replace(mixed, options={"precision": "bf16"}))
        for candidate in ov:
            if missing is not None:
                candidate.error = f"not installed: pip install 'ilf-deploy[{REGISTRY['openvino'].extra}]'"
        found += ov
    if bundle.manifest.torch_model and "torch" in REGISTRY:  # no segment calls: end to end only
        for compiled in ({}, {"compile": True}):  # eager, then torch.compile (Inductor) per block
            found.append(Candidate("torch", None, budget("torch", own), precision=own, options={**compiled}))
            found.append(
                Candidate(
                    "torch",
                    None,
                    budget("torch", "bf16"),
                    precision="bf16",
                    options={"dtype": "bf16", **compiled},
                )
            )
    return [found[0], *likeliest_first(found[1:], bf16, cpu_has_int8_dot())]


# The order `tune` checks candidates in, so that a --budget-s too short for all of them leaves out
# the ones least likely to win (ordering only: the timing decides). Every tune table measured so far
# ranks so (docs/engines.md: AVX-512 VNNI Xeon, AVX512_BF16 EPYC, AMX Xeon, AVX2-only EPYC): int8 GEMMs
# first (int8 with bf16 for the rest before int8 with f32) where the CPU has 8-bit dot products, bf16
# where it has it in hardware, then fp32; int8 without 8-bit dot products (AVX2 only: no faster than
# fp32 on ORT, 0.55x on OpenVINO) after fp32; precisions a CPU only emulates (fp8, fp16; bf16 without
# hardware) last. Within a precision: OpenVINO, ONNX Runtime, torch eager, torch compiled (a few per
# cent faster than eager where measured, but its check compiles first: 25 s on the default model,
# which the deadline cannot foresee).
_ENGINE_ORDER = ("openvino", "onnxruntime", "torch")


def likeliest_first(found: list[Candidate], bf16: bool, int8_dot: bool = True) -> list[Candidate]:
    def rank(candidate: Candidate) -> tuple[int, int, int]:
        mode = candidate.precision
        if mode.startswith("int8"):
            tier = 0 if bf16 and candidate.options.get("precision") == "bf16" else 1
            tier += 0 if int8_dot else 4  # after fp32 (3), before the emulated precisions (6)
        elif mode == "bf16":
            tier = 2 if bf16 else 6
        else:
            tier = 3 if mode == "fp32" else 6
        compiled = 1 if candidate.options.get("compile") else 0
        return tier, _ENGINE_ORDER.index(candidate.backend), compiled  # candidates() makes only these

    return sorted(found, key=rank)  # stable: a variant's place in the manifest breaks ties


def only_backends(names: list[str]) -> Callable[[Candidate], bool]:
    """`tune --backends`: the candidates of these engines only (the reference, ONNX Runtime fp32,
    always runs). Leaving engines out can only leave `auto` slower, never pick a worse answer."""
    unknown = [name for name in names if name not in backend_names()]
    if unknown or not names:
        raise ConfigError(
            f"--backends {','.join(names)}: choose from {', '.join(backend_names())} (comma-separated)"
        )
    return lambda candidate: candidate.backend in names


def pick_winner(found: list[Candidate]) -> Candidate:
    return choose_winner(found)[0]


def choose_winner(found: list[Candidate]) -> tuple[Candidate, str]:
    """The fastest timed candidate within its budget, a lossy one only when it is LOSSY_SPEEDUP
    times as fast as the fastest exact one (the reference always is exact); and why, in words.
    Compared on `Candidate.comparable_ms`: each one's speed relative to the reference timed beside it."""
    usable = [c for c in found if c.ok and c.times]
    reference_ms = next((c.ms_per_step for c in found if c.budget is None), None)

    def ms(candidate: Candidate) -> float:
        return candidate.comparable_ms(reference_ms) or float("inf")

    exact = min((c for c in usable if c.exact), key=ms)
    lossy = min((c for c in usable if not c.exact), key=ms, default=None)
    if lossy is None:
        return (
            exact,
            f"{exact.label} is the fastest ({ms(exact):.1f} ms/step); no lossy candidate passed its budget",
        )
    gain = ms(exact) / ms(lossy)
    versus = f"{gain:.2f}x the fastest exact one, {exact.label} ({ms(lossy):.1f} vs {ms(exact):.1f} ms/step)"
    if gain >= LOSSY_SPEEDUP:
        return (
            lossy,
            f"{lossy.label} (lossy) is {versus}: at least the {LOSSY_SPEEDUP:.2f}x a lossy one must gain",
        )
    return exact, (
        f"{exact.label}: the fastest lossy candidate, {lossy.label}, is only {versus}; "
        f"a lossy one must be at least {LOSSY_SPEEDUP:.2f}x as fast"
    )


def timing_plan(plan: StepPlan) -> StepPlan:
    """The plan's steps up to its first feedback step; its first step where it has none (every
    step then runs the same segments on the same shapes: timing them all made a round of a large
    model cost minutes, and the budget skipped the last candidates)."""
    first = next((i for i, step in enumerate(plan.steps) if step.feedback), 0)
    return plan.first_steps(first + 1, f"{plan.name}[:{first + 1}]")


def tune(
    bundle_path: str | Path | Bundle,
    plan: str | None = None,
    budget_s: float = 300.0,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    include: Callable[[Candidate], bool] | None = None,
    digest: str | None = None,
    max_open: int | None = None,
    memory: MemoryGauge | None = None,
) -> dict[str, Any]:
    """Check and time every candidate, write BUNDLE/tuning.json; returns what it wrote.

    `budget_s` bounds the whole run: a candidate whose fidelity check would not leave time for a
    timing round is skipped (said in its error), and timing rounds stop when the next would pass it;
    the reference's check and one timing round always run. `max_open` caps the engines open at once
    (the reference included; default: as many as `memory`, this machine's, holds: see `Room`).
    `include` filters the candidates (tests, benchmarks); `digest` pins the bundle (refused unless
    it is that one)."""
    if budget_s <= 0:
        raise ConfigError(f"--budget-s must be > 0, got {budget_s:g}")
    if max_open is not None and max_open < 2:
        raise ConfigError(f"--max-open must be >= 2 (the reference and one candidate), got {max_open}")
    started = time.perf_counter()
    bundle = as_bundle(bundle_path, digest=digest)  # a Bundle the caller loaded: not read again
    plan_name = plan or bundle.default_plan
    step_plan = resolve_bundle_plan(bundle, plan_name)
    request = held_out_request(bundle)
    found = [c for c in candidates(bundle) if include is None or include(c) or c.budget is None]
    options = {"threads": threads} if threads else {}
    room = Room.here(memory or MemoryGauge(), max_open)

    if progress:
        progress(f"{engine_label(FALLBACK_BACKEND, None)} {plan_name} (the reference)")
    opened = time.perf_counter()
    with room.measured(found[0], weight_bytes(bundle, found[0])):
        base = open_bundle_generator(bundle, FALLBACK_BACKEND, None, **options)
        reference = run_reference(bundle, plan_name, request, generator=base)
    timed = timing_plan(step_plan)
    deadline = Deadline(started + budget_s, budget_s, time.perf_counter() - opened)
    deadline.step_s = deadline.check_s * timed.num_steps / step_plan.num_steps
    run = _Run(bundle, found, reference, options, timed, request, deadline, room, progress)
    run.check_and_time(base)
    del base, reference, run  # the engines go before the report is written
    report = {
        "schema": 1,  # 2 adds the plan search (search_plans); without one, the oldest that says it
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fingerprint": fingerprint(),
        "bundle_digest": bundle_digest(bundle),
        "plan": plan_name,
        "timed": {"plan": timed.name, "steps": timed.num_steps, "threads": threads, "memory": room.to_dict()},
        "request": dataclasses.asdict(request),
        **_outcome(found),
        "budget_s": budget_s,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_report(bundle.path / TUNING_FILE, report)
    return report


def _outcome(found: list[Candidate]) -> dict[str, Any]:
    """tuning.json's candidates, winner (and why) and the margin a lossy one had to beat."""
    winner, reason = choose_winner(found)
    chosen = {"backend": winner.backend, "variant": winner.variant, "options": winner.options}
    return {
        "candidates": [c.to_dict(found[0].ms_per_step) for c in found],
        "winner": {**chosen, "label": winner.label, "reason": reason},
        "lossy_speedup": LOSSY_SPEEDUP,
    }


@dataclass
class Deadline:
    """`tune --budget-s` over the whole command, with what its steps have cost so far."""

    end: float  # time.perf_counter() by which the command should be done
    budget_s: float
    check_s: float  # the longest fidelity check so far (opening the engine included)
    step_s: float = 0.0  # one engine's timed steps, as the reference's check suggests

    def allows(self, seconds: float) -> bool:
        return time.perf_counter() + seconds <= self.end

    def skipped(self) -> str:
        return f"skipped: its check (about {self.check_s:.1f} s) would overrun --budget-s {self.budget_s:g}"


# -- memory: how many engines stay open at once -----------------------------------------------------


def weight_bytes(bundle: Bundle, candidate: Candidate) -> int:
    """The bytes of the files `candidate`'s engine loads: every segment (its variant's where that
    replaced one) with the files beside it that share its stem (ONNX external data, an IR's .bin),
    or the torch model's directory. `Room` scales its memory estimates by it."""
    if candidate.backend == "torch":
        root = bundle.path / (bundle.manifest.torch_model or "")
        return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
    variant = candidate.variant if candidate.variant in bundle.manifest.variants else None
    stems = {_stem(bundle.segment_spec(name, variant).file) for name in bundle.manifest.segments}
    return sum((bundle.path / f).stat().st_size for f in bundle.manifest.files if _stem(f) in stems)


def _stem(file: str) -> str:
    """onnx/blocks_00_00.onnx.data -> onnx/blocks_00_00"""
    name = file.rsplit("/", 1)[-1]
    return file[: len(file) - len(name)] + name.split(".", 1)[0]


@dataclass
class Room:
    """How many engines `tune` keeps open at once.

    Interleaved timing (every engine open, timed round-robin) is the fair default: a slow moment of
    the machine hits every candidate alike. It needs every engine in memory at once, which a large
    model does not allow (SD3-medium at full depth: about 8 GB per fp32 engine, 24 GiB ran out).
    So the candidates are checked in order, each opened only while its estimate still fits in the
    available memory less a margin (a tenth of the machine, at least 1 GiB: transient peaks such as
    OpenVINO's compilation, other processes), and while fewer than `max_open` are open. The estimate:
    the bytes of the files it loads (`weight_bytes`: an int8 variant's are about a quarter of fp32's)
    times the most resident memory per such byte an engine took so far (measured: the growth of
    opening and checking it, the fp32 reference's first), so that a small int8 engine still fits
    where another fp32 one would not. When the next would not
    fit, the engines open so far are timed round-robin as one group, the reference among them,
    closed, and the next group starts: every candidate is still timed interleaved with the reference,
    and picked by its speed relative to the reference timed beside it (`Candidate.reference_ms`), so
    groups timed at different moments stay comparable. Nothing is re-opened; one group (everything
    fits) is exactly the interleaved timing. A candidate that does not fit even beside the reference
    alone is skipped, saying so."""

    gauge: MemoryGauge
    max_open: int | None  # `tune --max-open`: at most this many engines at once, the reference included
    margin: int  # bytes left free
    available_at_start: int | None
    largest: int = 0  # the most resident memory one engine took so far
    per_weight_byte: float = 0.0  # the most resident memory per byte of its files an engine took
    groups: int = 1
    most_open: int = 1
    released: list[int] = field(default_factory=list)  # bytes each closed group gave back

    @classmethod
    def here(cls, gauge: MemoryGauge, max_open: int | None) -> Room:
        return cls(gauge, max_open, gauge.margin(), gauge.available())

    @contextmanager
    def measured(self, candidate: Candidate, weights: int) -> Iterator[None]:
        """Record the resident memory that opening and checking `candidate`'s engine (`weights`
        bytes of files) took."""
        before = self.gauge.resident()
        try:
            yield
        finally:
            after = self.gauge.resident()
            if before is not None and after is not None:
                candidate.resident_bytes = max(after - before, 0)
                self.largest = max(self.largest, candidate.resident_bytes)
                if weights:
                    self.per_weight_byte = max(self.per_weight_byte, candidate.resident_bytes / weights)

    def need(self, weights: int) -> float:
        """The memory an engine loading `weights` bytes of files is expected to take."""
        return self.per_weight_byte * weights if self.per_weight_byte and weights else self.largest

    def fits(self, open_now: int, need: float) -> bool:
        """Whether one more engine, expected to take `need` bytes, fits beside `open_now` open ones."""
        if self.max_open is not None and open_now >= self.max_open:
            return False
        return self.gauge.room_for(need)

    def why_not(self, need: float) -> str:
        available = (self.gauge.available() or 0) / GIB
        return (
            f"skipped: about {need / GIB:.1f} GiB (as the engines so far took per byte of their files) "
            f"would not fit beside the reference: {available:.1f} GiB available, "
            f"{self.margin / GIB:.1f} GiB kept free"
        )

    def close(self, group: dict[int, Generator]) -> None:
        """Close every engine of `group` but the reference's (index 0), and give their memory back."""
        before = self.gauge.resident()
        for index in [i for i in group if i]:
            del group[index]
        self.gauge.release()
        after = self.gauge.resident()
        if before is not None and after is not None:
            self.released.append(before - after)
        self.groups += 1

    def to_dict(self) -> dict[str, Any]:
        return {
            "mode": "interleaved" if self.groups == 1 else "groups",
            "groups": self.groups,
            "most_open": self.most_open,
            "max_open": self.max_open,
            "available_bytes": self.available_at_start,
            "margin_bytes": self.margin,
            "largest_engine_bytes": self.largest,
            "released_bytes": self.released,
        }


@dataclass
class _Run:
    """One `tune`: the candidates' checks and timing rounds, group by group (`Room`)."""

    bundle: Bundle
    found: list[Candidate]
    reference: Reference
    options: dict[str, Any]
    timed: StepPlan
    request: Request
    deadline: Deadline
    room: Room
    progress: Callable[[str], None] | None

    def say(self, message: str) -> None:
        if self.progress:
            self.progress(message)

    def check_and_time(self, base: Generator) -> None:
        """Each candidate against the reference while the deadline leaves time for it and a timing
        round of every engine open; the open ones timed group by group as memory allows (`Room`)."""
        group: dict[int, Generator] = {0: base}
        for index, candidate in enumerate(self.found):
            if candidate.budget is None or candidate.error is not None:
                continue
            if not self.deadline.allows(self.deadline.check_s + self.deadline.step_s * (len(group) + 2)):
                candidate.error = self.deadline.skipped()
                continue
            weights = weight_bytes(self.bundle, candidate)
            need = self.room.need(weights)
            if len(group) > 1 and not self.room.fits(len(group), need):
                self.say(f"memory: {len(group)} engines open, no room for {candidate.label}: timing them")
                self._time_rounds(group, self._reserve_s(index), grouped=True)
                self.room.close(group)
            if not self.room.fits(len(group), need):
                candidate.error = self.room.why_not(need)
                continue
            generator = self._open_checked(candidate, weights)
            if generator is not None:
                group[index] = generator
                self.room.most_open = max(self.room.most_open, len(group))
            del generator  # the group holds it, or nothing does
        if len(group) > 1 or not self.found[0].times:
            self._time_rounds(group, 0.0, grouped=self.room.groups > 1)

    def _open_checked(self, candidate: Candidate, weights: int) -> Generator | None:
        """The candidate's engine, checked against the reference (the comparator); None (and its
        error) where it did not open."""
        began = time.perf_counter()
        self.say(f"{candidate.label}: fidelity on {self.reference.name}")
        torch = candidate.backend == "torch"
        try:
            with self.room.measured(candidate, weights):
                engine_options = {**candidate.options, **({} if torch else self.options)}
                generator = open_bundle_generator(
                    self.bundle, candidate.backend, candidate.variant, **engine_options
                )
                candidate.fidelity = compare_to_reference(
                    generator, self.reference, candidate.segments, candidate.budget
                )
        except IlfError as exc:  # e.g. a variant OpenVINO cannot read
            candidate.error = str(exc)
            return None
        finally:
            self.deadline.check_s = max(self.deadline.check_s, time.perf_counter() - began)
        candidate.group = self.room.groups
        return generator

    def _reserve_s(self, index: int) -> float:
        """Seconds to keep for the candidates after `index`: a check and a timing round each."""
        left = sum(1 for c in self.found[index:] if c.budget is not None and c.error is None)
        return left * (self.deadline.check_s + 2 * self.deadline.step_s)

    def _time_rounds(self, group: dict[int, Generator], reserve_s: float, grouped: bool) -> None:
        """Round-robin timing of `timed` on the group's engines while the deadline leaves time for
        another round as long as the last and `reserve_s` after it (at least one round, at most
        MAX_ROUNDS); each round's seconds per step go to the candidate's `times`, and the reference's
        median over these rounds to each one's `reference_ms`."""
        reference = self.found[0]
        first_reference_round = len(reference.times)
        named = f" (group {self.room.groups}: {len(group)} engines)" if grouped else ""
        last_round_s = 0.0
        for rounds in range(MAX_ROUNDS):
            if rounds and not self.deadline.allows(last_round_s + reserve_s):
                break
            round_started = time.perf_counter()
            order = list(group)
            order = order[rounds % len(order) :] + order[: rounds % len(order)]  # rotate who goes first
            self.say(f"timing round {rounds + 1} of at most {MAX_ROUNDS}{named}")
            for index in order:
                generator = group[index]
                start = time.perf_counter()
                generator.latents_to_numpy(generator.generate_latents(self.timed, self.request))
                self.found[index].times.append((time.perf_counter() - start) / self.timed.num_steps)
            last_round_s = time.perf_counter() - round_started
        beside = 1000 * statistics.median(reference.times[first_reference_round:])
        for index in group:
            if index:
                self.found[index].reference_ms = beside


# -- plan search (`tune --search-plans`) ----------------------------------------------------------

SEARCH_OFFSET = 100_000  # the tuning prompts start here (the dev range; docs/default-model.md ("Evaluation"))
REPORTING_OFFSET = 200_000  # the reporting prompts start here: a search never reads them
PLAN_SEARCH_PLOT = "plan_search.png"  # beside tuning.json in the bundle; not a manifest file


@dataclass(frozen=True)
class QualityBudget:
    """How much worse than the reference plan a candidate may be, on the tuning prompts.

    `acc`: the most drop of paired all-attribute accuracy (a number, or "se": one paired standard
    error of the candidate's own difference); `frechet`: the most rise of the Fréchet distance;
    `latent_l2`: the most mean relative L2 of the final latents to the reference's. None: no limit."""

    acc: float | str | None = "se"
    frechet: float | None = 2.0
    latent_l2: float | None = None

    @classmethod
    def parse(cls, text: str) -> QualityBudget:
        """'acc=se,frechet=2,l2=0.2' (any subset; 'none' lifts a limit; unnamed ones keep the default)."""
        limits: dict[str, Any] = {}
        names = {"acc": "acc", "frechet": "frechet", "l2": "latent_l2"}
        for part in filter(None, (p.strip() for p in text.split(","))):
            name, _, value = part.partition("=")
            if name.strip() not in names or not value.strip():
                raise ConfigError(
                    f"--quality-budget {text!r}: expected acc=VALUE|se, frechet=VALUE, l2=VALUE"
                )
            value = value.strip().lower()
            try:
                limit = (
                    None if value == "none" else value if value == "se" and name == "acc" else float(value)
                )
            except ValueError:
                raise ConfigError(f"--quality-budget {part!r}: {value!r} is not a number") from None
            if isinstance(limit, float) and not 0 <= limit < float("inf"):
                raise ConfigError(f"--quality-budget {part!r}: a limit must be >= 0")
            limits[names[name.strip()]] = limit
        return cls(**limits)

    @property
    def text(self) -> str:
        parts = [f"Δacc >= -{'1 se' if self.acc == 'se' else self.acc}" if self.acc is not None else ""]
        parts += [f"Fréchet <= reference + {self.frechet:g}" if self.frechet is not None else ""]
        parts += [f"latent rel L2 <= {self.latent_l2:g}" if self.latent_l2 is not None else ""]
        return ", ".join(p for p in parts if p) or "no limit"

    def miss(self, quality: dict[str, float], reference: dict[str, float]) -> str | None:
        """Why `quality` (a `QualityFn` row) is outside the budget, or None when it is inside."""
        if self.acc is not None:
            allowed = quality["delta_acc_se"] if self.acc == "se" else float(self.acc)
            if quality["delta_acc"] < -allowed:
                return f"Δacc {quality['delta_acc']:+.3f} < -{allowed:.3f}"
        if self.frechet is not None and quality["frechet"] > reference["frechet"] + self.frechet:
            return f"Fréchet {quality['frechet']:.2f} > {reference['frechet']:.2f} + {self.frechet:g}"
        if self.latent_l2 is not None and quality["latent_l2"] > self.latent_l2:
            return f"latent rel L2 {quality['latent_l2']:.3f} > {self.latent_l2:g}"
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "frechet": self.frechet, "latent_l2": self.latent_l2, "text": self.text}


# (candidate plans by name, the reference's name, first prompt, prompts) -> per name: delta_acc,
# delta_acc_se, frechet, latent_l2, acc, block_forwards (the mean that ran); the real one is
# evaluation.plan_quality (`eval` on those prompts, paired against the reference).
QualityFn = Callable[[dict[str, StepPlan], str, int, int], dict[str, dict[str, float]]]


def cache_ranges(bundle: Bundle) -> list[tuple[int, int]]:
    """The block ranges the bundle's own plans cache, and its ILF loop: ranges its segments cover."""
    ranges = {
        (op.start, op.end)
        for name in bundle.plan_names
        for step in bundle.plan(name).steps
        for op in step.ops
        if op.kind in ("cache_refresh", "cache_reuse", "cache_adaptive")
    }
    if bundle.loop is not None:
        ranges.add(tuple(bundle.loop))  # type: ignore[arg-type]
    return sorted(ranges)


def plan_candidates(
    bundle: Bundle,
    steps: list[int] | None = None,
    refresh: tuple[int, ...] = (2, 3),
    thresholds: tuple[float, ...] = (0.05, 0.1, 0.2),
    max_reuse: int = 2,
) -> dict[str, StepPlan]:
    """The bundle's plans, and each ILF plan's step count (or `steps`) composed with a Δ-cache over
    each of `cache_ranges` (refreshed every k-th step, or adaptive at each threshold): every one
    within the bundle's cut points."""
    from ilf_deploy.core.plan import CacheSpec, preset_name

    found = {name: bundle.plan(name) for name in bundle.plan_names}
    counts = steps or sorted({p.num_steps for p in found.values() if p.feedback_steps})
    specs = [CacheSpec(a, b, "cache", k) for a, b in cache_ranges(bundle) for k in refresh]
    specs += [
        CacheSpec(a, b, "cache", threshold=t, max_reuse=max_reuse)
        for a, b in cache_ranges(bundle)
        for t in thresholds
    ]
    seen = {json.dumps([step.to_dict() for step in plan.steps]) for plan in found.values()}
    for count in counts:
        for spec in specs:
            try:
                plan = resolve_bundle_plan(bundle, preset_name(count, bundle.loop is not None, spec))
            except ConfigError:  # e.g. a cached range that cuts the loop in part
                continue
            steps = json.dumps([step.to_dict() for step in plan.steps])
            cached = any(
                op.kind in ("cache_reuse", "cache_adaptive") for step in plan.steps for op in step.ops
            )
            if cached and steps not in seen:  # feedback on every step leaves nothing to cache
                seen.add(steps)
                found[plan.name] = plan
    return found


def check_tuning_prompts(first: int, count: int) -> tuple[int, int]:
    """Tuning prompts first..first+count-1: at least 2, and never the reporting prompts."""
    if first < 0 or count < 2 or first + count > REPORTING_OFFSET:
        raise ConfigError(
            f"tuning prompts {first}..{first + count - 1} must be 2 or more and end before the "
            f"reporting prompts ({REPORTING_OFFSET} on)"
        )
    return first, count


def search_plans(
    bundle_path: str | Path | Bundle,
    quality: QualityFn,
    budget: QualityBudget | None = None,
    reference: str | None = None,
    prompts: tuple[int, int] = (SEARCH_OFFSET, 128),
    candidates: dict[str, StepPlan] | None = None,
    rounds: int = 3,
    progress: Callable[[str], None] | None = None,
    plot: Path | None = None,
    confirm: int = 0,
) -> dict[str, Any]:
    """Measure every candidate plan's quality (`quality`, on the tuning prompts `prompts` = (first,
    count), never the reporting ones) and time (batch 1 on the engine `--backend auto` runs here),
    then record in BUNDLE/tuning.json (schema 2; `tune` has written it) the fastest plan within
    `budget` of `reference` (the bundle's default plan), which `--plan auto` then runs. With
    `confirm` > 0, every candidate that would beat the reference is measured again on the next
    `confirm` tuning prompts and must stay within the budget there too (schema 3): a choice made on
    one sample of prompts is biased towards the luckiest candidate. Returns the `plan_search`
    section; also draws the Pareto plot (default BUNDLE/plan_search.png)."""
    from ilf_deploy.engines.backends.auto import read_tuning

    budget = budget or QualityBudget()
    first, count = check_tuning_prompts(*prompts)
    if confirm:
        check_tuning_prompts(first + count, confirm)  # the confirming prompts follow: the same rule
    bundle = as_bundle(bundle_path)
    data = read_tuning(bundle)
    if not data or data.get("bundle_digest") != bundle_digest(bundle):
        raise ConfigError(
            f"run `ilf-deploy tune {bundle.path}` first: the plan search times plans on its winner"
        )
    found = dict(candidates or plan_candidates(bundle))
    reference = reference or bundle.default_plan
    found.setdefault(reference, resolve_bundle_plan(bundle, reference))
    if progress:
        progress(f"quality of {len(found)} plans on prompts {first}..{first + count - 1}")
    measured = quality(found, reference, first, count)
    seconds, engine = _time_plans(bundle, found, first, rounds, progress)
    rows = _search_rows(found, measured, seconds, budget, reference)
    inside = sorted((r for r in rows if r["ok"]), key=lambda r: (r["seconds_per_image"], r["block_forwards"]))
    search: dict[str, Any] = {
        "reference": reference,
        "budget": budget.to_dict(),
        "prompts": {"offset": first, "n": count},
        "engine": engine,
        "rounds": max(rounds, 1),
        "candidates": rows,
    }
    if confirm:
        checked = _confirm(inside, found, quality, budget, reference, (first + count, confirm), progress)
        search["confirm"] = {"offset": first + count, "n": confirm, "checked": checked}
        inside = [r for r in inside if r["name"] == reference or checked.get(r["name"], "") is None]
    chosen = inside[0]  # the reference is always inside: a plan is always chosen
    chosen["chosen"] = True
    search["chosen"] = {
        **{k: chosen[k] for k in ("name", "seconds_per_image")},
        "plan": found[chosen["name"]].to_dict(),
    }
    report = {**data, "schema": plan_search_schema(search), "plan_search": search}
    write_report(bundle.path / TUNING_FILE, report)
    pareto_plot(rows, plot or bundle.path / PLAN_SEARCH_PLOT, f"{bundle.path.name}: {engine}, {budget.text}")
    return search


def plan_search_schema(search: dict[str, Any]) -> int:
    """The tuning.json schema a plan search is written as: 3 with a confirmation, else 2 (the oldest
    that says what the file holds)."""
    return 3 if "confirm" in search else 2


def _confirm(
    inside: list[dict[str, Any]],
    plans: dict[str, StepPlan],
    quality: QualityFn,
    budget: QualityBudget,
    reference: str,
    prompts: tuple[int, int],
    progress: Callable[[str], None] | None,
) -> dict[str, str | None]:
    """The candidates within budget that are faster than the reference, measured again (with the
    reference) on fresh tuning prompts: name -> why it misses the budget there, or None."""
    faster = []
    for row in inside:  # fastest first
        if row["name"] == reference:
            break
        faster.append(row["name"])
    if not faster:
        return {}
    first, count = prompts
    if progress:
        progress(f"confirming {len(faster)} plans on prompts {first}..{first + count - 1}")
    measured = quality({name: plans[name] for name in [*faster, reference]}, reference, first, count)
    return {name: budget.miss(measured[name], measured[reference]) for name in faster}


def _time_plans(
    bundle: Bundle,
    plans: dict[str, StepPlan],
    first: int,
    rounds: int,
    progress: Callable[[str], None] | None,
) -> tuple[dict[str, float], str]:
    """Median seconds per image (batch 1, two tuning prompts, latents only) of every plan, round-robin
    on `--backend auto`'s engine; and that engine's label."""
    from ilf_deploy.engines.backends.auto import AUTO
    from ilf_deploy.model.data import EVAL_SEED, make_batch

    generator = open_bundle_generator(bundle, AUTO)
    requests = [
        Request(prompt=s.caption(0), seed=first + i)
        for i, s in enumerate(make_batch(range(first, first + 2), EVAL_SEED).samples)
    ]
    names = list(plans)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(max(rounds, 1) + 1):  # round 0 warms every plan up (and is not kept)
        if progress:
            progress(f"timing plans, round {index} of {rounds}" if index else "timing plans: warm-up")
        for name in names[index % len(names) :] + names[: index % len(names)]:
            start = time.perf_counter()
            for request in requests:
                generator.latents_to_numpy(generator.generate_latents(plans[name], request))
            if index:
                times[name].append((time.perf_counter() - start) / len(requests))
    engine = engine_label(generator.backend, generator.variant, {})
    return {name: statistics.median(t) for name, t in times.items()}, engine


def _search_rows(
    plans: dict[str, StepPlan],
    measured: dict[str, dict[str, float]],
    seconds: dict[str, float],
    budget: QualityBudget,
    reference: str,
) -> list[dict[str, Any]]:
    """One row per plan: block forwards, seconds, quality, inside the budget or why not, Pareto."""
    rows = []
    for name, plan in plans.items():
        miss = None if name == reference else budget.miss(measured[name], measured[reference])
        rows.append(
            {
                "name": name,
                "block_forwards": plan.block_forwards,
                "block_forwards_ran": measured[name]["block_forwards"],
                "adaptive": plan.adaptive,
                "seconds_per_image": seconds[name],
                **{
                    k: measured[name][k] for k in ("acc", "delta_acc", "delta_acc_se", "frechet", "latent_l2")
                },
                "ok": miss is None,
                "miss": miss,
                "pareto": False,
                "chosen": False,
            }
        )
    for row in rows:  # not dominated: nothing at least as fast, as accurate and as realistic, and better
        row["pareto"] = not any(_dominates(other, row) for other in rows)
    return rows


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    at_least = (
        a["seconds_per_image"] <= b["seconds_per_image"]
        and a["delta_acc"] >= b["delta_acc"]
        and a["frechet"] <= b["frechet"]
    )
    better = (
        a["seconds_per_image"] < b["seconds_per_image"]
        or a["delta_acc"] > b["delta_acc"]
        or a["frechet"] < b["frechet"]
    )
    return at_least and better


def pareto_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Seconds per image (x) against Δ acc all vs the reference (y, ± its paired standard error):
    green inside the budget, red outside, a ring on the Pareto front, a blue square on the chosen
    plan, labels with the block forwards that ran; drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw

    width, height, pad = 900, 560, 70
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    xs = [r["seconds_per_image"] for r in rows]
    ys = [r["delta_acc"] + s * r["delta_acc_se"] for r in rows for s in (-1, 1)]
    x0, x1 = min(xs) * 0.95, max(xs) * 1.05
    y0, y1 = min(*ys, 0.0) - 0.01, max(*ys, 0.0) + 0.01
    px = lambda x: pad + (width - 2 * pad) * (x - x0) / max(x1 - x0, 1e-12)  # noqa: E731
    py = lambda y: height - pad - (height - 2 * pad) * (y - y0) / max(y1 - y0, 1e-12)  # noqa: E731
    draw.rectangle([pad, pad, width - pad, height - pad], outline="black")
    draw.line([pad, py(0.0), width - pad, py(0.0)], fill=(160, 160, 160))
    ascii_only = str.maketrans({"Δ": "d", "é": "e", "≤": "<=", "≥": ">="})  # Pillow's default font
    draw.text((pad, 20), title.translate(ascii_only), fill="black")
    draw.text((width // 2 - 60, height - 30), "seconds per image (batch 1)", fill="black")
    draw.text((8, pad - 20), "d acc all vs reference (paired, +- 1 se)", fill="black")
    for value, y in ((y0, height - pad), (y1, pad)):
        draw.text((8, y - 6), f"{value:+.3f}", fill="black")
    for value, x in ((x0, pad), (x1, width - pad)):
        draw.text((x - 20, height - pad + 6), f"{value:.3f}", fill="black")
    for r in rows:
        x, y, se = px(r["seconds_per_image"]), py(r["delta_acc"]), r["delta_acc_se"]
        colour = (40, 150, 60) if r["ok"] else (200, 50, 50)
        draw.line([x, py(r["delta_acc"] - se), x, py(r["delta_acc"] + se)], fill=colour)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=colour)
        if r["pareto"]:
            draw.ellipse([x - 8, y - 8, x + 8, y + 8], outline="black")
        if r["chosen"]:
            draw.rectangle([x - 11, y - 11, x + 11, y + 11], outline=(30, 60, 200), width=3)
        label = f"{r['name']} ({r['block_forwards_ran']:.0f})" + (" <- chosen" if r["chosen"] else "")
        draw.text((x + 10, y - 6), label, fill="black" if r["chosen"] or r["pareto"] else (110, 110, 110))
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
