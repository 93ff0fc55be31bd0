"""`quantize --mode bf16`: a precision policy per segment, recorded in the manifest.

Start from `Manifest.reduced_precision_segments` (the blocks, the feedback block and `cross_kv`: nearly all
FLOPs; the timestep, conditioning, embedding and final segments always stay f32), run each one ON
ITS OWN in bf16 on OpenVINO (its bf16 precision hint) on the held-out trajectory's feeds recorded
by ONNX Runtime fp32, with the one comparator (ilf_deploy.engines.compare, as `verify-variant` does), and
keep every segment that misses the bf16 segment budget (compare.BUDGETS) in f32; one that the plan
never calls has no feeds, so no evidence: f32 too. The variant's segment entries are the bundle's
own ONNX files (no new files) and mean "this segment in bf16"; `precision_policy` records the plan
checked on and why each other segment stays f32. A manifest with a bf16 variant is schema_version
3 (bundle.rewrite_manifest): readers of 2 (the C++ runtime) refuse it in one line.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.engines.backends import open_bundle_generator
from ilf_deploy.engines.compare import Budget, budget, compare_segment, run_reference, runner_outputs

MODE = "bf16"


def bf16_budget() -> Budget:
    """What each bf16 segment is held to, on its own (compare.BUDGETS, OpenVINO bf16)."""
    return budget("openvino", MODE)


def bf16_policy(
    bundle: Bundle,
    plan: str | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
    limits: Budget | None = None,
) -> tuple[list[str], dict[str, str], str]:
    """(the segments that stay within `limits` (default: the bf16 budget) in bf16 on their own, the
    others -> why they stay f32, the plan whose held-out feeds were used)."""
    # opened first: the backend refuses, in one line, a missing OpenVINO or a CPU without bf16
    candidate = open_bundle_generator(bundle, "openvino", None, precision=MODE, threads=threads)
    limits = limits or bf16_budget()
    reference = run_reference(bundle, plan, threads=threads, progress=progress)
    ours, theirs = runner_outputs(candidate.segments), runner_outputs(reference.generator.segments)
    keep: list[str] = []
    f32: dict[str, str] = {}
    for segment in bundle.manifest.reduced_precision_segments:
        if progress:
            progress(f"bf16 {segment} on its own")
        row = compare_segment(segment, ours, theirs, reference.recorder.feeds(segment), limits.segment)
        if row is None:
            f32[segment] = f"not called by {reference.name}: no feeds to check it on"
        elif not row.ok:
            measured = getattr(row.metrics, limits.segment.metric)
            f32[segment] = f"{limits.segment.metric} {measured:.4g} beyond {limits.segment} in bf16"
        else:
            keep.append(segment)
    return keep, f32, reference.name


def bf16_entry(
    bundle: Bundle, progress: Callable[[str], None] | None = None, **policy: Any
) -> dict[str, Any]:
    """The manifest entry of a bf16 variant of `bundle` (refused when no segment passes on its own);
    its `tools` are the caller's to fill in."""
    segments, f32, plan = bf16_policy(bundle, progress=progress, **policy)
    if not segments:
        why = "; ".join(f"{name}: {reason}" for name, reason in f32.items())
        raise ConfigError(f"no segment stays within the bf16 budget on its own ({why}): nothing to write")
    return {
        "mode": MODE,
        "segments": {name: bundle.segment_spec(name).to_dict() for name in segments},  # its own files
        "quantized_layers": {},
        "calibration": None,
        "tools": {},
        "precision_policy": {"plan": plan, "f32": f32},
    }
