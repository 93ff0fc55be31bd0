"""Micro-batching in front of one engine thread.

Images wait in per-key queues, a key being (plan, height, width, guided): only images that agree
on all four can share an engine call (guided batches carry an unconditional row per image, so an
unguided image would pay for guidance it did not ask for). The scheduler picks the key whose
oldest image waited longest, waits for the batch to fill up to `max_wait_s` after that image
arrived, then runs up to `max_batch` images as one `generate_batch` + one `decode`. While the
engine is busy new images pile up, so under load batches fill without any waiting.

Batch sizes: a call takes the largest bucket (1, 2, 4, ..., `max_batch`: core/batching.py) that
the waiting images fill; the rest stay first in line for the next call (7 waiting: 4, then 2 and 1,
or more with the images that arrived meanwhile). Nothing is padded, so no row but the request's own
ever runs beside it for nothing. The warm-up (before /readyz says ready) runs one batch of each
bucket, so an engine that compiles per input shape (OpenVINO) has all of them compiled, static,
before traffic: `Segments.keep_static_shapes`, core/runtime/generator.py's `warm_up`.

Cancellation: a request that times out or whose client disconnects marks its images cancelled.
Queued images are removed at once. In a running batch the rows cannot be cut out mid-denoise
(the loop owns the arrays), so the batch runs on for the others and skips decoding the cancelled
rows; when *every* image of the running batch is cancelled, `on_step` raises and the batch stops
before the next step.

Shutdown (`drain`, then `stop`): queued images fail at once with `Unavailable` (503 with
Retry-After); the batch in the engine may finish while the server drains; `stop` ends it at its
next step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NamedTuple

from ilf_deploy.core.batching import batch_buckets, bucket_for
from ilf_deploy.core.errors import NonFiniteError
from ilf_deploy.core.runtime.generator import Generator, Request, warm_up
from ilf_deploy.engines.backends.plans import PlanBook
from ilf_deploy.serving.serve.metrics import ServerMetrics

log = logging.getLogger("ilf_deploy.serving.serve")
batch_log = logging.getLogger("ilf_deploy.serving.serve.batch")  # one line per engine call


class BatchKey(NamedTuple):
    plan: str
    height: int
    width: int
    guided: bool


@dataclass(eq=False)
class Job:
    """One image of one HTTP request."""

    key: BatchKey
    request: Request
    future: asyncio.Future
    enqueued: float
    state: str = "queued"  # queued -> running -> done
    cancelled: str | None = None  # why: "disconnect", "timeout", "shutdown"
    request_id: str = ""  # for the batch's log line
    key_name: str | None = None  # the API key's name (None: no keys configured)
    started: float | None = None  # when its batch started (monotonic)
    batch: int = 0  # which batch ran it (1, 2, ...)
    engine_s: float = 0.0  # that batch's engine time


class QueueFull(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the queue is full; retry after {retry_after} s")
        self.retry_after = retry_after


class EngineError(Exception):
    """A batch failed inside the engine (a bug or a broken bundle, not the request)."""


class Unavailable(EngineError):
    """The engine is not running (not started, or shutting down): 503 with Retry-After."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


SHUTDOWN = "the server is shutting down; retry on another replica or after it restarts"
SHUTDOWN_RETRY_AFTER_S = 2


def engine_error_reason(exc: BaseException) -> str:
    """The `reason` label of `ilf_engine_errors_total`: non_finite (NaN/Inf latents, never
    decoded into a black image) or error (anything else)."""
    return "non_finite" if isinstance(exc, NonFiniteError) else "error"


class _Abort(Exception):
    """Raised from on_step: no one is waiting for this batch any more."""


class Batcher:
    def __init__(
        self,
        generator: Generator,
        plans: PlanBook,
        metrics: ServerMetrics,
        max_batch: int,
        max_wait_s: float,
        max_queue: int,
    ) -> None:
        self.generator, self.plans, self.metrics = generator, plans, metrics
        self.max_batch, self.max_wait_s, self.max_queue = max_batch, max_wait_s, max_queue
        self.buckets = batch_buckets(max_batch)  # the only batch sizes an engine call gets
        # one static shape set a segment per bucket (OpenVINO), compiled by the warm-up or on first use
        generator.segments.keep_static_shapes(len(self.buckets))
        self.ready = False
        self.warmup_error: str | None = None
        self._groups: dict[BatchKey, deque[Job]] = {}
        self._queued = 0
        self._batch_seconds = 1.0  # running mean, for Retry-After
        self._closing = False  # the running batch stops at its next step
        self._draining = False  # no new work; the running batch may finish
        self._wakeup: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._running: list[Job] = []  # the batch in the engine now
        self._batches = 0

    # -- lifecycle (event loop) ------------------------------------------------------------------
    def start(self, warmup: tuple[str, Request] | None) -> None:
        """Start the scheduler (in the running event loop); it warms the engine up first."""
        self._closing, self._draining, self.ready, self.warmup_error = False, False, False, None
        # One engine thread: segments are not called concurrently, and batching replaces concurrency.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ilf-engine")
        self._wakeup = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run(warmup), name="ilf-batcher")

    def drain(self) -> None:
        """Take no new work and answer every queued image "shutting down"; the batch in the
        engine runs on (`busy`) until it ends or `stop` is called."""
        self._draining = True
        self._fail([job for group in self._groups.values() for job in group])
        self._groups.clear()
        self._set_queued(0)

    @property
    def busy(self) -> bool:
        """A batch that someone still waits for is in the engine."""
        return any(job.cancelled is None for job in self._running)

    def stop(self) -> None:
        """Drain, and stop the running batch at its next step (its requests answered at once)."""
        self.drain()
        self._closing = True
        self._fail(self._running)

    @staticmethod
    def _fail(jobs: list[Job]) -> None:
        for job in jobs:
            job.cancelled = job.cancelled or "shutdown"
            if not job.future.done():
                job.future.set_exception(Unavailable(SHUTDOWN, SHUTDOWN_RETRY_AFTER_S))

    async def close(self) -> None:
        self.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)

    # -- requests (event loop) -------------------------------------------------------------------
    def submit(self, jobs: list[Job]) -> None:
        """Queue all of a request's images or none of them."""
        if self._closing or self._draining:
            raise Unavailable(SHUTDOWN, SHUTDOWN_RETRY_AFTER_S)
        if self._wakeup is None:
            raise Unavailable("the engine is not running")
        if self._queued + len(jobs) > self.max_queue:
            key_name = jobs[0].key_name
            self.metrics.rejected.inc(len(jobs), **({"key": key_name} if key_name else {}))
            raise QueueFull(self.retry_after())
        for job in jobs:
            self._groups.setdefault(job.key, deque()).append(job)
        self._set_queued(self._queued + len(jobs))
        self._wakeup.set()

    def cancel(self, jobs: list[Job], reason: str) -> None:
        for job in jobs:
            if job.state == "done" or job.cancelled:
                continue
            job.cancelled = reason
            self.metrics.cancelled.inc(reason=reason)
            if job.state == "queued":
                group = self._groups.get(job.key)
                if group is not None and job in group:
                    group.remove(job)
                    self._set_queued(self._queued - 1)
            job.future.cancel()

    def retry_after(self) -> int:
        """Seconds until the queue has drained enough for a new request, roughly."""
        return max(1, math.ceil((self._queued / self.max_batch + 1) * self._batch_seconds))

    @property
    def queued(self) -> int:
        return self._queued

    def _set_queued(self, value: int) -> None:
        self._queued = value
        self.metrics.queue_depth.set(value)

    # -- scheduling (event loop) -----------------------------------------------------------------
    async def _run(self, warmup: tuple[str, Request] | None) -> None:
        loop = asyncio.get_running_loop()
        if warmup is not None:
            try:
                started = time.perf_counter()
                await loop.run_in_executor(self._executor, self._warmup, *warmup)
                self.ready = True
                elapsed = round(time.perf_counter() - started, 4)
                fields = {"engine_s": elapsed, "batch_sizes": list(self.buckets)}
                log.info("ready: warm-up generations done", extra={"fields": fields})
            except Exception as exc:  # stay up, not ready: /readyz reports why
                self.warmup_failed(exc)
        else:
            self.ready = True
        self.metrics.ready.set(1 if self.ready else 0)
        while True:
            key, self._running = await self._next_batch()
            started = time.perf_counter()
            results = await loop.run_in_executor(self._executor, self._run_batch, key, self._running)
            self._running = []
            elapsed = time.perf_counter() - started
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * elapsed
            self._deliver(results)

    @staticmethod
    def _deliver(results: list[tuple[Job, Any]]) -> None:
        """Each job's image or error to its waiting request (skipped where it was cancelled)."""
        for job, result in results:
            job.state = "done"
            if job.future.done():  # cancelled meanwhile
                continue
            if isinstance(result, BaseException):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def warmup_failed(self, exc: Exception) -> None:
        """Not ready (non-finite latents included): counted, logged, and said by /readyz."""
        self.metrics.engine_errors.inc(reason=engine_error_reason(exc), batch="warmup")
        log.error("warm-up generation failed, not ready: %s", exc)
        self.warmup_error = f"{type(exc).__name__}: {exc}"

    async def _next_batch(self) -> tuple[BatchKey, list[Job]]:
        assert self._wakeup is not None
        while True:
            for key in [k for k, group in self._groups.items() if not group]:
                del self._groups[key]
            if not self._groups:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key, group = min(self._groups.items(), key=lambda item: item[1][0].enqueued)
            remaining = group[0].enqueued + self.max_wait_s - time.monotonic()
            if len(group) < self.max_batch and remaining > 0:
                self._wakeup.clear()  # woken by a new job (maybe filling this batch) or the deadline
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), remaining)
                continue
            jobs = [group.popleft() for _ in range(bucket_for(min(self.max_batch, len(group)), self.buckets))]
            self._set_queued(self._queued - len(jobs))
            now = time.monotonic()
            self._batches += 1
            for job in jobs:
                job.state, job.started, job.batch = "running", now, self._batches
                self.metrics.queue_wait.observe(now - job.enqueued)
            return key, jobs

    # -- the engine thread -----------------------------------------------------------------------
    def _warmup(self, plan: str, request: Request) -> None:
        # one batch per bucket; fewer buckets where memory holds fewer compiled batch sizes
        self.buckets = warm_up(self.generator, self.plans[plan], request, self.buckets)
        self.max_batch = self.buckets[-1]
        self._drain_timings()

    def _run_batch(self, key: BatchKey, jobs: list[Job]) -> list[tuple[Job, Any]]:
        live = [job for job in jobs if job.cancelled is None]
        if not live:
            return []

        def on_step(_index: int) -> None:
            if self._closing or all(job.cancelled for job in live):
                raise _Abort

        started = time.perf_counter()
        try:
            with self.generator.inference_context():  # torch: inference mode
                requests = [job.request for job in live]
                latents = self.generator.generate_batch(self.plans[key.plan], requests, None, on_step)
                ran = sum(self.generator.last_block_forwards)  # adaptive: per image
                keep = [i for i, job in enumerate(live) if job.cancelled is None]
                if not keep:
                    raise _Abort
                images = self.generator.decode(latents if len(keep) == len(live) else latents[keep])
        except _Abort:
            self.metrics.aborted.inc()
            self._log_batch(key, live, started, "aborted")
            return []
        except Exception as exc:
            self.metrics.engine_errors.inc(reason=engine_error_reason(exc))
            self._log_batch(key, live, started, "error", exc)
            error = EngineError(f"generation failed: {type(exc).__name__}: {str(exc)[:200]}")
            return [(job, error) for job in live]
        finally:
            self._drain_timings()
        self.metrics.batch_size.observe(len(live))
        self.metrics.batch_seconds.observe(self._log_batch(key, live, started, "ok"))
        label = self.plans.label(key.plan)  # a request's preset is "other": labels stay few
        self.metrics.images.inc(len(keep), plan=label)
        self.metrics.block_forwards.inc(ran, plan=label)
        return [(live[i], images[row]) for row, i in enumerate(keep)]

    def _log_batch(
        self, key: BatchKey, jobs: list[Job], started: float, status: str, error: Exception | None = None
    ) -> float:
        """One log line per batch (the requests' ids and key names, never keys); returns its engine time."""
        elapsed = time.perf_counter() - started
        for job in jobs:
            job.engine_s = elapsed
        waits = [job.started - job.enqueued for job in jobs if job.started is not None]
        fields = {
            "request_ids": list(dict.fromkeys(job.request_id for job in jobs)),
            "keys": list(dict.fromkeys(job.key_name for job in jobs if job.key_name)),
            "plan": key.plan,
            "size": f"{key.width}x{key.height}",
            "guided": key.guided,
            "n": len(jobs),
            "queue_wait_s": round(max(waits, default=0.0), 4),
            "engine_s": round(elapsed, 4),
            "status": status,
        }
        if error is None:
            batch_log.info("batch %s", status, extra={"fields": fields})
        else:
            fields["error"] = f"{type(error).__name__}: {str(error)[:200]}"
            batch_log.error("batch %s", status, extra={"fields": fields}, exc_info=error)
        return elapsed

    def _drain_timings(self) -> None:
        """Move the segments' per-call durations into counters (the lists would grow forever)."""
        for name, calls in self.generator.segments.timings.items():
            count = len(calls)
            if count:
                self.metrics.stage_seconds.inc(sum(calls[:count]), stage=name)
                self.metrics.stage_calls.inc(count, stage=name)
                del calls[:count]
