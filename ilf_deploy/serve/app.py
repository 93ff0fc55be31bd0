"""The FastAPI application: OpenAI-style image generation over one bundle.

No `from __future__ import annotations` here: the generation endpoint's body type is a model built
at runtime (schema.request_model), and FastAPI must see it as an object, not a string.
"""

import asyncio
import base64
import io
import logging
import time
from collections.abc import AsyncIterator, Callable, MutableMapping
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from dataclasses import dataclass, field
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
from .auth import ApiKeys
from .batcher import Batcher, BatchKey, EngineError, Job, QueueFull, Unavailable
from .logs import REQUEST_ID_HEADER, SCOPE_KEY, RequestInfo, current_request_id, printable, request_id
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
access_log = logging.getLogger("ilf_deploy.serve.access")  # one line per HTTP request

GENERATIONS = "/v1/images/generations"
ENDPOINTS = (GENERATIONS, "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs")
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes need no key; every other path does
POLL_S = 0.05  # how often a waiting request checks for a disconnected client and its deadline
ERROR_TYPES = {413: "invalid_request_error", 429: "rate_limit_error", 503: "server_error", 504: "timeout"}


@dataclass(frozen=True)
class ServeOptions:
    backend: str = "auto"  # `ilf-deploy tune`'s winner on this machine, else ONNX Runtime fp32
    max_batch: int | None = None  # images per engine call; None: the bundle's max_batch, at least 8
    max_wait_ms: float = 10.0  # how long the first image of a batch waits for company
    max_queue: int = 64  # images waiting (all requests); beyond it: 429
    timeout_s: float = 120.0  # per request, queueing included; beyond it: 504
    max_n: int = 8
    default_plan: str | None = None  # None: the bundle's first ILF plan, else its first plan
    warmup: bool = True
    max_body_bytes: int = 1 << 20
    # No keys: no authentication (the default, for loopback use).
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    max_inflight_per_key: int | None = None  # images one key may have queued or running; beyond: 429

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
        if self.max_inflight_per_key is not None:
            if not self.api_keys:
                raise ConfigError(
                    "--max-inflight-per-key needs API keys (--api-key-file FILE or ILF_API_KEYS)"
                )
            if self.max_inflight_per_key < self.max_n:  # else an `n = max_n` request could never pass
                raise ConfigError(
                    f"--max-inflight-per-key must be >= --max-n ({self.max_n}), "
                    f"got {self.max_inflight_per_key}"
                )

    def batch_limit(self, bundle: Bundle) -> int:
        # ORT segments have dynamic batch axes; a bundle's max_batch matters for fixed-shape engines.
        return self.max_batch or max(bundle.manifest.max_batch, 8)


def encode_png(image: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _error_response(error: ApiError, scope: MutableMapping[str, Any] | None = None) -> JSONResponse:
    info = scope.get(SCOPE_KEY) if scope is not None else None
    if info is not None:  # the access log line says why
        info.fields["error"] = error.message
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _unauthorized(authorization: bytes | None) -> ApiError:
    if authorization is None:
        message, code, challenge = "missing API key: send the header 'Authorization: Bearer KEY'", "", ""
    else:  # never echo what was sent: it may be a real key with a typo
        message, code, challenge = "invalid API key", "invalid_api_key", ' error="invalid_token"'
    headers = {"WWW-Authenticate": f"Bearer{challenge}"}  # RFC 6750
    return ApiError(401, message, "invalid_request_error", headers=headers, code=code or "missing_api_key")


class _Observe:
    """ASGI middleware around every request: its id (`X-Request-ID`, returned on every response),
    the API key check, a body limit, request counts and latency, and the access log line."""

    def __init__(self, app, metrics: ServerMetrics, max_body: int, keys: ApiKeys) -> None:
        self.app, self.metrics, self.max_body, self.keys = app, metrics, max_body, keys

    def _refusal(self, scope, headers: dict[bytes, bytes], info: RequestInfo) -> ApiError | None:
        """Why this request is answered before the app sees it (and before its body is read)."""
        if self.keys and scope["path"] not in OPEN_PATHS:
            authorization = headers.get(b"authorization")
            info.key = self.keys.identify(authorization.decode("latin-1") if authorization else None)
            if info.key is None:
                return _unauthorized(authorization)
        length = headers.get(b"content-length", b"0")
        if not length.isdigit():
            return ApiError(400, "invalid Content-Length header")
        if int(length) > self.max_body:
            return ApiError(413, f"the request body is larger than {self.max_body} bytes")
        return None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"  # bounded label values
        headers = dict(scope.get("headers") or [])
        info = RequestInfo(request_id(headers.get(REQUEST_ID_HEADER.encode())))
        scope[SCOPE_KEY] = info
        context = current_request_id.set(info.request_id)  # log lines from the handlers carry it
        id_header = (REQUEST_ID_HEADER.encode(), info.request_id.encode("ascii"))
        status, started, received, responded = 500, time.perf_counter(), 0, False

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:  # FastAPI re-raises HTTPExceptions from reading the body
                raise HTTPException(413, f"the request body is larger than {self.max_body} bytes")
            return message

        async def observed_send(message) -> None:
            nonlocal status, responded
            if message["type"] == "http.response.start":
                status, responded = message["status"], True
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        try:
            error = self._refusal(scope, headers, info)
            if error is not None:  # refused before reading a byte of the body
                await _error_response(error, scope)(scope, receive, observed_send)
                return
            await self.app(scope, limited_receive, observed_send)
        except Exception as exc:  # a bug: logged with the request id, never shown to the client
            log.exception("unhandled %s: %s", type(exc).__name__, exc)
            if responded:
                raise
            error = ApiError(500, "internal server error", "server_error")
            await _error_response(error, scope)(scope, receive, observed_send)
        finally:
            elapsed = time.perf_counter() - started
            labels: dict[str, str] = {"endpoint": endpoint, "status": str(status)}
            if info.key is not None:
                labels["key"] = info.key
            self.metrics.requests.inc(1, **labels)
            self.metrics.latency.observe(elapsed, endpoint=endpoint)
            self._log(scope, info, status, elapsed)
            current_request_id.reset(context)

    @staticmethod
    def _log(scope, info: RequestInfo, status: int, elapsed: float) -> None:
        client = scope.get("client")
        method, path = scope["method"], printable(scope["path"])
        fields = {
            "request_id": info.request_id,
            "key": info.key,
            "client": f"{client[0]}:{client[1]}" if client else None,
            "method": method,
            "path": path,
            "status": status,
            "duration_s": round(elapsed, 4),
            **info.fields,
        }
        level = logging.WARNING if status >= 500 else logging.INFO
        extra = {"fields": fields, "in_message": ("method", "path", "status")}
        access_log.log(level, "%s %s %d", method, path, status, extra=extra)


def _timing(jobs: list[Job]) -> dict[str, float]:
    """A request's queue wait (its longest-waiting image) and engine time (its batches, summed)."""
    now = time.monotonic()
    waits = [(job.started if job.started is not None else now) - job.enqueued for job in jobs]
    batches = {job.batch: job.engine_s for job in jobs if job.started is not None}
    return {"queue_wait_s": round(max(waits), 4), "engine_s": round(sum(batches.values()), 4)}


def create_app(
    bundle_path: str | Path, options: ServeOptions = ServeOptions(), generator: Generator | None = None
) -> FastAPI:
    """The server for one bundle; `generator` replaces the bundle's own engine (tests, wrappers)."""
    options.check()
    if generator is None:
        from ..backends import open_generator

        generator = open_generator(bundle_path, options.backend)  # checks the files' hashes
    # the backend's own scope for engine work (torch: inference mode); test doubles may have none
    engine_context: Callable[[], AbstractContextManager] = getattr(
        generator, "inference_context", nullcontext
    )
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
    height, width = bundle.manifest.default_size
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
    app.add_middleware(_Observe, metrics=metrics, max_body=options.max_body_bytes, keys=options.api_keys)

    @app.exception_handler(ApiError)
    async def _api_error(request: HttpRequest, exc: ApiError) -> JSONResponse:
        return _error_response(exc, request.scope)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        return _error_response(validation_error(list(exc.errors())), request.scope)

    @app.exception_handler(HTTPException)
    async def _http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
        kind = ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        headers = dict(exc.headers) if exc.headers else None
        return _error_response(
            ApiError(exc.status_code, str(exc.detail), kind, headers=headers), request.scope
        )

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = FastAPI.openapi(app)  # caches it in app.openapi_schema
        for path in schema["paths"].values():  # invalid bodies are 400 here, never FastAPI's 422
            for operation in path.values():
                operation.get("responses", {}).pop("422", None)
        for name in ("HTTPValidationError", "ValidationError"):
            schema.get("components", {}).get("schemas", {}).pop(name, None)
        if options.api_keys:  # documented, so that /docs offers "Authorize" and clients see the 401
            schema.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            unauthorized = {
                "description": "Missing or invalid API key",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
            }
            for route, path in schema["paths"].items():
                for operation in path.values() if route not in OPEN_PATHS else ():
                    operation["security"] = [{"bearer": []}]
                    operation.setdefault("responses", {})["401"] = unauthorized
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
    body_model = request_model(limits)
    error_docs: dict[int | str, dict[str, Any]] = {
        code: {"model": ErrorResponse} for code in (400, 413, 429, 500, 503, 504)
    }

    inflight: dict[str, int] = {}  # images queued or running, by key name (the event loop's only)

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
        n = len(generation.requests)
        info: RequestInfo = http.scope[SCOPE_KEY]
        info.fields.update(plan=key.plan, size=f"{key.width}x{key.height}", n=n)
        key_name = info.key
        limit = options.max_inflight_per_key
        held = inflight.get(key_name, 0) if key_name is not None else 0
        if limit is not None and key_name is not None and held + n > limit:
            metrics.rejected.inc(n, key=key_name)
            retry_after = batcher.retry_after()
            raise ApiError(
                429,
                f"this API key has {held} images queued or running (at most {limit}); "
                f"retry after {retry_after} s",
                "rate_limit_error",
                headers={"Retry-After": str(retry_after)},
            )
        loop, now = asyncio.get_running_loop(), time.monotonic()
        jobs = [
            Job(key, request, loop.create_future(), now, request_id=info.request_id, key_name=key_name)
            for request in generation.requests
        ]
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
        if key_name is not None:
            inflight[key_name] = held + n
        try:
            images = await wait_for(jobs, http)
        finally:
            if key_name is not None:
                inflight[key_name] -= n
            info.fields.update(_timing(jobs))
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
            "precision": bundle.manifest.precision,
            "digest": bundle.digest,
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
