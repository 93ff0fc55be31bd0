"""The HTTP routes. Each handler reads the server's `ServerState` from `app.state.ilf`."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.requests import ClientDisconnect

from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.serving.serve.batcher import BatchKey, EngineError, Job, QueueFull, Unavailable
from ilf_deploy.serving.serve.images import FILES_PATH, encode_image
from ilf_deploy.serving.serve.limiter import OverLimit
from ilf_deploy.serving.serve.logs import SCOPE_KEY, RequestInfo
from ilf_deploy.serving.serve.schema import (
    REQUEST_SCHEMA,
    ApiError,
    ErrorResponse,
    ImagesResponse,
    ResponseForm,
    parse_body,
)
from ilf_deploy.serving.serve.state import ServerState

GENERATIONS = "/v1/images/generations"
POLL_S = 0.05  # how often a waiting request checks for a disconnected client and its deadline
ERROR_CODES = (400, 413, 429, 500, 503, 504)  # documented answers of a generation
# One server-sent event of `stream: true`: its `data` is an image_generation.completed JSON object
STREAM_EVENT = {
    "type": "object",
    "properties": {"event": {"const": "image_generation.completed"}, "data": {"type": "string"}},
    "required": ["data"],
}


def encode_png(image: np.ndarray) -> str:
    return base64.b64encode(encode_image(image)).decode("ascii")


def _state(http: HttpRequest) -> ServerState:
    return http.app.state.ilf


def _timing(jobs: list[Job]) -> dict[str, float]:
    """A request's queue wait (its longest-waiting image) and engine time (its batches, summed)."""
    now = time.monotonic()
    waits = [(job.started if job.started is not None else now) - job.enqueued for job in jobs]
    batches = {job.batch: job.engine_s for job in jobs if job.started is not None}
    return {"queue_wait_s": round(max(waits), 4), "engine_s": round(sum(batches.values()), 4)}


def _busy(message: str, retry_after: int) -> ApiError:
    return ApiError(429, message, "rate_limit_error", headers={"Retry-After": str(retry_after)})


def _unavailable(state: ServerState, exc: Unavailable) -> ApiError:
    """503 with Retry-After; while draining, `Connection: close` too (the next request goes elsewhere)."""
    headers = {"Retry-After": str(exc.retry_after), **({"Connection": "close"} if state.draining else {})}
    return ApiError(503, str(exc), "server_error", headers=headers)


def _submit(state: ServerState, key: BatchKey, requests: list[Request], info: RequestInfo) -> list[Job]:
    loop, now = asyncio.get_running_loop(), time.monotonic()
    jobs = [
        Job(key, request, loop.create_future(), now, request_id=info.request_id, key_name=info.key)
        for request in requests
    ]
    try:
        state.batcher.submit(jobs)
    except QueueFull as exc:
        queued = state.batcher.queued
        raise _busy(
            f"the server is busy ({queued} images queued); retry after {exc.retry_after} s", exc.retry_after
        ) from None
    except Unavailable as exc:
        raise _unavailable(state, exc) from None
    return jobs


async def _wait_for(state: ServerState, jobs: list[Job], http: HttpRequest) -> list[np.ndarray]:
    """The jobs' images; the jobs are cancelled when the client goes or the deadline passes."""
    batcher, timeout_s = state.batcher, state.options.timeout_s
    gathered = asyncio.gather(*(job.future for job in jobs))
    deadline = time.monotonic() + timeout_s
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
                raise ApiError(504, f"the generation did not finish within {timeout_s:g} s", "timeout")
    except EngineError as exc:
        batcher.cancel(jobs, "error")  # this request's images in other batches
        if isinstance(exc, Unavailable):
            raise _unavailable(state, exc) from None
        raise ApiError(500, str(exc), "server_error") from None
    except asyncio.CancelledError:  # the server cancelled the handler (shutdown)
        batcher.cancel(jobs, "disconnect")
        raise


async def generations(http: HttpRequest) -> Response:
    """OpenAI's images API plus `plan`, `guidance_scale`, `seed`, `negative_prompt`, `class_label`.

    `n` images are generated with seeds seed, seed+1, ... and may share engine batches with
    other requests of the same plan, size and guidance on/off."""
    state = _state(http)
    try:
        body = await http.body()
    except ClientDisconnect:
        raise ApiError(499, "the client closed the request", "client_closed_request") from None
    checked, form = state.check(parse_body(body, http.headers.get("content-type")))
    key, n = state.batch_key(checked), len(checked.requests)
    info: RequestInfo = http.scope[SCOPE_KEY]
    info.fields.update(plan=key.plan, size=f"{key.width}x{key.height}", n=n)
    try:
        state.limiter.acquire(info.key, n)
    except OverLimit as exc:
        state.metrics.rejected.inc(n, key=exc.key)
        retry_after = state.batcher.retry_after()
        raise _busy(
            f"this API key has {exc.held} images queued or running (at most {exc.limit}); "
            f"retry after {retry_after} s",
            retry_after,
        ) from None
    try:
        jobs = _submit(state, key, checked.requests, info)
        try:
            images = await _wait_for(state, jobs, http)
        finally:
            info.fields.update(_timing(jobs))
    finally:
        state.limiter.release(info.key, n)
    return await _respond(http, images, form, f"{key.width}x{key.height}")


async def _respond(http: HttpRequest, images: list[np.ndarray], form: ResponseForm, size: str) -> Response:
    """The images as the request asked: inline or as links, PNG/WebP/JPEG, one JSON body or SSE."""
    encoded = await asyncio.to_thread(
        lambda: [encode_image(image, form.output_format, form.compression) for image in images]
    )
    created = int(time.time())
    if form.stream:  # OpenAI's image stream: one completed event per image (no partial images)
        return StreamingResponse(_events(encoded, form, size, created), media_type="text/event-stream")
    if form.response_format == "url":
        store, base = _state(http).images, str(http.base_url).rstrip("/")
        data = [{"url": f"{base}{FILES_PATH}{store.put(image, form.output_format)}"} for image in encoded]
    else:
        data = [{"b64_json": base64.b64encode(image).decode("ascii")} for image in encoded]
    return JSONResponse({"created": created, "data": data, "output_format": form.output_format, "size": size})


def _events(encoded: list[bytes], form: ResponseForm, size: str, created: int) -> Iterator[str]:
    """Server-sent `image_generation.completed` events, as the official client parses them."""
    usage = {"input_tokens": 0, "output_tokens": 0, "total_tokens": 0}
    usage["input_tokens_details"] = {"image_tokens": 0, "text_tokens": 0}  # type: ignore[assignment]
    for image in encoded:
        event = {
            "type": "image_generation.completed",
            "b64_json": base64.b64encode(image).decode("ascii"),
            "created_at": created,
            "output_format": form.output_format,
            "background": "opaque",
            "quality": "auto",
            "size": size,
            "usage": usage,
        }
        yield f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"


async def image_file(image_id: str, http: HttpRequest) -> Response:
    """An image behind a `response_format: "url"` link, while it lasts."""
    stored = _state(http).images.get(image_id)
    if stored is None:
        raise ApiError(404, "no such image: its link expired or never existed", param="image_id")
    return Response(
        stored.data, media_type=stored.media_type, headers={"Cache-Control": "private, max-age=60"}
    )


async def healthz() -> dict[str, str]:
    return {"status": "ok"}


async def readyz(http: HttpRequest) -> JSONResponse:
    state = _state(http)
    batcher = state.batcher
    if state.draining:
        return JSONResponse({"status": "shutting down"}, status_code=503, headers={"Connection": "close"})
    if batcher.ready:
        return JSONResponse({"status": "ready"})
    body = {"status": "failed", "error": batcher.warmup_error} if batcher.warmup_error else {}
    return JSONResponse(body or {"status": "warming up"}, status_code=503)


async def models(http: HttpRequest) -> dict[str, Any]:
    return {"object": "list", "data": [_state(http).model_card()]}


async def prometheus(http: HttpRequest) -> PlainTextResponse:
    text = _state(http).metrics.registry.render()
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4; charset=utf-8")


def add_routes(app: FastAPI) -> None:
    body = {"$ref": f"#/components/schemas/{REQUEST_SCHEMA}"}  # the schema: `openapi` adds it
    app.add_api_route(
        GENERATIONS,
        generations,
        methods=["POST"],
        response_model=ImagesResponse,
        responses={
            200: {"content": {"text/event-stream": {"schema": STREAM_EVENT}}},  # stream: true
            **{code: {"model": ErrorResponse} for code in ERROR_CODES},
        },
        summary="Generate images",
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {"schema": body}}}},
    )
    app.add_api_route(
        FILES_PATH + "{image_id}",
        image_file,
        methods=["GET"],
        response_class=Response,
        responses={200: {"content": {"image/png": {}}}, 404: {"model": ErrorResponse}},
        summary='An image of a `response_format: "url"` answer (for serve --url-ttl-s seconds)',
    )
    app.add_api_route("/healthz", healthz, methods=["GET"], summary="Liveness")
    app.add_api_route(
        "/readyz",
        readyz,
        methods=["GET"],
        summary="Readiness: 200 once a warm-up generation succeeded",
        responses={503: {}},
    )
    app.add_api_route(
        "/v1/models", models, methods=["GET"], summary="The served bundle: plans, sizes and limits"
    )
    app.add_api_route(
        "/metrics",
        prometheus,
        methods=["GET"],
        response_class=PlainTextResponse,
        summary="Prometheus metrics",
    )
