"""The FastAPI application: OpenAI-style image generation over one bundle.

No `from __future__ import annotations` here: the generation endpoint's body type is a model built
at runtime (schema.request_model), and FastAPI must see it as an object, not a string.
"""

import asyncio
import base64
import io
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.exceptions import HTTPException

from ..errors import ConfigError
from ..runtime.bundle import Bundle
from ..runtime.generator import Generator, Request
from .batcher import Batcher, BatchKey, EngineError, Job, QueueFull, Unavailable
from .metrics import ServerMetrics
from .schema import (
    DEFAULT_GUIDANCE,
    ApiError,
    ErrorResponse,
    ImagesResponse,
    Limits,
    Validator,
    request_model,
    validation_error,
)

log = logging.getLogger("ilf_deploy.serve")

GENERATIONS = "/v1/images/generations"
ENDPOINTS = (GENERATIONS, "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")
POLL_S = 0.05  # how often a waiting request checks for a disconnected client and its deadline
ERROR_TYPES = {413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout"}


@dataclass(frozen=True)
class ServeOptions:
    backend: str = "onnxruntime"
    max_batch: int | None = None  # images per engine call; None: the bundle's max_batch, at least 8
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for company
    max_queue: int = 64  # images waiting (all requests); beyond it: 429
    timeout_s: float = 120.0  # per request, queueing included; beyond it: 504
    max_n: int = 8
    default_plan: str | None = None  # None: the bundle's first ILF plan, else its first plan
    warmup: bool = True
    max_body_bytes: int = 1 << 20

    def check(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise ConfigError(f"--max-batch must be >= 1, got {self.max_batch}")
        if not 0 <= self.max_wait_ms <= 10_000:
            raise ConfigError(f"--max-wait-ms must be in 0..10000, got {self.max_wait_ms}")
        if self.max_queue < 1:
            raise ConfigError(f"--max-queue must be >= 1, got {self.max_queue}")
        if not self.timeout_s > 0:
            raise ConfigError(f"--timeout-s must be > 0, got {self.timeout_s}")
        if not 1 <= self.max_n <= self.max_queue:
            raise ConfigError(f"--max-n must be in 1..--max-queue ({self.max_queue}), got {self.max_n}")

    def batch_limit(self, bundle: Bundle) -> int:
        # ORT segments have dynamic batch axes; a bundle's max_batch matters for fixed-shape engines.
        return self.max_batch or max(int(bundle.manifest.get("max_batch", 1)), 8)


def encode_png(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_response(error: ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


class _Observe:
    """ASGI middleware: request counts and latency by endpoint and status; a request body limit."""

    def __init__(self, app, metrics: ServerMetrics, max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
        status, started, received = 500, time.perf_counter(), 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # FastAPI re-raises HTTPExceptions from reading the body
                raise HTTPException(413, f"the request body is larger than {self.max_body} bytes")
            return message

        async def observed_send(message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            headers = dict(scope.get("headers") or [])
            length = headers.get(b"content-length", b"0")
            error = None
            if not length.isdigit():
                error = ApiError(400, "invalid Content-Length header")
            elif int(length) > self.max_body:
                error = ApiError(413, f"the request body is larger than {self.max_body} bytes")
            if error is not None:  # refused before reading a byte of the body
                await _error_response(error)(scope, receive, observed_send)
                return
            await self.app(scope, limited_receive, observed_send)
        finally:
            self.metrics.requests.inc(endpoint=endpoint, status=str(status))
            self.metrics.latency.observe(time.perf_counter() - started, endpoint=endpoint)


def create_app(
    bundle_path: str | Path, options: ServeOptions = ServeOptions(), generator: Generator | None = None
) -> FastAPI:
    """The server for one bundle; `generator` replaces the bundle's own engine (tests, wrappers)."""
    options.check()
    engine_context: Callable[[], AbstractContextManager] = nullcontext
    if generator is None:
        from ..backends import open_generator

        generator = open_generator(bundle_path, options.backend)  # checks the files' hashes
        if options.backend == "torch":
            import torch

            engine_context = torch.inference_mode
    bundle = Bundle.load(bundle_path, verify_hashes=False)
    if options.default_plan is not None and options.default_plan not in bundle.plan_names:
        raise ConfigError(
            f"--default-plan {options.default_plan!r} is not in the bundle "
            f"(it has: {', '.join(bundle.plan_names)})"
        )
    limits = Limits.from_bundle(bundle, options.max_n, options.default_plan)
    plans = {name: bundle.plan(name) for name in bundle.plan_names}
    validator = Validator(bundle, limits)
    metrics = ServerMetrics()
    max_batch = options.batch_limit(bundle)
    batcher = Batcher(
        generator, plans, metrics, max_batch, options.max_wait_ms / 1000, options.max_queue, engine_context
    )
    height, width = bundle.manifest["resolutions"][0]
    warmup_request = Request(
        prompt="" if limits.is_dit else "warm up",
        class_label=0 if limits.is_dit else None,
        guidance_scale=DEFAULT_GUIDANCE.get(limits.architecture, 4.5),  # guided: the common batch shape
        height=height,
        width=width,
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        batcher.start((limits.default_plan, warmup_request) if options.warmup else None)
        try:
            yield
        finally:
            await batcher.close()
            metrics.ready.set(0)

    app = FastAPI(
        title="ilf-deploy",
        summary=f"Image generation with the {limits.architecture} bundle {limits.model_id!r}",
        version="1",
        lifespan=lifespan,
    )
    app.state.batcher, app.state.metrics, app.state.limits = batcher, metrics, limits
    app.add_middleware(_Observe, metrics=metrics, max_body=options.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(_request, exc: ApiError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(list(exc.errors())))

    @app.exception_handler(HTTPException)
    async def _http_error(_request, exc: HTTPException) -> JSONResponse:
        kind = ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        headers = dict(exc.headers) if exc.headers else None
        return _error_response(ApiError(exc.status_code, str(exc.detail), kind, headers=headers))

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception) -> JSONResponse:  # a bug: logged, never shown
        log.error("unhandled %s: %s", type(exc).__name__, exc)
        return _error_response(ApiError(500, "internal server error", "server_error"))

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # caches it in app.openapi_schema
        for path in schema["paths"].values():  # invalid bodies are 400 here, never FastAPI's 422
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    body_model = request_model(limits)
    error_docs: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 413, 429, 500, 503, 504)
    }

    async def wait_for(jobs: list[Job], http: HttpRequest) -> list[np.ndarray]:
        gathered = asyncio.gather(*(job.future for job in jobs))
        deadline = time.monotonic() + options.timeout_s
        try:
            while True:
                remaining = deadline - time.monotonic()
                done, _ = await asyncio.wait({gathered}, timeout=max(0.0, min(POLL_S, remaining)))
                if done:
                    return gathered.result()
                if await http.is_disconnected():
                    batcher.cancel(jobs, "disconnect")
                    raise ApiError(499, "the client closed the request", "client_closed_request")
                if time.monotonic() >= deadline:
                    batcher.cancel(jobs, "timeout")
                    raise ApiError(
                        504, f"the generation did not finish within {options.timeout_s:g} s", "timeout"
                    )
        except EngineError as exc:
            batcher.cancel(jobs, "error")  # this request's images in other batches
            raise ApiError(503 if isinstance(exc, Unavailable) else 500, str(exc), "server_error") from None
        except asyncio.CancelledError:  # the server cancelled the handler (shutdown)
            batcher.cancel(jobs, "disconnect")
            raise

    @app.post(GENERATIONS, response_model=ImagesResponse, responses=error_docs, summary="Generate images")
    async def generations(body: body_model, http: HttpRequest) -> Response:  # type: ignore[valid-type]
        """OpenAI's images API plus `plan`, `guidance_scale`, `seed`, `negative_prompt`, `class_label`.

        `n` images are generated with seeds seed, seed+1, ... and may share engine batches with
        other requests of the same plan, size and guidance on/off."""
        generation = validator.generation(body)
        first = generation.requests[0]
        key = BatchKey(generation.plan, first.height or height, first.width or width, generation.guided)
        loop, now = asyncio.get_running_loop(), time.monotonic()
        jobs = [Job(key, request, loop.create_future(), now) for request in generation.requests]
        try:
            batcher.submit(jobs)
        except QueueFull as exc:
            raise ApiError(
                429,
                f"the server is busy ({batcher.queued} images queued); retry after {exc.retry_after} s",
                "rate_limit_error",
                headers={"Retry-After": str(exc.retry_after)},
            ) from None
        except Unavailable as exc:
            raise ApiError(503, str(exc), "server_error") from None
        images = await wait_for(jobs, http)
        encoded = await asyncio.to_thread(lambda: [encode_png(image) for image in images])
        return JSONResponse({"created": int(time.time()), "data": [{"b64_json": b} for b in encoded]})

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: 200 once a warm-up generation succeeded", responses={503: {}})
    async def readyz() -> JSONResponse:
        if batcher.ready:
            return JSONResponse({"status": "ready"})
        body = {"status": "failed", "error": batcher.warmup_error} if batcher.warmup_error else {}
        return JSONResponse(body or {"status": "warming up"}, status_code=503)

    @app.get("/v1/models", summary="The served bundle: plans, sizes and limits")
    async def models() -> dict:
        facts = {
            "id": limits.model_id,
            "object": "model",
            "created": int(bundle.path.joinpath("manifest.json").stat().st_mtime),
            "owned_by": "ilf-deploy",
            "architecture": limits.architecture,
            "plans": [
                {"name": p.name, "steps": p.num_steps, "block_forwards": p.block_forwards}
                for p in plans.values()
            ],
            "default_plan": limits.default_plan,
            "sizes": list(limits.sizes),
            "max_n": limits.max_n,
            "max_batch": max_batch,
            "max_prompt_tokens": limits.max_tokens,
            "precision": bundle.manifest.get("precision"),
        }
        if limits.is_dit:
            facts["num_classes"] = limits.num_classes
        return {"object": "list", "data": [facts]}

    @app.get("/metrics", response_class=PlainTextResponse, summary="Prometheus metrics")
    async def prometheus() -> PlainTextResponse:
        return PlainTextResponse(
            metrics.registry.render(), media_type="text/plain; version=0.0.4; charset=utf-8"
        )

    return app
