"""Plan builders: plain steps, ILF, Δ-cache, Δ-DiT, Block Caching, their compositions, the presets.

Each builder decides, per step, the post-feedback timestep and the ops; `_build` does the rest
(the scheduler's coefficients, the plan's name, validation). `compose_plan` stacks the caching
methods (`CacheSpec`s, fixed or adaptive) with ILF feedback steps: the feedback steps as ILF
defines them, each of them refreshing the cache of every range it recomputes; the Δ-cache on the
other steps. `cache_plan` and `delta_dit_plan` are compositions without feedback.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ilf_deploy.core.errors import ConfigError, check_at_least
from ilf_deploy.core.plan.model import Op, OpKind, Step, StepPlan, StepTiming, TimeRef, check_block_range
from ilf_deploy.core.schedulers import (
    PIXART_SCHEDULER_CONFIG,
    StepCoefficients,
    image_tokens_of,
    scheduler_coefficients,
)

T_POST_MODES = ("none", "uniform", "rescale", "anneal")

# (step index, its coefficients) -> (t_post or None, the step's ops)
StepOps = Callable[[int, StepCoefficients], tuple[float | None, list[Op]]]
Feedback = str | Iterable[int]  # "first2,last2"-style (parse_step_set) or step indices


# -- building blocks ---------------------------------------------------------------------------


def default_loop(num_blocks: int) -> tuple[int, int]:
    """The paper's loop 8–19 of 28 blocks, scaled to the model's depth (and kept inside it)."""
    start = min(round(8 * num_blocks / 28), num_blocks - 1)
    return start, min(max(round(19 * num_blocks / 28), start), num_blocks - 1)


def default_cache_range(num_blocks: int) -> tuple[int, int]:
    """The ILF paper's caching baseline: the inner 18 of 28 blocks, scaled to the model's depth."""
    size = max(1, round(18 * num_blocks / 28))
    start = (num_blocks - size) // 2
    return start, start + size - 1


def _check_steps(num_steps: int) -> None:
    check_at_least("steps", num_steps)


def _check_refresh_every(refresh_every: int) -> None:
    check_at_least("refresh-every", refresh_every)


def _check_t_post(t_post: str) -> None:
    if t_post not in T_POST_MODES:
        raise ConfigError(f"unknown t_post mode {t_post!r}; choose from {', '.join(T_POST_MODES)}")


def _feedback_steps(feedback: Feedback, num_steps: int) -> list[int]:
    steps = parse_step_set(feedback, num_steps) if isinstance(feedback, str) else sorted(set(feedback))
    if any(not 0 <= i < num_steps for i in steps):
        raise ConfigError(f"feedback steps {steps} out of range for {num_steps} steps")
    return steps


def _num_train(scheduler_config: dict[str, Any] | None) -> int:
    return int((scheduler_config or PIXART_SCHEDULER_CONFIG).get("num_train_timesteps", 1000))


def _build(
    prefix: str,
    num_steps: int,
    num_blocks: int,
    scheduler_config: dict[str, Any] | None,
    name: str | None,
    step_ops: StepOps,
    settings: dict[str, Any],
    loop: tuple[int, int] | None = None,
) -> StepPlan:
    """The scaffolding every builder shares: one Step per scheduler step with the (t_post, ops) that
    `step_ops` gives it (a step with a t_post ends at t_post), named `{prefix}-{num_steps}` unless
    `name` is given, then validated."""
    if num_blocks < 1:
        raise ConfigError(f"a plan needs at least one block, got {num_blocks}")
    _check_steps(num_steps)
    config = scheduler_config or PIXART_SCHEDULER_CONFIG
    tokens = image_tokens_of(config)  # (None,) where the schedule does not depend on the size
    schedules: dict[int, tuple[StepTiming, ...]] = {}
    steps: list[Step] = []
    for size in tokens:
        timing = []
        for index, coef in enumerate(scheduler_coefficients(config, num_steps, size)):
            t_post, ops = step_ops(index, coef)
            timing.append(StepTiming(float(coef.timestep), t_post, coef))
            if size == tokens[0]:  # the first size's timing is the steps' own
                final: TimeRef = "t_post" if t_post is not None else "t"
                steps.append(Step(index, float(coef.timestep), t_post, tuple(ops), final, coef))
        if size is not None:
            schedules[size] = tuple(timing)
    plan = StepPlan(
        name or f"{prefix}-{num_steps}",
        num_blocks,
        config["_class_name"],
        tuple(steps),
        loop,
        settings,
        schedules,
    )
    plan.validate()
    return plan


def _around(num_blocks: int, op: Op, after_time: TimeRef = "t") -> list[Op]:
    """`op` with plain blocks before it (at t) and after it (at `after_time`) to cover the model."""
    before = [Op("blocks", 0, op.start - 1)] if op.start > 0 else []
    after = [Op("blocks", op.end + 1, num_blocks - 1, after_time)] if op.end < num_blocks - 1 else []
    return [*before, op, *after]


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


# -- composition -------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheSpec:
    """One Δ-cached block range of a plan.

    On the steps it applies to (`steps`; None: all), a plain step refreshes the range when its key
    holds no Δ yet, when the Δ is `refresh_every` steps old (refreshed on step s, it is reused
    until step s + refresh_every), or where `schedule` says so (Block Caching's per-step table,
    which then replaces `refresh_every`), and reuses the Δ otherwise. With a `threshold`, the plain
    steps after the first refresh leave the choice to the run time (`cache_adaptive`, at most
    `max_reuse` reuses in a row). A feedback step refreshes the range wherever it applies."""

    start: int
    end: int
    key: str = "cache"
    refresh_every: int = 3
    steps: tuple[int, ...] | None = None
    schedule: tuple[bool, ...] | None = None
    threshold: float | None = None
    max_reuse: int = 2

    def applies(self, step: int) -> bool:
        return self.steps is None or step in self.steps

    def kind(self, step: int, feedback: bool, last_refresh: int | None) -> str:
        """refresh, reuse or adaptive on `step`, given the step of the key's last refresh."""
        if feedback or last_refresh is None:
            return "refresh"
        if self.threshold is not None:
            return "adaptive"
        if self.schedule is not None:
            return "refresh" if self.schedule[step] else "reuse"
        return "refresh" if step - last_refresh >= self.refresh_every else "reuse"

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if v is not None}
        if self.schedule is not None:
            out["schedule"] = [int(v) for v in self.schedule]
        if self.steps is not None:
            out["steps"] = list(self.steps)
        return out


def _split(op: Op, cuts: tuple[int, int]) -> list[Op]:
    """A blocks op cut where a cached range starts and after it ends (other ops stay whole)."""
    if op.kind != "blocks":
        return [op]
    edges = [op.start, *(c for c in cuts if op.start < c <= op.end), op.end + 1]
    return [Op("blocks", a, b - 1, op.time) for a, b in itertools.pairwise(edges)]


def _carve(ops: list[Op], spec: CacheSpec, kind: str) -> list[Op]:
    """`ops` with `spec`'s range cached. On a refresh every op inside stores under the key, as one
    keyed group (blocks become cache_refresh, an ilf op carries the key); on a reuse or an adaptive
    step one op stands for the whole range."""
    out: list[Op] = []
    for piece in (piece for op in ops for piece in _split(op, (spec.start, spec.end + 1))):
        if not spec.start <= piece.start <= spec.end:
            out.append(piece)
        elif kind == "refresh":
            refresh: OpKind = "ilf" if piece.kind == "ilf" else "cache_refresh"
            out.append(Op(refresh, piece.start, piece.end, piece.time, spec.key))
        elif piece.start == spec.start:
            cached: OpKind = "cache_adaptive" if kind == "adaptive" else "cache_reuse"
            rule = (spec.threshold, spec.max_reuse) if kind == "adaptive" else (None, None)
            out.append(Op(cached, spec.start, spec.end, "t", spec.key, *rule))
    return out


def _check_caches(
    caches: Sequence[CacheSpec], loop: tuple[int, int] | None, feedback: list[int], num_steps: int
) -> None:
    """Cached ranges never overlap on a step; on a feedback step each contains the loop or stays clear."""
    for i in range(num_steps):
        active = sorted((c for c in caches if c.applies(i)), key=lambda c: c.start)
        for a, b in itertools.pairwise(active):
            if b.start <= a.end:
                raise ConfigError(f"cache ranges {a.start}:{a.end} and {b.start}:{b.end} overlap on step {i}")
        if i not in feedback or loop is None:
            continue
        for c in active:
            if not ((c.start <= loop[0] and loop[1] <= c.end) or c.end < loop[0] or c.start > loop[1]):
                raise ConfigError(
                    f"cache range {c.start}:{c.end} overlaps the ILF loop {loop[0]}:{loop[1]} in part: "
                    "a cached range must contain the loop (a feedback step then refreshes it) "
                    "or stay clear of it"
                )


def compose_plan(
    num_steps: int,
    num_blocks: int,
    caches: Sequence[CacheSpec],
    *,
    loop: tuple[int, int] | None = None,
    feedback: Feedback = (),
    t_post: str = "rescale",
    scheduler_config: dict[str, Any] | None = None,
    name: str | None = None,
    prefix: str = "composed",
    settings: dict[str, Any] | None = None,
) -> StepPlan:
    """ILF feedback steps and Δ-cached ranges in one plan.

    Feedback steps are ILF's (blocks at t, the inner loop over `loop`, the blocks after it at
    t_post) and refresh every cached range that applies to them with what they compute: a range
    that contains the loop stores out - in across the ops that cover it, the loop's second pass
    included. The other steps follow each `CacheSpec`'s rule; a feedback step's refresh counts."""
    _check_steps(num_steps)
    for spec in caches:
        check_block_range(spec.start, spec.end, num_blocks, "cache range")
        _check_refresh_every(spec.refresh_every)
    fb_steps = _feedback_steps(feedback, num_steps)
    if fb_steps:
        loop = loop or default_loop(num_blocks)
        check_block_range(*loop, num_blocks, "loop")
        _check_t_post(t_post)
    _check_caches(caches, loop if fb_steps else None, fb_steps, num_steps)
    last: dict[str, int] = {}  # key -> the step of its last refresh
    num_train = _num_train(scheduler_config)

    def step_ops(i: int, coef: StepCoefficients) -> tuple[float | None, list[Op]]:
        t_post_i, ops = None, [Op("blocks", 0, num_blocks - 1)]
        if i in fb_steps and loop is not None:
            t_post_i, ops = _feedback_step(num_blocks, loop, t_post, coef, i == 0, num_train)
        for spec in caches:
            if spec.applies(i):
                kind = spec.kind(i, i in fb_steps, last.get(spec.key))
                if kind == "refresh":
                    last[spec.key] = i
                ops = _carve(ops, spec, kind)
        return t_post_i, ops

    settings = settings or {
        "kind": "composed",
        "feedback": fb_steps,
        "t_post": t_post if fb_steps else None,
        "caches": [spec.to_dict() for spec in caches],
    }
    plan_loop = loop if fb_steps else None
    return _build(prefix, num_steps, num_blocks, scheduler_config, name, step_ops, settings, plan_loop)


def _feedback_step(
    num_blocks: int, loop: tuple[int, int], t_post: str, coef: StepCoefficients, first: bool, num_train: int
) -> tuple[float, list[Op]]:
    """An ILF step: the blocks before the loop at t, the inner loop, the blocks after it at t_post."""
    start, end = loop
    size = end - start + 1
    tp = post_timestep(t_post, coef.timestep, coef.prev_timestep, num_blocks, size, first, num_train)
    return tp, _around(num_blocks, Op("ilf", start, end), after_time="t_post")


# -- plan builders -----------------------------------------------------------------------------


def baseline_plan(
    num_steps: int,
    num_blocks: int = 28,
    scheduler_config: dict[str, Any] | None = None,
    name: str | None = None,
) -> StepPlan:
    full = [Op("blocks", 0, num_blocks - 1)]
    settings = {"kind": "baseline"}
    return _build("base", num_steps, num_blocks, scheduler_config, name, lambda i, c: (None, full), settings)


def ilf_plan(
    num_steps: int,
    num_blocks: int = 28,
    loop: tuple[int, int] | None = None,
    feedback: str | Iterable[int] = "first2,last2",
    t_post: str = "rescale",
    scheduler_config: dict[str, Any] | None = None,
    name: str | None = None,
) -> StepPlan:
    start, end = loop or default_loop(num_blocks)
    check_block_range(start, end, num_blocks, "loop")
    _check_t_post(t_post)
    _check_steps(num_steps)
    fb_steps = _feedback_steps(feedback, num_steps)
    num_train = _num_train(scheduler_config)

    def step_ops(i: int, coef: StepCoefficients) -> tuple[float | None, list[Op]]:
        if i not in fb_steps:
            return None, [Op("blocks", 0, num_blocks - 1)]
        return _feedback_step(num_blocks, (start, end), t_post, coef, i == 0, num_train)

    settings = {"kind": "ilf", "feedback": fb_steps, "t_post": t_post}
    return _build("ilf", num_steps, num_blocks, scheduler_config, name, step_ops, settings, (start, end))


def cache_plan(
    num_steps: int,
    num_blocks: int = 28,
    cache_range: tuple[int, int] | None = None,
    refresh_every: int = 3,
    scheduler_config: dict[str, Any] | None = None,
    name: str | None = None,
) -> StepPlan:
    """Δ-cache a block range: refresh on every n-th step (0, n, 2n, ...), reuse the Δ otherwise."""
    start, end = cache_range or default_cache_range(num_blocks)
    check_block_range(start, end, num_blocks, "cache range")
    _check_refresh_every(refresh_every)
    settings = {"kind": "cache", "range": [start, end], "refresh_every": refresh_every}
    spec = CacheSpec(start, end, "cache", refresh_every)
    return compose_plan(
        num_steps,
        num_blocks,
        [spec],
        scheduler_config=scheduler_config,
        name=name,
        prefix="cache",
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
    feedback: Feedback = (),
    loop: tuple[int, int] | None = None,
    t_post: str = "rescale",
) -> StepPlan:
    """Δ-DiT: Δ-cache the deep (rear) blocks before the step boundary, the shallow (front) ones after.

    Early steps draw outlines (kept by the shallow blocks), late steps add detail (kept by the deep
    ones). The Δ is refreshed every `refresh_every` steps within a stage and whenever the stage
    starts; `feedback` steps (ILF over `loop`) refresh it too (compose_plan).
    """
    if not 1 <= num_cached <= num_blocks:
        raise ConfigError(f"num_cached must be in 1..{num_blocks}, got {num_cached}")
    boundary = num_steps // 2 if boundary is None else boundary
    if not 0 <= boundary <= num_steps:
        raise ConfigError(f"boundary {boundary} is out of range for {num_steps} steps")
    _check_refresh_every(refresh_every)
    deep = CacheSpec(num_blocks - num_cached, num_blocks - 1, "deep", refresh_every, tuple(range(boundary)))
    shallow = CacheSpec(0, num_cached - 1, "shallow", refresh_every, tuple(range(boundary, num_steps)))
    settings: dict[str, Any] = {
        "kind": "delta-dit",
        "num_cached": num_cached,
        "boundary": boundary,
        "refresh_every": refresh_every,
    }
    fb_steps = _feedback_steps(feedback, num_steps)
    if fb_steps:
        settings.update(feedback=fb_steps, t_post=t_post)
    return compose_plan(
        num_steps,
        num_blocks,
        [deep, shallow],
        loop=loop,
        feedback=fb_steps,
        t_post=t_post,
        scheduler_config=scheduler_config,
        name=name,
        prefix="delta-dit",
        settings=settings,
    )


def block_caching_schedule(changes: np.ndarray, delta: float, forced: Iterable[int] = ()) -> np.ndarray:
    """Block Caching's automatic schedule (003, eq. 7) -> bool[steps, blocks], True = recompute.

    `changes[s, i]` is block i's relative L1 change between steps s-1 and s (row 0 unused). A block
    keeps its cached output while the change accumulated since the refresh stays <= delta; on the
    `forced` steps (a composed plan's feedback steps) every block recomputes.
    """
    steps, blocks = changes.shape
    forced = set(forced)
    refresh = np.zeros((steps, blocks), dtype=bool)
    refresh[0] = True
    accumulated = np.zeros(blocks)
    for s in range(1, steps):
        accumulated += changes[s]
        refresh[s] = accumulated > delta if s not in forced else True
        accumulated[refresh[s]] = 0.0
    return refresh


def block_caching_plan(
    changes: np.ndarray,
    delta: float,
    scheduler_config: dict[str, Any] | None = None,
    name: str | None = None,
    feedback: Feedback = (),
    loop: tuple[int, int] | None = None,
    t_post: str = "rescale",
) -> StepPlan:
    """A plan from a Block-Caching schedule: neighbouring blocks that refresh on the same steps share
    one Δ-cache range (their Δs add up exactly), every other block caches on its own.

    With `feedback` steps (ILF over `loop`), those steps recompute every block, and the loop's blocks
    are one range that recomputes whenever one of them would (a feedback step recomputes the loop as
    one piece, so a cached range must contain it or stay clear of it)."""
    num_steps, num_blocks = changes.shape
    _check_steps(num_steps)
    fb_steps = _feedback_steps(feedback, num_steps)
    if fb_steps:
        loop = loop or default_loop(num_blocks)
        check_block_range(*loop, num_blocks, "loop")
    refresh = block_caching_schedule(np.asarray(changes, dtype=np.float64), delta, fb_steps)
    columns = refresh.copy()
    edges = {0, num_blocks}
    if fb_steps and loop is not None:
        columns[:, loop[0] : loop[1] + 1] = columns[:, loop[0] : loop[1] + 1].any(axis=1, keepdims=True)
        edges |= {loop[0], loop[1] + 1}
    groups: list[tuple[int, int]] = []
    for i in range(num_blocks):
        if groups and i not in edges and np.array_equal(columns[:, groups[-1][0]], columns[:, i]):
            groups[-1] = (groups[-1][0], i)
        else:
            groups.append((i, i))
    specs = [
        CacheSpec(start, end, f"b{start}-{end}", schedule=tuple(bool(v) for v in columns[:, start]))
        for start, end in groups
        if not columns[:, start].all()
    ]
    settings: dict[str, Any] = {
        "kind": "block-caching",
        "delta": delta,
        "recompute": columns.astype(int).tolist(),
    }
    if fb_steps:
        settings.update(feedback=fb_steps, t_post=t_post)
    return compose_plan(
        num_steps,
        num_blocks,
        specs,
        loop=loop,
        feedback=fb_steps,
        t_post=t_post,
        scheduler_config=scheduler_config,
        name=name,
        prefix="blockcache",
        settings=settings,
    )


# -- named presets -----------------------------------------------------------------------------

PRESET_HELP = (
    "a plan JSON file, or a preset: base-N (plain N steps), ilf-N (the trained feedback's loop, else "
    "8-19 scaled to the model; feedback on the first 2 and last 2 steps; the feedback's t_post rule, "
    "else rescaled), cache-N (inner blocks Δ-cached, refreshed every 3rd step); base-N or ilf-N "
    "composed with a Δ-cache: ...-cacheB-ErK (blocks B..E, refreshed every K-th step) or "
    "...-adaptB-EtTmM (adaptive: reused while the input changed by at most T, at most M times in a row)"
)
# base-N / ilf-N, optionally composed with one cache (fixed or adaptive); or cache-N (nothing composed)
PRESET = re.compile(
    r"(?:(base|ilf)-(\d+)(?:-(?:cache(\d+)-(\d+)r(\d+)|adapt(\d+)-(\d+)t([0-9.]+)m(\d+)))?|cache-(\d+))"
)


def default_feedback(num_steps: int) -> str:
    """The ilf-N presets' feedback steps: the first 2 and last 2 (all of them below 4 steps)."""
    return "first2,last2" if num_steps >= 4 else "all"


def preset_name(num_steps: int, feedback: bool, cache: CacheSpec | None = None) -> str:
    """The preset that names a plain or ILF plan of `num_steps`, with one cached range or none."""
    name = f"{'ilf' if feedback else 'base'}-{num_steps}"
    if cache is None:
        return name
    if cache.threshold is None:
        return f"{name}-cache{cache.start}-{cache.end}r{cache.refresh_every}"
    threshold = np.format_float_positional(cache.threshold, trim="-")
    return f"{name}-adapt{cache.start}-{cache.end}t{threshold}m{cache.max_reuse}"


def _preset(
    m: re.Match,
    num_blocks: int,
    scheduler_config: dict[str, Any] | None,
    loop: tuple[int, int] | None,
    t_post: str,
) -> StepPlan:
    if m.group(10) is not None:
        return cache_plan(int(m.group(10)), num_blocks, None, 3, scheduler_config)
    kind, steps = m.group(1), int(m.group(2))
    fixed, adaptive = m.group(3, 4, 5), m.group(6, 7, 8, 9)
    if fixed[0] is None and adaptive[0] is None:
        if kind == "base":
            return baseline_plan(steps, num_blocks, scheduler_config)
        return ilf_plan(steps, num_blocks, loop, default_feedback(steps), t_post, scheduler_config)
    if fixed[0] is not None:
        spec = CacheSpec(int(fixed[0]), int(fixed[1]), "cache", int(fixed[2]))
    else:
        start, end, threshold, most = adaptive
        spec = CacheSpec(int(start), int(end), "cache", threshold=float(threshold), max_reuse=int(most))
    feedback = default_feedback(steps) if kind == "ilf" else ()
    name = preset_name(steps, kind == "ilf", spec)
    return compose_plan(
        steps,
        num_blocks,
        [spec],
        loop=loop,
        feedback=feedback,
        t_post=t_post,
        scheduler_config=scheduler_config,
        name=name,
    )


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL: no file of that name
        return False


def is_plan_file(spec: str) -> bool:
    """Whether `spec` names a plan file (it ends in .json, or a file of that name exists), not a preset."""
    return spec.endswith(".json") or _is_file(Path(spec))


def load_plan_file(spec: str, num_blocks: int) -> StepPlan:
    """The plan in the file `spec`, for a model of `num_blocks` blocks; else a ConfigError whose
    message is the reason alone (the caller names the spec: `plan 'SPEC': REASON`)."""
    path = Path(spec)
    if not _is_file(path):
        raise ConfigError("no such plan file")
    plan = StepPlan.load(path)
    if plan.num_blocks != num_blocks:
        raise ConfigError(f"it is for {plan.num_blocks} blocks; this model has {num_blocks}")
    return plan


def resolve_plan(
    spec: str,
    num_blocks: int = 28,
    scheduler_config: dict[str, Any] | None = None,
    loop: tuple[int, int] | None = None,
    t_post: str = "rescale",
) -> StepPlan:
    """A plan from a JSON file path or a preset name (see PRESET_HELP).

    `loop` and `t_post` are a trained feedback's own (ilf-N presets follow them)."""
    if is_plan_file(spec):
        try:
            return load_plan_file(spec, num_blocks)
        except ConfigError as exc:
            raise ConfigError(f"plan {spec!r}: {exc}") from None
    m = PRESET.fullmatch(spec.strip().lower())
    if not m:
        raise ConfigError(f"unknown plan {spec!r}: expected {PRESET_HELP}")
    return _preset(m, num_blocks, scheduler_config, loop, t_post)
