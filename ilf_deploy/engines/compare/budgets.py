"""The one budget table: how close a run of (engine, precision) must stay to its reference.

Keyed by (engine, precision); "*" is any engine. A key it lacks is refused in one line
(`MissingBudget`): no silent default. References: PyTorch for `verify` (a bundle at its own
precision), ONNX Runtime fp32 on the CPU for `verify-variant`, `verify-engines` and `tune`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.engines.compare.metrics import Limit

ANY_ENGINE = "*"
# `tune` (and so `--backend auto`) runs a lossy candidate (a Budget that is not `exact`) only when its
# step is at least this many times faster than the fastest exact one: lower accuracy must buy time.
LOSSY_SPEEDUP = 1.10


@dataclass(frozen=True)
class Budget:
    segment: Limit  # each segment on the same feeds, worst sample and output
    end_to_end: Limit  # a plan's final latents
    exact: bool = False  # the reference's own numerics (fp32 parity): no accuracy traded for speed

    def __str__(self) -> str:
        return f"segments {self.segment}, end-to-end latents {self.end_to_end}"

    def to_dict(self) -> dict[str, Any]:
        return {"segment": self.segment.to_dict(), "end_to_end": self.end_to_end.to_dict()}


def _snr(segment_db: float, end_to_end_rel_l2: float) -> Budget:
    return Budget(Limit("snr_db", segment_db), Limit("rel_l2", end_to_end_rel_l2))


def _rel(segment_rel_l2: float, end_to_end_rel_l2: float, exact: bool = False) -> Budget:
    return Budget(Limit("rel_l2", segment_rel_l2), Limit("rel_l2", end_to_end_rel_l2), exact)


BUDGETS: Mapping[tuple[str, str], Budget] = MappingProxyType(
    {
        # Parity at the same precision (vs PyTorch, or vs ONNX Runtime fp32): rel L2 1e-4 = 80 dB SNR.
        # Torch compiled (Inductor) fp32 too: fused kernels reorder sums, ~1e-6, never 1e-3.
        (ANY_ENGINE, "fp32"): _rel(1e-4, 1e-3, exact=True),
        (ANY_ENGINE, "fp16"): _rel(1e-2, 5e-2),
        # TensorRT vs ONNX Runtime fp32: fp32 engines may use TF32.
        ("tensorrt", "fp32"): _snr(40.0, 1e-2),
        ("tensorrt", "fp16"): _snr(30.0, 5e-2),
        # Precision variants (quantize) and engine precisions vs ONNX Runtime fp32, on any engine.
        (ANY_ENGINE, "int8-dynamic"): _snr(30.0, 0.05),
        (ANY_ENGINE, "int8-qdq"): _snr(30.0, 0.05),
        (ANY_ENGINE, "int8-ov"): _snr(30.0, 0.05),
        (ANY_ENGINE, "fp8-qdq"): _snr(25.0, 0.10),
        # OpenVINO's bf16 hint and a bf16 variant (quantize --mode bf16), torch bf16 eager and compiled.
        (ANY_ENGINE, "bf16"): _snr(30.0, 0.05),
    }
)


class MissingBudget(ConfigError):
    """No budget for an (engine, precision): refused rather than judged against a guess."""


def budget(engine: str, precision: str) -> Budget:
    """The budget of `precision` on `engine`: its own row, else the any-engine row of `precision`."""
    for key in ((engine, precision), (ANY_ENGINE, precision)):
        if key in BUDGETS:
            return BUDGETS[key]
    known = ", ".join(f"{e} {p}" for e, p in BUDGETS)
    raise MissingBudget(f"no fidelity budget for {engine} {precision} (compare.BUDGETS has: {known})")
