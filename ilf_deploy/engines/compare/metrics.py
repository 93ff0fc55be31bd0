"""The one metric function: how far a candidate's array is from the reference's, and the limit a
metric is held to (a budget's half: `compare.budgets`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np

from ilf_deploy.core.errors import ConfigError

HIGHER_IS_BETTER = ("snr_db", "cosine")
LOWER_IS_BETTER = ("rel_l2", "max_abs")
LABELS = {"snr_db": "SNR", "cosine": "cosine", "rel_l2": "rel L2", "max_abs": "max abs"}


class ShapeMismatch(ConfigError):
    """The candidate and the reference disagree on a shape: a bug, never a tolerance question."""


@dataclass(frozen=True)
class Metrics:
    snr_db: float  # 10 log10(|ref|² / |got - ref|²); inf where they are equal
    cosine: float  # of the flattened arrays
    rel_l2: float  # |got - ref| / |ref|
    max_abs: float  # max |got - ref|

    @classmethod
    def worst(cls, many: Iterable[Metrics]) -> Metrics:
        """Each metric at its worst over `many` (samples, outputs)."""
        items = list(many)
        if not items:
            raise ValueError("no metrics to take the worst of")
        return cls(
            min(m.snr_db for m in items),
            min(m.cosine for m in items),
            max(m.rel_l2 for m in items),
            max(m.max_abs for m in items),
        )

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


METRICS = tuple(f.name for f in fields(Metrics))


def metrics(got: Any, want: Any, what: str = "") -> Metrics:
    """All metrics of `got` against the reference `want` (float64; NaN anywhere fails every limit)."""
    g, w = np.asarray(got, np.float64), np.asarray(want, np.float64)
    if g.shape != w.shape:
        where = f"{what}: " if what else ""
        raise ShapeMismatch(f"{where}the candidate gave shape {g.shape}, the reference {w.shape}")
    g, w = g.ravel(), w.ravel()
    diff = g - w
    err, ref = float(diff @ diff), float(w @ w)
    snr = float("inf") if err == 0 else float(10 * np.log10(max(ref, 1e-30) / err))
    norms = float(np.linalg.norm(g) * np.linalg.norm(w))
    # two zero arrays point the same way (an all-zero output, e.g. a mask bias); one alone does not
    cosine = float(err == 0) if norms == 0 else float(g @ w / norms)
    max_abs = float(np.abs(diff).max(initial=0.0))
    return Metrics(snr, cosine, float(np.sqrt(err / max(ref, 1e-30))), max_abs)


@dataclass(frozen=True)
class Limit:
    """One metric held to one bound: at least it (SNR, cosine) or at most it (rel L2, max abs)."""

    metric: str  # a Metrics field
    bound: float

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"unknown metric {self.metric!r}; choose from {', '.join(METRICS)}")

    @property
    def at_least(self) -> bool:
        return self.metric in HIGHER_IS_BETTER

    def value(self, measured: Metrics) -> float:
        """What this limit reads in `measured`."""
        return getattr(measured, self.metric)

    def passes(self, measured: Metrics) -> bool:
        value = self.value(measured)
        return bool(value >= self.bound) if self.at_least else bool(value <= self.bound)

    def __str__(self) -> str:
        unit = " dB" if self.metric == "snr_db" else ""
        return f"{LABELS[self.metric]} {'≥' if self.at_least else '≤'} {self.bound:g}{unit}"

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "at_least" if self.at_least else "at_most": self.bound}
