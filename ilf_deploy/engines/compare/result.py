"""The one result row of every check: `verify`, `verify-variant`, `verify-engines` and `tune`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ilf_deploy.engines.compare.metrics import Limit, Metrics

KINDS = ("segment", "end-to-end")


@dataclass(frozen=True)
class Check:
    kind: str  # "segment" or "end-to-end"
    name: str  # the segment, or the plan
    metrics: Metrics  # worst over samples and outputs
    limit: Limit  # what `ok` holds `metrics` to
    samples: int = 1  # feeds compared (segments); 1 end to end
    inputs: str = ""  # segments: "random" or "trajectory" (feeds recorded along a real run)
    size: str = ""  # HxW, where the check is at one of several resolutions

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"check kind must be one of {KINDS}, got {self.kind!r}")

    @property
    def ok(self) -> bool:
        return self.limit.passes(self.metrics)

    @property
    def label(self) -> str:
        """What the tables show: `segment (random)`, `segment (trajectory)`, `end-to-end`."""
        return f"{self.kind} ({self.inputs})" if self.inputs else self.kind

    # the metrics, read directly
    @property
    def snr_db(self) -> float:
        return self.metrics.snr_db

    @property
    def cosine(self) -> float:
        return self.metrics.cosine

    @property
    def rel_l2(self) -> float:
        return self.metrics.rel_l2

    @property
    def max_abs(self) -> float:
        return self.metrics.max_abs

    def to_dict(self) -> dict[str, Any]:
        """One JSON row (`--json`, tuning.json's candidate `fidelity`)."""
        return {
            "kind": self.kind,
            "name": self.name,
            "inputs": self.inputs,
            "size": self.size,
            "samples": self.samples,
            "metrics": self.metrics.to_dict(),
            "limit": self.limit.to_dict(),
            "ok": self.ok,
        }
