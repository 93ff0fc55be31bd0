"""The plan model: operations, steps, plans, their JSON and their validation.

Operations (block indices are 0-based and inclusive):
- `blocks a..b`            run blocks a..b
- `ilf b..e`               inner loop with feedback: 2·(e-b+1) + 1 block forwards (eqs. 2–3)
- `cache_refresh a..b key` run a..b and store Δ = out - in under `key`
- `cache_reuse a..b key`   add the stored Δ instead of running a..b (0 block forwards)
- `cache_adaptive a..b key threshold max_reuse` (version 2): per image, reuse the stored Δ while
  the op's input (the probe) has changed by at most `threshold` (relative L1) since the key's last
  refresh and fewer than `max_reuse` reuses ran in a row; else refresh (README "Composed and
  adaptive plans")
Each op has a `time`: "t", or "t_post" for everything after the feedback (eqs. 4–5).

Version 2 also lets an `ilf` op carry a key, and lets consecutive ops of one step share a key: they
are one cached range, whose Δ is the output of the last minus the input of the first (a feedback
step refreshes the cache of the range it recomputes). A key covers the same blocks in every step.
Version 3 adds `schedules`: where the scheduler's sigmas depend on the image size (Flux's
resolution-dependent shift), one (timestep, t_post, coefficients) list per image token count the
plan was made for; the runtime picks the list of the image it generates (`StepPlan.for_image_tokens`)
and refuses a size the plan has none for.
Writers write version 1 whenever the plan needs none of this, so older readers keep reading it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.schedulers import StepCoefficients
from ilf_deploy.core.schemas import problem

PLAN_VERSION = 3  # the newest version this tool writes
PLAN_VERSIONS = (1, 2, 3)  # the versions it reads
OpKind = Literal["blocks", "ilf", "cache_refresh", "cache_reuse", "cache_adaptive"]
TimeRef = Literal["t", "t_post"]
STORES = ("cache_refresh", "ilf")  # ops that store a Δ when they carry a key (ilf: version 2)

# Bounds every reader holds a plan to at load (the C++ runtime's Plan::parse too), so that no plan can
# overflow the loop's arithmetic: the presets' cap on steps (a scheduler's num_train_timesteps,
# schedulers._common_checks), coefficients far above any scheduler's (the largest, 1/sqrt(ᾱ) at
# t = 999, is 157), timesteps of any training schedule, and DPM-Solver++'s history (order <= 3).
MAX_STEPS = 1000
MAX_COEFFICIENT = 1e4
MAX_TIMESTEP = 1e4
MAX_HISTORY = 2


# -- block ranges ------------------------------------------------------------------------------


def check_block_range(start: int, end: int, num_blocks: int, what: str = "loop") -> None:
    """The one check of an inclusive block range `start:end` against a model's depth.

    `what` names the range in the message: an option ("--cache"), a field ("cache range") or a plan's
    op ("plan 'x' step 3 cache_reuse"), e.g. "--cache 3:99: block 99 is out of range (the model has
    blocks 0..7)" or "cache range 5:3 is empty: it starts after it ends (B must be <= E)".
    """
    blocks = f"blocks 0..{num_blocks - 1}" if num_blocks > 0 else "no blocks"
    for block in (start, end):
        if not 0 <= block < num_blocks:
            raise ConfigError(f"{what} {start}:{end}: block {block} is out of range (the model has {blocks})")
    if start > end:
        raise ConfigError(f"{what} {start}:{end} is empty: it starts after it ends (B must be <= E)")


validate_loop = check_block_range  # the older name, used for ILF loops


def parse_range(text: str, what: str = "loop", num_blocks: int | None = None) -> tuple[int, int]:
    """'8:19' -> (8, 19), inclusive and 0-based; checked against `num_blocks` when given."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"{what} {text!r} is not of the form B:E (e.g. 8:19)") from None
    if num_blocks is not None:
        check_block_range(start, end, num_blocks, what)
    return start, end


# -- the model ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Op:
    kind: OpKind
    start: int
    end: int
    time: TimeRef = "t"
    key: str | None = None
    threshold: float | None = None  # cache_adaptive: the most relative L1 change of the probe reused
    max_reuse: int | None = None  # cache_adaptive: the most reuses in a row

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    @property
    def block_forwards(self) -> int:
        """The block forwards the op runs (cache_adaptive: at most, when it refreshes)."""
        return {
            "blocks": self.size,
            "cache_refresh": self.size,
            "cache_reuse": 0,
            "cache_adaptive": self.size,
            "ilf": 2 * self.size + 1,
        }[self.kind]

    @property
    def stores(self) -> bool:
        """Does the op store a Δ under its key (alone, or as part of a keyed group)?"""
        return self.key is not None and self.kind in STORES

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "op": self.kind,
            "start": self.start,
            "end": self.end,
            "time": self.time,
        }
        if self.key is not None:
            out["key"] = self.key
        if self.kind == "cache_adaptive":
            out.update(threshold=self.threshold, max_reuse=self.max_reuse)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], version: int = PLAN_VERSION) -> Op:
        key = d.get("key")
        if version == 1 and d["op"] == "ilf":
            key = None  # version 1 never stored a Δ from the inner loop: its key meant nothing
        threshold = float(d["threshold"]) if d.get("threshold") is not None else None
        max_reuse = int(d["max_reuse"]) if d.get("max_reuse") is not None else None
        return cls(d["op"], int(d["start"]), int(d["end"]), d.get("time", "t"), key, threshold, max_reuse)

    def describe(self) -> str:
        name = {
            "blocks": "",
            "ilf": "ILF ",
            "cache_refresh": "refresh ",
            "cache_reuse": "reuse ",
            "cache_adaptive": "adaptive ",
        }[self.kind]
        if self.kind == "ilf" and self.stores:
            name = "ILF+refresh "  # the inner loop's output refreshes its key's Δ
        post = "@t_post" if self.time == "t_post" else ""
        rule = f" (≤{self.threshold:g}, ≤{self.max_reuse}×)" if self.kind == "cache_adaptive" else ""
        return f"{name}{self.start}-{self.end}{post}{rule}"


def key_groups(ops: tuple[Op, ...]) -> list[tuple[str, list[Op]]]:
    """The step's cached ranges: runs of consecutive ops with one key (a keyed ilf counts)."""
    groups: list[tuple[str, list[Op]]] = []
    for op in ops:
        if op.key is None or op.kind == "blocks" or (op.kind == "ilf" and not op.stores):
            continue
        if groups and groups[-1][0] == op.key and groups[-1][1][-1].end + 1 == op.start:
            groups[-1][1].append(op)
        else:
            groups.append((op.key, [op]))
    return groups


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
    def from_dict(cls, d: dict[str, Any], version: int = PLAN_VERSION) -> Step:
        return cls(
            index=int(d["index"]),
            timestep=float(d["timestep"]),
            t_post=None if d.get("t_post") is None else float(d["t_post"]),
            ops=tuple(Op.from_dict(op, version) for op in d["ops"]),
            final_time=d.get("final_time", "t"),
            coefficients=StepCoefficients.from_dict(d["coefficients"]),
        )


@dataclass(frozen=True)
class StepTiming:
    """One step's timing at one image size (a version 3 plan's `schedules` entry)."""

    timestep: float
    t_post: float | None
    coefficients: StepCoefficients

    def to_dict(self) -> dict[str, Any]:
        return {"timestep": self.timestep, "t_post": self.t_post, "coefficients": self.coefficients.to_dict()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepTiming:
        t_post = None if d.get("t_post") is None else float(d["t_post"])
        return cls(float(d["timestep"]), t_post, StepCoefficients.from_dict(d["coefficients"]))


@dataclass(frozen=True)
class StepPlan:
    name: str
    num_blocks: int
    scheduler: str
    steps: tuple[Step, ...]
    loop: tuple[int, int] | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    # image token count -> each step's timing at that size (version 3); {} where the schedule
    # does not depend on the size
    schedules: dict[int, tuple[StepTiming, ...]] = field(default_factory=dict)

    def for_image_tokens(self, tokens: int) -> StepPlan:
        """The plan with the timing of an image of `tokens` tokens (itself where none depends on it)."""
        if not self.schedules:
            return self
        timing = self.schedules.get(tokens)
        if timing is None:
            made = ", ".join(str(n) for n in sorted(self.schedules))
            raise ConfigError(
                f"plan {self.name!r} was made for images of {made} tokens, not {tokens} (its schedule "
                "depends on the image size): make the plan for this size, or rebuild with --resolutions"
            )
        steps = tuple(
            replace(step, timestep=t.timestep, t_post=t.t_post, coefficients=t.coefficients)
            for step, t in zip(self.steps, timing, strict=True)
        )
        return replace(self, steps=steps, schedules={})

    def first_steps(self, count: int, name: str) -> StepPlan:
        """The plan's first `count` steps (at every image size it has a schedule for), as `name`."""
        schedules = {tokens: timing[:count] for tokens, timing in self.schedules.items()}
        return replace(self, name=name, steps=self.steps[:count], schedules=schedules)

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def block_forwards(self) -> int:
        """Per image; an adaptive plan's most (every adaptive op refreshing): the generator reports
        what ran (`Generator.last_block_forwards`)."""
        return sum(step.block_forwards for step in self.steps)

    @property
    def adaptive(self) -> bool:
        return any(op.kind == "cache_adaptive" for step in self.steps for op in step.ops)

    @property
    def version(self) -> int:
        """The oldest format version that says what this plan does (README: compatibility rule)."""
        if self.schedules:
            return 3
        for step in self.steps:
            if any(op.kind == "cache_adaptive" or (op.stores and op.kind == "ilf") for op in step.ops):
                return 2
            if any(len(ops) > 1 for _, ops in key_groups(step.ops)):
                return 2
        return 1

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
        if self.num_steps > MAX_STEPS:
            raise ConfigError(
                f"plan {self.name!r} has {self.num_steps} steps; a plan has at most {MAX_STEPS}"
            )
        for position, step in enumerate(self.steps):
            timings = [
                step,
                *(timing[position] for timing in self.schedules.values() if position < len(timing)),
            ]
            for timing in timings:
                check_timing_bounds(timing, position, f"plan {self.name!r} step {step.index}")
        if self.loop is not None:
            if len(self.loop) != 2:
                raise ConfigError(f"plan {self.name!r}: loop must be [B, E], got {list(self.loop)}")
            check_block_range(*self.loop, self.num_blocks, f"plan {self.name!r} loop")
        for step in self.steps:
            self._validate_step(step)
        self._validate_keys()
        for tokens, timing in self.schedules.items():
            if len(timing) != self.num_steps:
                raise ConfigError(
                    f"plan {self.name!r}: the schedule for {tokens} image tokens has {len(timing)} steps, "
                    f"the plan {self.num_steps}"
                )
            for step, t in zip(self.steps, timing):
                if (step.t_post is None) != (t.t_post is None):
                    raise ConfigError(
                        f"plan {self.name!r} step {step.index}: t_post at one size, not another"
                    )

    def _validate_keys(self) -> None:
        """A key covers the same blocks in every step, at most once a step; a reuse follows a
        refresh of its key; a reused or adaptive range is one op; adaptive ops have their rule."""
        ranges: dict[str, tuple[int, int]] = {}
        stored: set[str] = set()
        for step in self.steps:
            where = f"plan {self.name!r} step {step.index}"
            groups = key_groups(step.ops)
            keys = [key for key, _ in groups]
            if len(set(keys)) != len(keys):
                raise ConfigError(f"{where}: a cache key covers two ranges in one step")
            for key, ops in groups:
                span = (ops[0].start, ops[-1].end)
                if ranges.setdefault(key, span) != span:
                    raise ConfigError(
                        f"{where}: cache key {key!r} covers blocks {span[0]}:{span[1]} here and "
                        f"{ranges[key][0]}:{ranges[key][1]} elsewhere"
                    )
                self._validate_group(where, key, ops, stored)

    @staticmethod
    def _validate_group(where: str, key: str, ops: list[Op], stored: set[str]) -> None:
        kinds = {op.kind for op in ops}
        if len(ops) > 1 and not kinds <= set(STORES):
            raise ConfigError(f"{where}: cache key {key!r} is reused over more than one op")
        op = ops[0]
        if op.kind == "cache_reuse" and key not in stored:
            raise ConfigError(f"{where}: cache_reuse of key {key!r} before any refresh of it")
        if op.kind == "cache_adaptive":
            threshold, most = op.threshold, op.max_reuse
            if threshold is None or not 0 <= threshold < float("inf"):
                raise ConfigError(f"{where}: cache_adaptive threshold must be a number >= 0, got {threshold}")
            if most is None or most < 1:
                raise ConfigError(f"{where}: cache_adaptive max_reuse must be >= 1, got {most}")
        if op.kind != "cache_reuse":
            stored.add(key)

    def _validate_step(self, step: Step) -> None:
        where = f"plan {self.name!r} step {step.index}"
        position = 0
        for op in step.ops:
            check_block_range(op.start, op.end, self.num_blocks, f"{where} {op.kind}")
            if op.start != position:
                raise ConfigError(f"{where}: ops must cover blocks in order")
            if op.kind == "ilf" and (self.loop is None or (op.start, op.end) != tuple(self.loop)):
                raise ConfigError(f"{where}: ILF op outside the plan's loop")
            if op.time == "t_post" and step.t_post is None:
                raise ConfigError(f"{where}: t_post op but no t_post")
            position = op.end + 1
        if position != self.num_blocks:
            raise ConfigError(f"{where}: ops cover {position} of {self.num_blocks} blocks")

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "name": self.name,
            "num_blocks": self.num_blocks,
            "num_steps": self.num_steps,
            "scheduler": self.scheduler,
            "loop": list(self.loop) if self.loop else None,
            "block_forwards": self.block_forwards,
            "settings": self.settings,
            "steps": [step.to_dict() for step in self.steps],
            **(
                {"schedules": {str(n): [t.to_dict() for t in ts] for n, ts in sorted(self.schedules.items())}}
                if self.schedules
                else {}
            ),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> StepPlan:
        version = d.get("version") if isinstance(d, dict) else None
        if version not in PLAN_VERSIONS or isinstance(version, bool):
            readable = ", ".join(str(v) for v in PLAN_VERSIONS)
            raise ConfigError(
                f"unsupported plan version {version!r} (this tool reads {readable}); "
                "rebuild the plan or bundle with this version of ilf-deploy"
            )
        found = problem("plan", d)  # the published schema (ilf-deploy schema plan)
        if found:
            raise ConfigError(f"malformed plan {d.get('name')!r}: {found}")
        try:
            plan = cls(
                name=str(d["name"]),
                num_blocks=int(d["num_blocks"]),
                scheduler=str(d["scheduler"]),
                steps=tuple(Step.from_dict(s, version) for s in d["steps"]),
                loop=tuple(d["loop"]) if d.get("loop") else None,  # type: ignore[arg-type]
                settings=dict(d.get("settings", {})),
                schedules={
                    int(n): tuple(StepTiming.from_dict(t) for t in ts)
                    for n, ts in (d.get("schedules") or {}).items()
                },
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"malformed plan: {exc}") from None
        plan.validate()
        if version == 1 and plan.version != 1:  # keys shared by consecutive ops: version 2 only
            raise ConfigError(
                f"malformed plan {plan.name!r}: consecutive ops share a cache key, which version 1 "
                "plans cannot say (write version 2)"
            )
        return plan

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def save(self, path: Path) -> None:
        path.write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: Path) -> StepPlan:
        try:
            data = json.loads(path.read_text(), parse_constant=_not_json)
        except (OSError, ValueError) as exc:  # ValueError: JSONDecodeError, UnicodeDecodeError, NaN
            raise ConfigError(f"cannot read plan {path}: {exc}") from None
        return cls.from_dict(data)


def check_timing_bounds(timing: Step | StepTiming, position: int, where: str) -> None:
    """A step's timesteps and coefficients: finite, within MAX_TIMESTEP / MAX_COEFFICIENT, and a
    history no longer than MAX_HISTORY nor than the predictions made before it (`position`)."""
    k = timing.coefficients
    times = {"timestep": timing.timestep, "t_post": timing.t_post, "prev_timestep": k.prev_timestep}
    for name, value in times.items():
        if value is not None and not abs(value) <= MAX_TIMESTEP:  # `not <=`: NaN fails too
            raise ConfigError(f"{where}: {name} {value!r} is outside -{MAX_TIMESTEP:g}..{MAX_TIMESTEP:g}")
    values = {"x": k.x, "eps": k.eps, "x0_x": k.x0_x, "x0_eps": k.x0_eps}
    values.update({f"history/{i}": h for i, h in enumerate(k.history)})
    for name, value in values.items():
        if not abs(value) <= MAX_COEFFICIENT:
            raise ConfigError(
                f"{where}: coefficient {name} {value!r} is outside -{MAX_COEFFICIENT:g}..{MAX_COEFFICIENT:g}"
            )
    if len(k.history) > min(MAX_HISTORY, position):
        raise ConfigError(
            f"{where}: {len(k.history)} history coefficients; a step has at most {MAX_HISTORY} and no "
            f"more than the steps before it ({position})"
        )


def _not_json(name: str) -> float:
    """json.loads takes NaN and Infinity, which strict JSON has not: a plan's coefficients must be
    numbers."""
    raise ValueError(f"{name} is not a JSON number")


def predicted_speedup(plan: StepPlan, baseline_steps: int = 20) -> float:
    return plan.num_blocks * baseline_steps / plan.block_forwards
