"""`serve --server ray`: the same HTTP API on a Ray Serve deployment of N replicas.

Every replica runs `serve`'s own FastAPI app (`serve.create_app`: routes, the request contract, API
keys, request ids, `/readyz`, `/metrics`, the access log) over the bundle, opened with its digest
pinned and every file's hash checked, so a replica over any other bundle fails to start. The one
change: images are batched by Ray Serve's `@serve.batch` (`RayServeBatcher`), not by our scheduler;
the engine side (warm-up, one engine thread, cancellation, the batch log line and metrics) is our
Batcher's. A replica warms up in its constructor, so Ray routes to it only once it can answer.

The bundle reaches the nodes by a shared path or shipped through the object store (ship.py).
`app_builder` is the import path KubeRay's RayService (and `serve run`) deploys from
(`ilf_deploy.serving.scale.serve:app_builder`). `/metrics` and `/readyz` are those of the replica that
answers; Ray Serve's own metrics (`ray_serve_*`) cover the deployment.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

from ray import serve

from ilf_deploy.core.batching import MIN_MAX_BATCH, bucket_chunks
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.engines.backends.plans import PlanBook
from ilf_deploy.serving.scale.cluster import cause, connect
from ilf_deploy.serving.scale.options import RayServeOptions, parse_autoscale
from ilf_deploy.serving.scale.ship import SharedPath, Shipped, source
from ilf_deploy.serving.serve.app import create_app
from ilf_deploy.serving.serve.batcher import Batcher, BatchKey, EngineError, Job
from ilf_deploy.serving.serve.logs import REQUEST_ID_HEADER
from ilf_deploy.serving.serve.state import ServeOptions

APP = "ilf"  # the Serve application's name
REPLICA_HEADER = "X-Ilf-Replica"  # which replica answered (its id @ its node's id)
REQUEST_ID = REQUEST_ID_HEADER.lower().encode()
log = logging.getLogger("ilf_deploy.serving.serve")


class RayServeBatcher(Batcher):
    """Our Batcher with Ray Serve's `@serve.batch` as its scheduler: a request's images wait in the
    Batcher's queues (so the queue limit, cancellation and shutdown work as in `serve`), and each
    batch Ray Serve forms runs as one engine call per (plan, size, guided) group in it. One per
    process: Ray Serve keeps one batch queue per decorated method (a replica is one process)."""

    @classmethod
    def replacing(cls, batcher: Batcher) -> RayServeBatcher:
        return cls(
            batcher.generator,
            batcher.plans,
            batcher.metrics,
            batcher.max_batch,
            batcher.max_wait_s,
            batcher.max_queue,
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batched.set_max_batch_size(self.max_batch)
        self._batched.set_batch_wait_timeout_s(self.max_wait_s)
        self._tasks: set[asyncio.Task] = set()

    def warm_up(self, warmup: tuple[str, Any] | None) -> None:
        """The warm-up generations (one per batch bucket) now, in the replica's constructor (a
        failure fails the replica)."""
        if warmup is not None:
            started = time.perf_counter()
            self._warmup(*warmup)
            elapsed = round(time.perf_counter() - started, 4)
            fields = {"engine_s": elapsed, "batch_sizes": list(self.buckets)}
            log.info("ready: warm-up generations done", extra={"fields": fields})
        self.ready, self.warmup_error = True, None
        self.metrics.ready.set(1)

    def start(self, warmup: tuple[str, Any] | None) -> None:
        """Accept images from now on (the app's lifespan); warm up first unless done already."""
        self._closing = self._draining = False
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ilf-engine")
        self._wakeup = asyncio.Event()  # Batcher.submit refuses work until this exists
        if not self.ready:
            self._task = asyncio.get_running_loop().create_task(self._warm(warmup), name="ilf-warmup")

    async def _warm(self, warmup: tuple[str, Any] | None) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self.warm_up, warmup)
        except Exception as exc:  # stay up, not ready: /readyz and the health check say why
            self.warmup_failed(exc)

    def submit(self, jobs: list[Job]) -> None:
        super().submit(jobs)  # the queue limit (429) and the per-key queues
        loop = asyncio.get_running_loop()
        for job in jobs:
            task = loop.create_task(self._through_ray(job))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _through_ray(self, job: Job) -> None:
        try:
            await self._batched(job)
        except Exception as exc:
            if not job.future.done():
                job.future.set_exception(EngineError(f"generation failed: {type(exc).__name__}: {exc}"))

    async def close(self) -> None:
        await super().close()  # fails every queued and running image: the server is shutting down
        for task in list(self._tasks):
            task.cancel()

    def _take(self, jobs: list[Job]) -> dict[BatchKey, list[Job]]:
        """This batch's images still queued (not cancelled meanwhile), out of the queues, by key."""
        groups: dict[BatchKey, list[Job]] = defaultdict(list)
        for job in jobs:
            queue = self._groups.get(job.key)
            if queue is not None and job in queue:
                queue.remove(job)
                groups[job.key].append(job)
        self._set_queued(self._queued - sum(len(g) for g in groups.values()))
        now = time.monotonic()
        for group in groups.values():
            self._batches += 1
            for job in group:
                job.state, job.started, job.batch = "running", now, self._batches
                self.metrics.queue_wait.observe(now - job.enqueued)
        return groups

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # set per server in __init__
    async def _batched(self, jobs: list[Job]) -> list[None]:
        """One Ray Serve batch: engine calls of bucket sizes per group (core/batching.py: each a
        warmed shape), on the engine thread."""
        loop = asyncio.get_running_loop()
        calls = [
            (key, list(chunk))
            for key, group in self._take(jobs).items()
            for chunk in bucket_chunks(group, self.buckets)
        ]
        for key, group in calls:
            self._running = group
            started = time.perf_counter()
            results = await loop.run_in_executor(self._executor, self._run_batch, key, group)
            self._running = []
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * (time.perf_counter() - started)
            self._deliver(results)
        return [None] * len(jobs)


class _ReplicaHeader:
    """ASGI middleware: every response says which replica (and node) answered. `X-Request-ID` is
    left to Ray Serve's proxy, which adds it to every response (the same id: it hands the request's
    id to the replica in that header), so that clients do not get it twice."""

    def __init__(self, app: Any, value: str) -> None:
        self.app, self.header = app, (REPLICA_HEADER.lower().encode(), value.encode())

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != REQUEST_ID]
                message = {**message, "headers": [*headers, self.header]}
            await send(message)

        await self.app(scope, receive, tagged if scope["type"] == "http" else send)


@serve.ingress()
class IlfReplica:
    """One replica: `serve`'s app over this node's copy of the bundle, warmed up before it is used."""

    def __init__(self, bundle: SharedPath | Shipped, options: ServeOptions, logs: tuple[str, str]) -> None:
        import ray

        from ilf_deploy.serving.serve.logs import configure_logging

        configure_logging(logs[0], logging.getLevelName(logs[1].upper()))
        path = bundle.materialize()
        app = create_app(path, options)  # the engine: every file's hash and the digest checked
        state = app.state.ilf
        self.batcher = RayServeBatcher.replacing(state.batcher)
        state.batcher = app.state.batcher = self.batcher
        self.batcher.warm_up(state.warmup_request())
        context = serve.get_replica_context()
        node = ray.get_runtime_context().get_node_id()
        app.add_middleware(_ReplicaHeader, value=f"{context.replica_id.unique_id}@{node}")
        self._asgi = app  # not `self.app`: Ray Serve's wrapper has that name
        log.info("replica ready: %s (%s, %s)", path, bundle.how, state.bundle.digest)

    def __serve_build_asgi_app__(self) -> Any:
        return self._asgi

    def check_health(self) -> None:
        if self.batcher.warmup_error:
            raise RuntimeError(self.batcher.warmup_error)


def deployment_options(options: ServeOptions, ray_options: RayServeOptions) -> dict[str, Any]:
    """Ray Serve's options for the deployment: replicas (or the autoscaler), CPUs, concurrency."""
    batch = options.images_per_call(MIN_MAX_BATCH)  # decided by `pinned` where a bundle was read
    deployment: dict[str, Any] = {
        "name": APP,
        "ray_actor_options": {"num_cpus": ray_options.replica_cpus},
        # a replica takes every request its own queue can hold; beyond that it answers 429 itself
        "max_ongoing_requests": options.max_queue + batch,
    }
    if ray_options.autoscale is not None:
        low, high = ray_options.autoscale
        target = {"target_ongoing_requests": batch}  # a full batch per replica: add one
        deployment["autoscaling_config"] = {"min_replicas": low, "max_replicas": high, **target}
    else:
        deployment["num_replicas"] = ray_options.replicas
    return deployment


def application(bundle: SharedPath | Shipped, options: ServeOptions, ray_options: RayServeOptions) -> Any:
    """The Serve application: IlfReplica over `bundle`, `options.digest` pinned on every replica."""
    ray_options.check()
    options.check()
    assert options.digest is not None, "pin the digest: every replica must serve the same bundle"
    deployment = serve.deployment(IlfReplica).options(**deployment_options(options, ray_options))
    return deployment.bind(bundle, options, ray_options.logs)


def app_builder(args: dict[str, Any]) -> Any:
    """For `import_path: ilf_deploy.serving.scale.serve:app_builder` (KubeRay's serveConfigV2, `serve run`).

    `args`: `bundle` (a path on every node) and optionally `digest` (default: the bundle's as this
    process reads it), `backend`, `max_batch`, `max_wait_ms`, `max_queue`, `timeout_s`, `max_n`,
    `default_plan`, `replicas`, `autoscale` ("MIN:MAX"), `replica_cpus`. API keys come from the
    ILF_API_KEYS environment variable of the process that builds the application."""
    from ilf_deploy.serving.serve.auth import ENV_VAR, load_keys

    args = dict(args)
    path = str(args.pop("bundle"))
    bundle = Bundle.load(path, digest=args.pop("digest", None))
    ray_options = RayServeOptions(
        replicas=int(args.pop("replicas", 1)),
        autoscale=parse_autoscale(args.pop("autoscale", None)),
        replica_cpus=float(args.pop("replica_cpus", 1.0)),
    )
    try:
        options = ServeOptions(**ServeOptions.coerce(args), api_keys=load_keys(None, os.environ.get(ENV_VAR)))
    except TypeError as exc:
        raise ConfigError(f"app_builder: {exc}") from None
    return application(SharedPath(path), pinned(options, bundle), ray_options)


def pinned(options: ServeOptions, bundle: Bundle) -> ServeOptions:
    """The options every replica gets: the bundle's digest pinned and its batch limit decided here,
    by the policy's rule, so that the deployment's concurrency and autoscaling target match it.
    A `default_plan` no replica could resolve is refused here, in one line, before any deploys."""
    PlanBook(bundle, options.default_plan)
    return replace(
        options, digest=bundle.digest, max_batch=options.images_per_call(bundle.manifest.max_batch)
    )


def deploy(
    bundle_path: str, options: ServeOptions, ray_options: RayServeOptions, address: str, http: dict
) -> str:
    """Deploy the bundle on the cluster at `address` (Serve's proxies listen with `http`); returns
    the bundle's digest, which every replica has pinned. The application stays until `undeploy`."""
    bundle = Bundle.load(bundle_path, digest=options.digest)  # every file's hash, and the pin
    options = pinned(options, bundle)
    ray_options.check()
    options.check()
    ray = connect(address)
    serve.start(http_options=http)
    app = application(source(bundle, ray_options.ship), options, ray_options)
    try:
        serve.run(app, name=APP, route_prefix="/")  # returns once every replica is up
    except (RuntimeError, ray.exceptions.RayError) as exc:
        reason = failure() or cause(exc)
        undeploy()
        raise ConfigError(f"Ray Serve could not deploy {bundle_path}: {reason}") from None
    except KeyboardInterrupt:  # Ctrl-C while the replicas start: leave nothing behind
        undeploy()
        raise
    return bundle.digest


def failure() -> str | None:
    """Why the deployment failed, as its replicas said it (the last line of the error's message)."""
    try:
        status = serve.status().applications[APP].deployments[APP]
    except (KeyError, AttributeError):
        return None
    lines = [line.strip() for line in (status.message or "").splitlines() if line.strip()]
    errors = [line for line in lines if "Error: " in line and not line.startswith("ray.exceptions")]
    return errors[-1] if errors else (lines[-1] if lines else None)


def undeploy() -> None:
    """Delete the application (Serve itself, and other applications, stay)."""
    serve.delete(APP)
