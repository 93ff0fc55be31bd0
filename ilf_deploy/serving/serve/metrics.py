"""A minimal Prometheus text-format registry (counters, gauges, histograms with labels).

Written here rather than depending on prometheus_client: the server needs a dozen series, and the
engine thread and the event loop both update them, so every update takes one lock.
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Sequence

Labels = tuple[tuple[str, str], ...]

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Labels, extra: Labels = ()) -> str:
    pairs = (*labels, *extra)
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class _Metric:
    kind = ""

    def __init__(self, registry: Registry, name: str, help: str) -> None:
        self.name, self.help, self._lock = name, help, registry.lock
        self._values: dict[Labels, float] = {}
        registry.metrics.append(self)

    @staticmethod
    def key(labels: dict[str, str]) -> Labels:
        return tuple(sorted((k, str(v)) for k, v in labels.items()))

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self.key(labels), 0.0)

    def samples(self) -> list[str]:
        return [f"{self.name}{_labels(k)} {_number(v)}" for k, v in sorted(self._values.items())]


class Counter(_Metric):
    kind = "counter"

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self.key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount


class Gauge(_Metric):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        with self._lock:
            self._values[self.key(labels)] = value


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, registry: Registry, name: str, help: str, buckets: Sequence[float]) -> None:
        super().__init__(registry, name, help)
        self.buckets = tuple(sorted(buckets))
        self._series: dict[Labels, tuple[list[int], list[float]]] = {}  # bucket counts, [sum]

    def observe(self, value: float, **labels: str) -> None:
        key = self.key(labels)
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[bisect.bisect_left(self.buckets, value)] += 1  # le-buckets: value <= bound
            total[0] += value

    def count(self, **labels: str) -> int:
        with self._lock:
            series = self._series.get(self.key(labels))
            return sum(series[0]) if series else 0

    def samples(self) -> list[str]:
        lines = []
        for key, (counts, total) in sorted(self._series.items()):
            cumulative = 0
            for bound, count in zip((*self.buckets, math.inf), counts):
                cumulative += count
                lines.append(f"{self.name}_bucket{_labels(key, (('le', _number(bound)),))} {cumulative}")
            lines.append(f"{self.name}_sum{_labels(key)} {_number(total[0])}")
            lines.append(f"{self.name}_count{_labels(key)} {cumulative}")
        return lines


class Registry:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.metrics: list[_Metric] = []

    def render(self) -> str:
        lines = []
        with self.lock:
            for metric in self.metrics:
                lines += [f"# HELP {metric.name} {metric.help}", f"# TYPE {metric.name} {metric.kind}"]
                lines += metric.samples()
        return "\n".join(lines) + "\n"


class ServerMetrics:
    """Every series the server exports."""

    def __init__(self) -> None:
        self.registry = r = Registry()
        self.requests = Counter(
            r,
            "ilf_requests_total",
            "HTTP requests by endpoint, status code and API key name (no key label: no valid key).",
        )
        self.latency = Histogram(
            r, "ilf_request_duration_seconds", "HTTP request latency by endpoint.", LATENCY_BUCKETS
        )
        self.queue_depth = Gauge(r, "ilf_queue_depth", "Images waiting for the engine.")
        self.queue_wait = Histogram(
            r, "ilf_queue_wait_seconds", "Time an image waited before its batch started.", LATENCY_BUCKETS
        )
        self.batch_size = Histogram(r, "ilf_batch_size", "Images per engine call.", BATCH_BUCKETS)
        self.batch_seconds = Histogram(
            r, "ilf_batch_duration_seconds", "Engine time per batch (denoise + decode).", LATENCY_BUCKETS
        )
        self.images = Counter(r, "ilf_images_total", "Images generated and returned, by plan.")
        self.block_forwards = Counter(
            r, "ilf_block_forwards_total", "Transformer block forwards that ran, per image, by plan."
        )
        self.rejected = Counter(
            r,
            "ilf_rejected_images_total",
            "Images refused with 429 (queue full, or the key's in-flight limit), by API key name.",
        )
        self.cancelled = Counter(
            r,
            "ilf_cancelled_images_total",
            "Images dropped before completion, by reason (disconnect, timeout).",
        )
        self.aborted = Counter(
            r, "ilf_aborted_batches_total", "Batches stopped between steps: no one waited."
        )
        self.engine_errors = Counter(
            r,
            "ilf_engine_errors_total",
            "Batches that failed in the engine, by reason (non_finite: NaN/Inf latents; error); "
            'batch="warmup" for the warm-up generation.',
        )
        self.stage_seconds = Counter(r, "ilf_stage_seconds_total", "Time spent in each bundle segment.")
        self.stage_calls = Counter(r, "ilf_stage_calls_total", "Calls of each bundle segment.")
        self.ready = Gauge(
            r, "ilf_ready", "1 once the warm-up generation succeeded (0 again while draining)."
        )
        self.open_connections = Gauge(r, "ilf_open_connections", "TCP connections open now.")
        self.closed_connections = Counter(
            r,
            "ilf_closed_connections_total",
            "Connections the server closed, by reason (header_timeout; limit: the connection cap).",
        )
        self.accept_errors = Counter(
            r, "ilf_accept_errors_total", "Failed accepts, by errno (EMFILE: out of descriptors)."
        )
        self.ready.set(0)
        self.open_connections.set(0)
        self.queue_depth.set(0)
