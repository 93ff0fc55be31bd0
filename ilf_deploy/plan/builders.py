"""Plan builders: plain steps, ILF, Δ-cache, Δ-DiT, Block Caching, and the named presets.

Each builder decides, per step, the post-feedback timestep and the ops; `_build` does the rest
(the scheduler's coefficients, the plan's name, validation).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError
from ..schedulers import PIXART_SCHEDULER_CONFIG, StepCoefficients, scheduler_coefficients
from .model import Op, OpKind, Step, StepPlan, TimeRef, check_block_range

T_POST_MODES = ("none", "uniform", "rescale", "anneal")

# (step index, its coefficients) -> (t_post or None, the step's ops)
StepOps = Callable[[int, StepCoefficients], tuple[float | None, list[Op]]]


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
    if num_steps < 1:
        raise ConfigError(f"steps must be >= 1, got {num_steps}")


def _check_refresh_every(refresh_every: int) -> None:
    if refresh_every < 1:
        raise ConfigError(f"refresh-every must be >= 1, got {refresh_every}")


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
    steps = []
    for index, coef in enumerate(scheduler_coefficients(config, num_steps)):
        t_post, ops = step_ops(index, coef)
        final: TimeRef = "t_post" if t_post is not None else "t"
        steps.append(Step(index, float(coef.timestep), t_post, tuple(ops), final, coef))
    plan = StepPlan(
        name or f"{prefix}-{num_steps}",
        num_blocks,
        config["_class_name"],
        tuple(steps),
        loop,
        settings,
    )
    plan.validate()
    return plan


def _around(num_blocks: int, op: Op, after_time: TimeRef = "t") -> list[Op]:
    """`op` with plain blocks before it (at t) and after it (at `after_time`) to cover the model."""
    before = [Op("blocks", 0, op.start - 1)] if op.start > 0 else []
    after = [Op("blocks", op.end + 1, num_blocks - 1, after_time)] if op.end < num_blocks - 1 else []
    return [*before, op, *after]


def _cache_kind(stage_step: int, refresh_every: int) -> OpKind:
    return "cache_refresh" if stage_step % refresh_every == 0 else "cache_reuse"


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
    if t_post not in T_POST_MODES:
        raise ConfigError(f"unknown t_post mode {t_post!r}; choose from {', '.join(T_POST_MODES)}")
    _check_steps(num_steps)
    fb_steps = parse_step_set(feedback, num_steps) if isinstance(feedback, str) else sorted(set(feedback))
    if any(not 0 <= i < num_steps for i in fb_steps):
        raise ConfigError(f"feedback steps {fb_steps} out of range for {num_steps} steps")
    num_train = int((scheduler_config or PIXART_SCHEDULER_CONFIG).get("num_train_timesteps", 1000))

    def step_ops(i: int, coef: StepCoefficients) -> tuple[float | None, list[Op]]:
        if i not in fb_steps:
            return None, [Op("blocks", 0, num_blocks - 1)]
        size = end - start + 1
        tp = post_timestep(t_post, coef.timestep, coef.prev_timestep, num_blocks, size, i == 0, num_train)
        return tp, _around(num_blocks, Op("ilf", start, end), after_time="t_post")

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

    def step_ops(i: int, coef: StepCoefficients) -> tuple[float | None, list[Op]]:
        return None, _around(num_blocks, Op(_cache_kind(i, refresh_every), start, end, key="cache"))

    settings = {"kind": "cache", "range": [start, end], "refresh_every": refresh_every}
    return _build("cache", num_steps, num_blocks, scheduler_config, name, step_ops, settings)


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
    if not 1 <= num_cached <= num_blocks:
        raise ConfigError(f"num_cached must be in 1..{num_blocks}, got {num_cached}")
    boundary = num_steps // 2 if boundary is None else boundary
    if not 0 <= boundary <= num_steps:
        raise ConfigError(f"boundary {boundary} is out of range for {num_steps} steps")
    _check_refresh_every(refresh_every)

    def step_ops(i: int, coef: StepCoefficients) -> tuple[float | None, list[Op]]:
        early = i < boundary
        start, end = (num_blocks - num_cached, num_blocks - 1) if early else (0, num_cached - 1)
        kind = _cache_kind(i if early else i - boundary, refresh_every)
        return None, _around(num_blocks, Op(kind, start, end, key="deep" if early else "shallow"))

    settings = {
        "kind": "delta-dit",
        "num_cached": num_cached,
        "boundary": boundary,
        "refresh_every": refresh_every,
    }
    return _build("delta-dit", num_steps, num_blocks, scheduler_config, name, step_ops, settings)


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
    num_steps, num_blocks = changes.shape
    _check_steps(num_steps)
    refresh = block_caching_schedule(np.asarray(changes, dtype=np.float64), delta)
    groups: list[tuple[int, int]] = []
    for i in range(num_blocks):
        if groups and np.array_equal(refresh[:, groups[-1][0]], refresh[:, i]):
            groups[-1] = (groups[-1][0], i)
        else:
            groups.append((i, i))

    def step_ops(s: int, coef: StepCoefficients) -> tuple[float | None, list[Op]]:
        ops = []
        for start, end in groups:
            if refresh[:, start].all():
                ops.append(Op("blocks", start, end))
            else:
                kind: OpKind = "cache_refresh" if refresh[s, start] else "cache_reuse"
                ops.append(Op(kind, start, end, key=f"b{start}-{end}"))
        return None, _merge_blocks(ops)

    settings = {
        "kind": "block-caching",
        "delta": delta,
        "recompute": refresh.astype(int).tolist(),
    }
    return _build("blockcache", num_steps, num_blocks, scheduler_config, name, step_ops, settings)


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
