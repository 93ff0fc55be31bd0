"""One comparator for every check: a candidate against its reference, scored by one metric function
and held to one budget table, with one result type (`Check`) and one held-out request.

Callers: `verify` (ilf_deploy.checks.verify.bundle: a bundle vs PyTorch), `verify-variant`
(quantization.quantize.verify_variant), `verify-engines` (verify.engines: TensorRT) and `tune`
(ilf_deploy.checks.tuning). Layers: above backends (it opens ONNX Runtime fp32, the reference), below them.
"""

from __future__ import annotations

from ilf_deploy.engines.compare.budgets import (
    ANY_ENGINE,
    BUDGETS,
    LOSSY_SPEEDUP,
    Budget,
    MissingBudget,
    budget,
)
from ilf_deploy.engines.compare.comparator import (
    HELD_OUT_CLASS,
    HELD_OUT_PROMPT,
    HELD_OUT_SEED,
    Reference,
    compare_latents,
    compare_segment,
    compare_to_reference,
    held_out_request,
    recording,
    reference_generator,
    run_reference,
    runner_of,
    runner_outputs,
)
from ilf_deploy.engines.compare.metrics import Limit, Metrics, ShapeMismatch, metrics
from ilf_deploy.engines.compare.recorder import TrajectoryRecorder
from ilf_deploy.engines.compare.result import Check

__all__ = [
    "ANY_ENGINE",
    "BUDGETS",
    "HELD_OUT_CLASS",
    "HELD_OUT_PROMPT",
    "HELD_OUT_SEED",
    "LOSSY_SPEEDUP",
    "Budget",
    "Check",
    "Limit",
    "Metrics",
    "MissingBudget",
    "Reference",
    "ShapeMismatch",
    "TrajectoryRecorder",
    "budget",
    "compare_latents",
    "compare_segment",
    "compare_to_reference",
    "held_out_request",
    "metrics",
    "recording",
    "reference_generator",
    "run_reference",
    "runner_of",
    "runner_outputs",
]
