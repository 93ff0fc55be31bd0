"""The denoising loop over a step plan, shared by every backend (torch, ONNX Runtime, ...).

A backend supplies `Segments`: the model cut into pieces. The loop itself is only segment calls,
classifier-free guidance and the plan's precomputed scheduler coefficients. Arrays may be torch
tensors or numpy arrays: the loop uses only slicing, +, -, *, a sum (the finite check) and the
backend's `concat` (an adaptive cache also `abs` and a per-row sum: core/runtime/cache.py). Between
blocks the model's state is a dict of named arrays (`State`: one for PixArt/DiT, image and text
tokens for an MMDiT); the loop passes it along without naming a stream.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from ilf_deploy.core.errors import ConfigError, NonFiniteError
from ilf_deploy.core.plan import Step, StepPlan
from ilf_deploy.core.runtime.cache import CacheState
from ilf_deploy.core.state import State

Array = Any
Cond = Any


class Segments(Protocol):
    latent_channels: int
    num_blocks: int
    loop: tuple[int, int] | None  # the inner loop the feedback module was trained for, if any
    timings: dict[str, list[float]]  # seconds per call, by stage (bench, serve metrics)
    compiles_per_shape: bool  # each input-shape set its own compiled model (OpenVINO): memory per batch size

    def context(self, inputs: dict[str, Array]) -> Cond: ...
    def conditioning(self, timestep: float, context: Cond) -> Cond: ...
    def embed(self, latents: Array, cond: Cond) -> State: ...
    def blocks(self, start: int, end: int, state: State, cond: Cond) -> State: ...
    def inner_loop(self, state: State, cond: Cond, cond_post: Cond) -> State: ...
    def final(self, state: State, cond: Cond, height: int, width: int) -> Array: ...
    def concat(self, arrays: list[Array]) -> Array: ...
    def open_all(self) -> None:
        """Open (load, compile) every segment now, not on its first call: a server's warm-up."""

    def keep_static_shapes(self, count: int) -> None:
        """How many input-shape sets a segment an engine that compiles per shape keeps static: a
        server's micro-batch buckets (core/batching.py), compiled by its warm-up. Others: a no-op."""


def check_plan(plan: StepPlan, segments: Segments) -> None:
    if plan.schedules:  # the caller picks the image size's schedule (StepPlan.for_image_tokens)
        raise ConfigError(f"plan {plan.name!r} holds one schedule per image size; none was picked")
    if plan.num_blocks != segments.num_blocks:
        raise ConfigError(
            f"plan {plan.name!r} is for {plan.num_blocks} blocks; the model has {segments.num_blocks}"
        )
    if plan.feedback_steps:
        if segments.loop is None:
            raise ConfigError(f"plan {plan.name!r} uses ILF feedback but the model has no feedback module")
        if plan.loop != segments.loop:
            raise ConfigError(
                f"plan {plan.name!r} loops over blocks {plan.loop}; "
                f"the feedback was trained for {segments.loop}"
            )


def check_finite(x: Array, step: Step, plan: StepPlan) -> None:
    """Stop at the first step whose latents hold NaN or Inf, never decode them into a black image.

    One product and one sum per step (README "The denoising loop": its measured cost): x * 0 is 0
    where x is finite and NaN where it is NaN or ±Inf, so the sum is 0 exactly when all are finite."""
    with np.errstate(invalid="ignore"):  # numpy warns on inf * 0; the NaN is the answer here
        finite = float((x * 0).sum()) == 0.0
    if not finite:
        raise NonFiniteError(
            f"non-finite latents after step {step.index} of plan {plan.name!r} ({plan.num_steps} steps): "
            "NaN or Inf from the inputs, the guidance scale or the plan's coefficients"
        )


def model_output(
    seg: Segments,
    step: Step,
    x: Array,
    context: Cond,
    guided: bool,
    cache: CacheState,
) -> Array:
    """One network evaluation as the plan says: the (unguided) epsilon for [uncond; cond].

    `cache` is the batch's Δ-cache: a keyed range that runs stores what it adds (out - in over all
    its ops, a keyed inner loop included), a reused one adds it back; an adaptive op decides per image.
    """
    cond = seg.conditioning(step.timestep, context)
    cond_post = seg.conditioning(step.t_post, context) if step.t_post is not None else cond
    h = seg.embed(seg.concat([x, x]) if guided else x, cond)
    range_in: dict[str, State] = {}  # where each keyed range of this step started
    cache.count(sum(op.block_forwards for op in step.ops if op.kind != "cache_adaptive"))
    for op in step.ops:
        c = cond_post if op.time == "t_post" else cond
        h_in = h
        if op.kind in ("blocks", "cache_refresh"):
            h = seg.blocks(op.start, op.end, h, c)
        elif op.kind == "ilf":  # eqs. 2–3: feedback from f_{e,t}, second pass at t_post (eqs. 4–5)
            h = seg.inner_loop(h, cond, cond_post)
        elif op.kind == "cache_reuse":
            h = cache.reuse(op.key, h)
        else:  # cache_adaptive: each image reuses the Δ or runs the blocks, by its probe's change
            h = cache.adaptive(seg, op, h, c)
        if op.stores:
            cache.store(op.key, range_in.setdefault(op.key, h_in), h)
    final_cond = cond_post if step.final_time == "t_post" else cond
    out = seg.final(h, final_cond, x.shape[-2], x.shape[-1])
    return out[:, : seg.latent_channels]  # drop learned-sigma channels


def denoise(
    seg: Segments,
    plan: StepPlan,
    latents: Array,
    inputs: dict[str, Array],
    guidance_scale: float | Array,
    on_step: Callable[[int], None] | None = None,
    cache: CacheState | None = None,
) -> Array:
    """Run every step of `plan` from `latents`; `inputs` are batched [uncond; cond] when guiding.

    `guidance_scale` is one number, or one per image shaped to broadcast over (B, C, h, w); `cache`
    (a new one by default) ends with the block forwards each image ran."""
    check_plan(plan, seg)
    guided = not isinstance(guidance_scale, (int, float)) or guidance_scale > 1.0
    context = seg.context(inputs)
    x, x0_history = latents, []
    cache = CacheState(latents.shape[0], guided) if cache is None else cache
    # numpy would warn on overflow: the finite check stops the loop there instead, in one line
    with np.errstate(over="ignore", invalid="ignore"):
        for step in plan.steps:
            eps = model_output(seg, step, x, context, guided, cache)
            if guided:
                n = x.shape[0]
                uncond, text = eps[:n], eps[n:]
                eps = uncond + guidance_scale * (text - uncond)
            k = step.coefficients
            x0 = k.x0_x * x + k.x0_eps * eps  # the solver's data prediction, kept for multistep updates
            x_next = k.x * x + k.eps * eps
            for coef, past in zip(k.history, reversed(x0_history)):
                x_next = x_next + coef * past
            x0_history.append(x0)
            x = x_next
            check_finite(x, step, plan)
            if on_step is not None:
                on_step(step.index)
    return x
