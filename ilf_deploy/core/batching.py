"""One batching policy for every server of a bundle: `serve`'s own batcher (serving/serve/state.py's
`ServeOptions` is one), Triton's dynamic batcher (`export-triton` and `serve --server triton`:
serving/triton/repository.py's `ExportOptions.policy`) and Ray Serve's `@serve.batch`
(serving/scale/serve.py).
The CLI's option defaults read `DEFAULT_BATCHING`, so each knob has one default and one check
whichever server runs it. Below serve and triton in the layers: Triton's model imports no FastAPI.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, TypeVar

from ilf_deploy.core.errors import ConfigError, check_at_least

T = TypeVar("T")
MIN_MAX_BATCH = 8  # images per engine call when neither the flag nor a larger bundle says more
MAX_WAIT_MS = 10_000.0


@dataclass(frozen=True)
class BatchingPolicy:
    """How images are batched into engine calls and how long and how many may wait."""

    max_batch: int | None = None  # images per engine call; None: the bundle's max_batch, at least 8
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for company
    max_queue: int = 64  # images waiting (all requests); beyond it: 429 (Triton: rejected at once)
    timeout_s: float = 120.0  # per request, queueing included; beyond it: 504
    max_n: int = 8  # images one request may ask for (`n`)

    def check_batching(self) -> None:
        """Each knob's bounds, as the flags name them (one line, before anything starts)."""
        check_at_least("--max-batch", self.max_batch)
        if not 0 <= self.max_wait_ms <= MAX_WAIT_MS:
            raise ConfigError(f"--max-wait-ms must be in 0..{MAX_WAIT_MS:g}, got {self.max_wait_ms}")
        check_at_least("--max-queue", self.max_queue)
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout-s must be > 0, got {self.timeout_s}")
        if not 1 <= self.max_n <= self.max_queue:
            raise ConfigError(f"--max-n must be in 1..--max-queue ({self.max_queue}), got {self.max_n}")

    def images_per_call(self, built: int, fixed_shape: bool = False) -> int:
        """The batch limit for a bundle built for `built` images: the flag, else the bundle's, at
        least 8 where the engine's batch axis is dynamic (ONNX Runtime); a fixed-shape engine
        (TensorRT: built for a batch range) stays within what it was built for."""
        return self.max_batch or (built if fixed_shape else max(built, MIN_MAX_BATCH))

    @property
    def max_wait_s(self) -> float:
        return self.max_wait_ms / 1000

    @property
    def max_queue_delay_us(self) -> int:
        """`max_wait_ms` in Triton's unit (`max_queue_delay_microseconds`)."""
        return round(self.max_wait_ms * 1000)

    def batching(self) -> BatchingPolicy:
        """Just the policy (of options that extend it, e.g. `ServeOptions`)."""
        return BatchingPolicy(**{f.name: getattr(self, f.name) for f in fields(BatchingPolicy)})

    @staticmethod
    def coerce(values: dict[str, Any]) -> dict[str, Any]:
        """`values` with the policy's knobs as their types (from text: YAML, Ray's `serve run` args)."""
        types = {f.name: float if "float" in str(f.type) else int for f in fields(BatchingPolicy)}
        try:
            return {k: types[k](v) if k in types and v is not None else v for k, v in values.items()}
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"a batching value is not a number: {exc}") from None


DEFAULT_BATCHING = BatchingPolicy()


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The micro-batch sizes a server runs: the powers of two below `max_batch`, and `max_batch`
    (8: 1, 2, 4, 8; 6: 1, 2, 4, 6). An engine that compiles a model per input shape (OpenVINO)
    keeps one static compile per bucket, made during the warm-up; any other size would run on its
    slower dynamic-shape model or compile in the middle of a request (docs/serving.md)."""
    check_at_least("max_batch", max_batch)
    return (*(1 << i for i in range(max_batch.bit_length()) if 1 << i < max_batch), max_batch)


def bucket_for(count: int, buckets: tuple[int, ...]) -> int:
    """How many of `count` waiting images the next call takes: the largest bucket <= `count`.
    Rounding down, not padding up: on a CPU an image's cost grows ~linearly with rows, so a padded
    row costs its full share (3 -> 4: +33 %) while the rest simply runs next (4 + 2 + 1 for 7,
    the first four answered sooner), and no padded row can touch a real one's result."""
    return max(size for size in buckets if size <= count)


def bucket_chunks(items: Sequence[T], buckets: tuple[int, ...]) -> list[Sequence[T]]:
    """`items` cut into engine calls of bucket sizes, largest first (7 with 1, 2, 4, 8: 4, 2, 1):
    for servers handed a whole batch at once (Triton's dynamic batcher, Ray Serve's @serve.batch)."""
    chunks: list[Sequence[T]] = []
    while len(items):
        size = bucket_for(len(items), buckets)
        chunks.append(items[:size])
        items = items[size:]
    return chunks
