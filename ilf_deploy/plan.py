"""Step plans: everything a runtime needs to know per denoising step, decided ahead of time.

A plan lists, per step, the timestep, the post-feedback timestep `t_post`, the ordered segment
operations (block ranges, the ILF inner loop, Δ-cache refresh/reuse) and the scheduler's linear
coefficients, so the runtime loop is only engine calls and linear algebra. Plans are JSON.

Operations (block indices are 0-based and inclusive):
- `blocks a..b`            run blocks a..b
- `ilf b..e`               inner loop with feedback: 2·(e-b+1) + 1 block forwards (eqs. 2–3)
- `cache_refresh a..b key` run a..b and store Δ = out - in under `key`
- `cache_reuse a..b key`   add the stored Δ instead of running a..b (0 block forwards)
Each op has a `time`: "t", or "t_post" for everything after the feedback (eqs. 4–5).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .errors import ConfigError
from .schedulers import (
    PIXART_SCHEDULER_CONFIG,
    StepCoefficients,
    scheduler_coefficients,
)

PLAN_VERSION = 1
OpKind = Literal["blocks", "ilf", "cache_refresh", "cache_reuse"]
TimeRef = Literal["t", "t_post"]
T_POST_MODES = ("none", "uniform", "rescale", "anneal")


@dataclass(frozen=True)
class Op:
    kind: OpKind
    start: int
    end: int
    time: TimeRef = "t"
    key: str | None = None

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    @property
    def block_forwards(self) -> int:
        return {
            "blocks": self.size,
            "cache_refresh": self.size,
            "cache_reuse": 0,
            "ilf": 2 * self.size + 1,
        }[self.kind]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "op": self.kind,
            "start": self.start,
            "end": self.end,
            "time": self.time,
        }
        if self.key is not None:
            out["key"] = self.key
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Op:
        return cls(d["op"], int(d["start"]), int(d["end"]), d.get("time", "t"), d.get("key"))

    def describe(self) -> str:
        name = {
            "blocks": "",
            "ilf": "ILF ",
            "cache_refresh": "refresh ",
            "cache_reuse": "reuse ",
        }[self.kind]
        post = "@t_post" if self.time == "t_post" else ""
        return f"{name}{self.start}-{self.end}{post}"


@dataclass(frozen=True)
class Step:
    index: int
    timestep: float
    t_post: float | None
    ops: tuple[Op, ...]
    final_time: TimeRef
    coefficients: StepCoefficients

    @property
    def feedback(self) -> bool:
        return any(op.kind == "ilf" for op in self.ops)

    @property
    def block_forwards(self) -> int:
        return sum(op.block_forwards for op in self.ops)

    def to_dict(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "timestep": self.timestep,
            "t_post": self.t_post,
            "feedback": self.feedback,
            "block_forwards": self.block_forwards,
            "ops": [op.to_dict() for op in self.ops],
            "final_time": self.final_time,
            "coefficients": self.coefficients.to_dict(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Step:
        return cls(
            index=int(d["index"]),
            timestep=float(d["timestep"]),
            t_post=None if d.get("t_post") is None else float(d["t_post"]),
            ops=tuple(Op.from_dict(op) for op in d["ops"]),
            final_time=d.get("final_time", "t"),
            coefficients=StepCoefficients.from_dict(d["coefficients"]),
        )


@dataclass(frozen=True)
class StepPlan:
    name: str
    num_blocks: int
    scheduler: str
    steps: tuple[Step, ...]
    loop: tuple[int, int] | None = None
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def block_forwards(self) -> int:
        return sum(step.block_forwards for step in self.steps)

    @property
    def feedback_steps(self) -> list[int]:
        return [step.index for step in self.steps if step.feedback]

    @property
    def cut_points(self) -> list[int]:
        """Block indices where some op starts or ends: the segment boundaries an exporter needs."""
        points = {0, self.num_blocks}
        for step in self.steps:
            for op in step.ops:
                points.update((op.start, op.end + 1))
        return sorted(points)

    def speedup_over(self, baseline_block_forwards: int) -> float:
        return baseline_block_forwards / self.block_forwards

    def validate(self) -> None:
        for step in self.steps:
            position = 0
            for op in step.ops:
                if op.start != position or op.end < op.start:
                    raise ConfigError(f"plan {self.name!r} step {step.index}: ops must cover blocks in order")
                if op.kind == "ilf" and (self.loop is None or (op.start, op.end) != self.loop):
                    raise ConfigError(f"plan {self.name!r} step {step.index}: ILF op outside the plan's loop")
                if op.time == "t_post" and step.t_post is None:
                    raise ConfigError(f"plan {self.name!r} step {step.index}: t_post op but no t_post")
                position = op.end + 1
            if position != self.num_blocks:
                raise ConfigError(
                    f"plan {self.name!r} step {step.index}: ops cover {position} of {self.num_blocks} blocks"
                )

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "name": self.name,
            "num_blocks": self.num_blocks,
            "num_steps": self.num_steps,
            "scheduler": self.scheduler,
            "loop": list(self.loop) if self.loop else None,
            "block_forwards": self.block_forwards,
            "settings": self.settings,
            "steps": [step.to_dict() for step in self.steps],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepPlan:
        if d.get("version") != PLAN_VERSION:
            raise ConfigError(
                f"unsupported plan version {d.get('version')!r} (this tool reads {PLAN_VERSION})"
            )
        try:
            plan = cls(
                name=str(d["name"]),
                num_blocks=int(d["num_blocks"]),
                scheduler=str(d["scheduler"]),
                steps=tuple(Step.from_dict(s) for s in d["steps"]),
                loop=tuple(d["loop"]) if d.get("loop") else None,  # type: ignore[arg-type]
                settings=dict(d.get("settings", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed plan: {exc}") from None
        plan.validate()
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> StepPlan:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read plan {path}: {exc}") from None
        return cls.from_dict(data)


# -- building blocks ---------------------------------------------------------------------------


def validate_loop(start: int, end: int, num_blocks: int) -> None:
    if not 0 <= start < num_blocks or not 0 <= end < num_blocks:
        raise ConfigError(
            f"loop {start}:{end} is out of range for a model with {num_blocks} blocks (0..{num_blocks - 1})"
        )
    if start > end:
        raise ConfigError(f"loop {start}:{end} starts after it ends (b must be <= e)")


def parse_range(text: str, what: str = "loop") -> tuple[int, int]:
    """'8:19' -> (8, 19), inclusive and 0-based."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not of the form B:E (e.g. 8:19)") from None
    return start, end


def default_loop(num_blocks: int) -> tuple[int, int]:
    """The paper's loop 8–19 of 28 blocks, scaled to the model's depth (and kept inside it)."""
    start = min(round(8 * num_blocks / 28), num_blocks - 1)
    return start, min(max(round(19 * num_blocks / 28), start), num_blocks - 1)


def _schedule(scheduler_config: dict[str, Any], num_steps: int) -> list[StepCoefficients]:
    if num_steps < 1:
        raise ConfigError(f"steps must be >= 1, got {num_steps}")
    return scheduler_coefficients(scheduler_config, num_steps)


def _plan(name, num_blocks, scheduler_config, coefficients, step_ops, loop=None, settings=None) -> StepPlan:
    """step_ops: per step (t_post, ops); everything after an ILF op runs at t_post."""
    steps = []
    for index, (coef, (t_post, ops)) in enumerate(zip(coefficients, step_ops)):
        steps.append(
            Step(
                index,
                float(coef.timestep),
                t_post,
                tuple(ops),
                "t_post" if t_post is not None else "t",
                coef,
            )
        )
    plan = StepPlan(
        name,
        num_blocks,
        scheduler_config["_class_name"],
        tuple(steps),
        loop,
        settings or {},
    )
    plan.validate()
    return plan


def _split(num_blocks: int, start: int, end: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    before = [(0, start - 1)] if start > 0 else []
    after = [(end + 1, num_blocks - 1)] if end < num_blocks - 1 else []
    return before, after


def parse_step_set(spec: str, num_steps: int, what: str = "feedback") -> list[int]:
    """'first2,last2' | 'all' | 'none' | '0,1,8,9' (mixable) -> sorted step indices."""
    spec = spec.strip().lower()
    if spec in ("", "none"):
        return []
    if spec == "all":
        return list(range(num_steps))
    chosen: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if m := re.fullmatch(r"(first|last)(\d+)", part):
            k = int(m.group(2))
            if k > num_steps:
                raise ConfigError(f"{what} {part!r} asks for {k} steps but the plan has {num_steps}")
            chosen += range(k) if m.group(1) == "first" else range(num_steps - k, num_steps)
        elif part.isdigit():
            chosen.append(int(part))
        else:
            raise ConfigError(f"{what} {spec!r}: expected first<k>, last<k>, all, none or step indices")
    if len(chosen) > num_steps:
        raise ConfigError(f"{what} {spec!r} names {len(chosen)} steps but the plan has only {num_steps}")
    bad = [i for i in chosen if i >= num_steps]
    if bad:
        raise ConfigError(f"{what} step {bad[0]} is out of range for {num_steps} steps (0..{num_steps - 1})")
    return sorted(set(chosen))


def post_timestep(
    mode: str,
    t: float,
    t_next: float,
    num_blocks: int,
    loop_size: int,
    first: bool,
    num_train: int = 1000,
) -> float:
    """The post-feedback timestep (ILF eqs. 4–5), clamped to [0, t]."""
    gap = t - t_next
    if mode == "none":
        value = t
    elif mode == "uniform":
        value = t - gap / 2
    elif mode == "rescale" or (mode == "anneal" and first):  # eq. 4; anneal's first step uses it too
        value = t - gap * (num_blocks / loop_size)
    elif mode == "anneal":  # eq. 5
        value = t - max(gap * (num_blocks / loop_size) * (t / num_train), 10.0)
    else:
        raise ConfigError(f"unknown t_post mode {mode!r}; choose from {', '.join(T_POST_MODES)}")
    return float(min(max(value, 0.0), t))


# -- plan builders -----------------------------------------------------------------------------


def baseline_plan(
    num_steps: int,
    num_blocks: int = 28,
    scheduler_config: dict[str, Any] | None = None,
    name: str | None = None,
) -> StepPlan:
    config = scheduler_config or PIXART_SCHEDULER_CONFIG
    coefs = _schedule(config, num_steps)
    ops = [(None, [Op("blocks", 0, num_blocks - 1)]) for _ in coefs]
    return _plan(
        name or f"base-{num_steps}",
        num_blocks,
        config,
        coefs,
        ops,
        settings={"kind": "baseline"},
    )


def ilf_plan(
    num_steps: int,
    num_blocks: int = 28,
    loop: tuple[int, int] | None = None,
    feedback: str | Iterable[int] = "first2,last2",
    t_post: str = "rescale",
    scheduler_config: dict[str, Any] | None = None,
    name: str | None = None,
) -> StepPlan:
    config = scheduler_config or PIXART_SCHEDULER_CONFIG
    loop = loop or default_loop(num_blocks)
    validate_loop(*loop, num_blocks)
    if t_post not in T_POST_MODES:
        raise ConfigError(f"unknown t_post mode {t_post!r}; choose from {', '.join(T_POST_MODES)}")
    coefs = _schedule(config, num_steps)
    fb_steps = parse_step_set(feedback, num_steps) if isinstance(feedback, str) else sorted(set(feedback))
    if any(not 0 <= i < num_steps for i in fb_steps):
        raise ConfigError(f"feedback steps {fb_steps} out of range for {num_steps} steps")
    start, end = loop
    before, after = _split(num_blocks, start, end)
    num_train = int(config.get("num_train_timesteps", 1000))
    step_ops = []
    for i, coef in enumerate(coefs):
        if i in fb_steps:
            tp = post_timestep(
                t_post,
                coef.timestep,
                coef.prev_timestep,
                num_blocks,
                end - start + 1,
                i == 0,
                num_train,
            )
            ops = [Op("blocks", a, b) for a, b in before] + [Op("ilf", start, end)]
            ops += [Op("blocks", a, b, "t_post") for a, b in after]
            step_ops.append((tp, ops))
        else:
            step_ops.append((None, [Op("blocks", 0, num_blocks - 1)]))
    settings = {"kind": "ilf", "feedback": fb_steps, "t_post": t_post}
    return _plan(name or f"ilf-{num_steps}", num_blocks, config, coefs, step_ops, loop, settings)


def default_cache_range(num_blocks: int) -> tuple[int, int]:
    """The ILF paper's caching baseline: the inner 18 of 28 blocks, scaled to the model's depth."""
    size = max(1, round(18 * num_blocks / 28))
    start = (num_blocks - size) // 2
    return start, start + size - 1


def cache_plan(
    num_steps: int,
    num_blocks: int = 28,
    cache_range: tuple[int, int] | None = None,
    refresh_every: int = 3,
    scheduler_config: dict[str, Any] | None = None,
    name: str | None = None,
) -> StepPlan:
    """Δ-cache a block range: refresh on every n-th step (0, n, 2n, ...), reuse the Δ otherwise."""
    config = scheduler_config or PIXART_SCHEDULER_CONFIG
    start, end = cache_range or default_cache_range(num_blocks)
    validate_loop(start, end, num_blocks)
    if refresh_every < 1:
        raise ConfigError(f"refresh-every must be >= 1, got {refresh_every}")
    coefs = _schedule(config, num_steps)
    before, after = _split(num_blocks, start, end)
    step_ops = []
    for i in range(num_steps):
        kind = "cache_refresh" if i % refresh_every == 0 else "cache_reuse"
        ops = [Op("blocks", a, b) for a, b in before] + [Op(kind, start, end, key="cache")]  # type: ignore[arg-type]
        step_ops.append((None, ops + [Op("blocks", a, b) for a, b in after]))
    settings = {"kind": "cache", "range": [start, end], "refresh_every": refresh_every}
    return _plan(
        name or f"cache-{num_steps}",
        num_blocks,
        config,
        coefs,
        step_ops,
        settings=settings,
    )


def delta_dit_plan(
    num_steps: int,
    num_blocks: int = 28,
    num_cached: int = 21,
    boundary: int | None = None,
    refresh_every: int = 2,
    scheduler_config: dict[str, Any] | None = None,
    name: str | None = None,
) -> StepPlan:
    """Δ-DiT: Δ-cache the deep (rear) blocks before the step boundary, the shallow (front) ones after.

    Early steps draw outlines (kept by the shallow blocks), late steps add detail (kept by the deep
    ones). The Δ is refreshed every `refresh_every` steps within a stage and whenever the stage starts.
    """
    config = scheduler_config or PIXART_SCHEDULER_CONFIG
    if not 1 <= num_cached <= num_blocks:
        raise ConfigError(f"num_cached must be in 1..{num_blocks}, got {num_cached}")
    boundary = num_steps // 2 if boundary is None else boundary
    if not 0 <= boundary <= num_steps:
        raise ConfigError(f"boundary {boundary} is out of range for {num_steps} steps")
    if refresh_every < 1:
        raise ConfigError(f"refresh-every must be >= 1, got {refresh_every}")
    coefs = _schedule(config, num_steps)
    deep, shallow = (num_blocks - num_cached, num_blocks - 1), (0, num_cached - 1)
    step_ops = []
    for i in range(num_steps):
        early = i < boundary
        start, end = deep if early else shallow
        stage_step = i if early else i - boundary
        kind = "cache_refresh" if stage_step % refresh_every == 0 else "cache_reuse"
        before, after = _split(num_blocks, start, end)
        key = "deep" if early else "shallow"
        ops = [Op("blocks", a, b) for a, b in before] + [Op(kind, start, end, key=key)]  # type: ignore[arg-type]
        step_ops.append((None, ops + [Op("blocks", a, b) for a, b in after]))
    settings = {
        "kind": "delta-dit",
        "num_cached": num_cached,
        "boundary": boundary,
        "refresh_every": refresh_every,
    }
    return _plan(
        name or f"delta-dit-{num_steps}",
        num_blocks,
        config,
        coefs,
        step_ops,
        settings=settings,
    )


def block_caching_schedule(changes: np.ndarray, delta: float) -> np.ndarray:
    """Block Caching's automatic schedule (003, eq. 7) -> bool[steps, blocks], True = recompute.

    `changes[s, i]` is block i's relative L1 change between steps s-1 and s (row 0 unused). A block
    keeps its cached output while the change accumulated since the refresh stays <= delta.
    """
    steps, blocks = changes.shape
    refresh = np.zeros((steps, blocks), dtype=bool)
    refresh[0] = True
    accumulated = np.zeros(blocks)
    for s in range(1, steps):
        accumulated += changes[s]
        refresh[s] = accumulated > delta
        accumulated[refresh[s]] = 0.0
    return refresh


def block_caching_plan(
    changes: np.ndarray,
    delta: float,
    scheduler_config: dict[str, Any] | None = None,
    name: str | None = None,
) -> StepPlan:
    """A plan from a Block-Caching schedule: neighbouring blocks that refresh on the same steps share
    one Δ-cache range (their Δs add up exactly), every other block caches on its own."""
    config = scheduler_config or PIXART_SCHEDULER_CONFIG
    num_steps, num_blocks = changes.shape
    refresh = block_caching_schedule(np.asarray(changes, dtype=np.float64), delta)
    groups: list[tuple[int, int]] = []
    for i in range(num_blocks):
        if groups and np.array_equal(refresh[:, groups[-1][0]], refresh[:, i]):
            groups[-1] = (groups[-1][0], i)
        else:
            groups.append((i, i))
    coefs = _schedule(config, num_steps)
    step_ops = []
    for s in range(num_steps):
        ops = []
        for start, end in groups:
            always = bool(refresh[:, start].all())
            if always:
                ops.append(Op("blocks", start, end))
            else:
                kind = "cache_refresh" if refresh[s, start] else "cache_reuse"
                ops.append(Op(kind, start, end, key=f"b{start}-{end}"))  # type: ignore[arg-type]
        step_ops.append((None, _merge_blocks(ops)))
    settings = {
        "kind": "block-caching",
        "delta": delta,
        "recompute": refresh.astype(int).tolist(),
    }
    return _plan(
        name or f"blockcache-{num_steps}",
        num_blocks,
        config,
        coefs,
        step_ops,
        settings=settings,
    )


def _merge_blocks(ops: Sequence[Op]) -> list[Op]:
    merged: list[Op] = []
    for op in ops:
        prev = merged[-1] if merged else None
        if prev and prev.kind == op.kind == "blocks" and prev.time == op.time:
            merged[-1] = Op("blocks", prev.start, op.end, op.time)
        else:
            merged.append(op)
    return merged


# -- named presets -----------------------------------------------------------------------------

PRESET_HELP = (
    "a plan JSON file, or a preset: base-N (plain N steps), ilf-N (the trained feedback's loop, else "
    "8-19 scaled to the model; feedback on the first 2 and last 2 steps; the feedback's t_post rule, "
    "else rescaled), cache-N (inner blocks Δ-cached, "
    "refreshed every 3rd step)"
)


def resolve_plan(
    spec: str,
    num_blocks: int = 28,
    scheduler_config: dict[str, Any] | None = None,
    loop: tuple[int, int] | None = None,
    t_post: str = "rescale",
) -> StepPlan:
    """A plan from a JSON file path or a preset name (see PRESET_HELP).

    `loop` and `t_post` are a trained feedback's own (ilf-N presets follow them)."""
    path = Path(spec)
    if spec.endswith(".json") or path.is_file():
        if not path.is_file():
            raise ConfigError(f"plan file {spec} does not exist")
        plan = StepPlan.load(path)
        if plan.num_blocks != num_blocks:
            raise ConfigError(f"plan {spec} is for {plan.num_blocks} blocks; this model has {num_blocks}")
        return plan
    m = re.fullmatch(r"(base|ilf|cache)-(\d+)", spec.strip().lower())
    if not m:
        raise ConfigError(f"unknown plan {spec!r}: expected {PRESET_HELP}")
    kind, steps = m.group(1), int(m.group(2))
    if kind == "base":
        return baseline_plan(steps, num_blocks, scheduler_config)
    if kind == "ilf":
        feedback = "first2,last2" if steps >= 4 else "all"
        return ilf_plan(steps, num_blocks, loop, feedback, t_post, scheduler_config)
    return cache_plan(steps, num_blocks, None, 3, scheduler_config)


def predicted_speedup(plan: StepPlan, baseline_steps: int = 20) -> float:
    return plan.num_blocks * baseline_steps / plan.block_forwards
