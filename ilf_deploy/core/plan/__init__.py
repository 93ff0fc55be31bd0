"""Step plans: everything a runtime needs to know per denoising step, decided ahead of time.

A plan lists, per step, the timestep, the post-feedback timestep `t_post`, the ordered segment
operations (block ranges, the ILF inner loop, Δ-cache refresh/reuse, adaptive reuse decided per
image at run time) and the scheduler's linear coefficients, so the runtime loop is only engine
calls and linear algebra. Plans are JSON. Methods compose: ILF feedback steps with a Δ-cache,
Δ-DiT or Block Caching on the other steps (`compose_plan`).

`model` holds the plan itself (ops, steps, JSON, validation, the one block-range check);
`builders` the plans of each method and the named presets.
"""

from ilf_deploy.core.plan.builders import (
    PRESET_HELP,
    T_POST_MODES,
    CacheSpec,
    baseline_plan,
    block_caching_plan,
    block_caching_schedule,
    cache_plan,
    compose_plan,
    default_cache_range,
    default_feedback,
    default_loop,
    delta_dit_plan,
    ilf_plan,
    parse_step_set,
    post_timestep,
    preset_name,
    resolve_plan,
)
from ilf_deploy.core.plan.model import (
    PLAN_VERSION,
    PLAN_VERSIONS,
    Op,
    OpKind,
    Step,
    StepPlan,
    TimeRef,
    check_block_range,
    parse_range,
    predicted_speedup,
    validate_loop,
)

__all__ = [
    "PLAN_VERSION",
    "PLAN_VERSIONS",
    "PRESET_HELP",
    "T_POST_MODES",
    "CacheSpec",
    "Op",
    "OpKind",
    "Step",
    "StepPlan",
    "TimeRef",
    "baseline_plan",
    "block_caching_plan",
    "block_caching_schedule",
    "cache_plan",
    "check_block_range",
    "compose_plan",
    "default_cache_range",
    "default_feedback",
    "default_loop",
    "delta_dit_plan",
    "ilf_plan",
    "parse_range",
    "parse_step_set",
    "post_timestep",
    "predicted_speedup",
    "preset_name",
    "resolve_plan",
    "validate_loop",
]
