"""The FastAPI application: OpenAI-style image generation over one bundle.

`create_app` wires the pieces: the server's state (serving/serve/state.py: options, engine, batcher, the
request contract, metrics, per-key limiter), the routes (serving/serve/routes.py), the ASGI middleware below
(request ids, API keys, body limit, request metrics, access log), error handlers and the OpenAPI
document (whose request schema is the request contract's).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ilf_deploy.core.runtime.generator import Generator
from ilf_deploy.serving.serve.auth import ApiKeys
from ilf_deploy.serving.serve.batcher import SHUTDOWN, SHUTDOWN_RETRY_AFTER_S
from ilf_deploy.serving.serve.images import FILES_PATH
from ilf_deploy.serving.serve.logs import (
    REQUEST_ID_HEADER,
    SCOPE_KEY,
    RequestInfo,
    current_request_id,
    printable,
    request_id,
)
from ilf_deploy.serving.serve.metrics import ServerMetrics
from ilf_deploy.serving.serve.pages import ASSETS, add_pages, is_open
from ilf_deploy.serving.serve.routes import GENERATIONS, add_routes, encode_png
from ilf_deploy.serving.serve.schema import REQUEST_SCHEMA, ApiError, request_schema
from ilf_deploy.serving.serve.state import ServeOptions, ServerState

__all__ = ["ServeOptions", "create_app", "encode_png"]

log = logging.getLogger("ilf_deploy.serving.serve")
access_log = logging.getLogger("ilf_deploy.serving.serve.access")  # one line per HTTP request

ENDPOINTS = (GENERATIONS, "/v1/models", "/healthz", "/readyz", "/metrics", "/openapi.json", "/docs", "/")
PREFIXES = (FILES_PATH, ASSETS)  # their paths' metric label: the prefix (bounded label values)
OPEN_PATHS = frozenset({"/healthz", "/readyz"})  # probes need no key; every other path does, but
# the pages and their assets (no secret in them) and the image links (their random id is the secret)


def _needs_key(path: str) -> bool:
    return path not in OPEN_PATHS and not is_open(path) and not path.startswith(FILES_PATH)


SMUGGLING = "the request has both Content-Length and Transfer-Encoding (RFC 9112, section 6.1)"
ERROR_TYPES = {
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "server_error",
    504: "timeout",
}


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
    the API key check, request framing (no Content-Length beside Transfer-Encoding), the body's
    size and deadline, request counts and latency, and the access log line."""

    def __init__(
        self, app, metrics: ServerMetrics, max_body: int, keys: ApiKeys, body_timeout_s: float
    ) -> None:
        self.app, self.metrics, self.max_body, self.keys = app, metrics, max_body, keys
        self.body_timeout_s = body_timeout_s

    def _refusal(self, scope, headers: dict[bytes, bytes], info: RequestInfo) -> ApiError | None:
        """Why this request is answered before the app sees it (and before its body is read)."""
        if b"transfer-encoding" in headers and b"content-length" in headers:  # RFC 9112 6.1: smuggling
            return ApiError(400, SMUGGLING, headers={"Connection": "close"})
        if self.keys and _needs_key(scope["path"]):
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

    def _receiver(self, receive):
        """`receive` with the body limit and the body deadline (408, then the connection closes)."""
        deadline = time.monotonic() + self.body_timeout_s
        received, done = 0, False

        async def limited_receive():
            nonlocal received, done
            if done:  # the body is in: the app listens for a disconnect, no deadline
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                message = f"the request body did not arrive within {self.body_timeout_s:g} s"
                raise ApiError(
                    408, message, code="request_timeout", headers={"Connection": "close"}
                ) from None
            done = message["type"] != "http.request" or not message.get("more_body", False)
            received += len(message.get("body", b""))
            if received > self.max_body:  # FastAPI re-raises HTTPExceptions from reading the body
                raise HTTPException(413, f"the request body is larger than {self.max_body} bytes")
            return message

        return limited_receive

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        info = RequestInfo(request_id(headers.get(REQUEST_ID_HEADER.encode())))
        scope[SCOPE_KEY] = info
        context = current_request_id.set(info.request_id)  # log lines from the handlers carry it
        id_header = (REQUEST_ID_HEADER.encode(), info.request_id.encode("ascii"))
        outcome = {"status": 500, "responded": False}
        started = time.perf_counter()

        async def observed_send(message) -> None:
            if message["type"] == "http.response.start":
                outcome.update(status=message["status"], responded=True)
                message = {**message, "headers": [*message.get("headers", ()), id_header]}
            await send(message)

        try:
            error = self._refusal(scope, headers, info)
            if error is not None:  # refused before reading a byte of the body
                await _error_response(error, scope)(scope, receive, observed_send)
                return
            await self._call_app(scope, self._receiver(receive), observed_send, outcome)
        finally:
            self._record(scope, info, int(outcome["status"]), time.perf_counter() - started)
            current_request_id.reset(context)

    async def _call_app(self, scope, receive, send, outcome: dict[str, Any]) -> None:
        """The app, its failures answered in OpenAI's error shape: never uvicorn's plain-text 500."""
        try:
            await self.app(scope, receive, send)
            return
        except ApiError as exc:  # raised by `receive` outside a route's error handlers
            error = exc
        except asyncio.CancelledError:  # shutdown's last resort: uvicorn cancels what still runs
            if outcome["responded"]:
                return  # uvicorn closes the connection of an unfinished response
            error = ApiError(
                503,
                SHUTDOWN,
                "server_error",
                headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S), "Connection": "close"},
            )
        except Exception as exc:  # a bug: logged with the request id, never shown to the client
            log.exception("unhandled %s: %s", type(exc).__name__, exc)
            if outcome["responded"]:
                raise
            error = ApiError(500, "internal server error", "server_error")
        if not outcome["responded"]:
            await _error_response(error, scope)(scope, receive, send)

    def _record(self, scope, info: RequestInfo, status: int, elapsed: float) -> None:
        path = scope["path"]
        prefix = next((p for p in PREFIXES if path.startswith(p)), "other")
        endpoint = path if path in ENDPOINTS else prefix  # bounded label values
        labels: dict[str, str] = {"endpoint": endpoint, "status": str(status)}
        if info.key is not None:
            labels["key"] = info.key
        self.metrics.requests.inc(1, **labels)
        self.metrics.latency.observe(elapsed, endpoint=endpoint)
        self._log(scope, info, status, elapsed)

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


def _add_error_handlers(app: FastAPI) -> None:
    """Every error, ours or Starlette's (404, 405, 413 while reading), in OpenAI's error shape."""

    async def api_error(request: HttpRequest, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return _error_response(exc, request.scope)

    async def http_error(request: HttpRequest, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        kind = ERROR_TYPES.get(exc.status_code, "invalid_request_error")
        headers = dict(exc.headers) if exc.headers else None
        error = ApiError(exc.status_code, str(exc.detail), kind, headers=headers)
        return _error_response(error, request.scope)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(HTTPException, http_error)


def openapi_document(app: FastAPI, state: ServerState) -> dict[str, Any]:
    """FastAPI's document with the request contract's schema, and the bearer scheme when keyed."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    schema = FastAPI.openapi(app)  # caches it in app.openapi_schema
    components = schema.setdefault("components", {})
    components.setdefault("schemas", {})[REQUEST_SCHEMA] = request_schema(state.contract, state.model_id)
    if state.options.api_keys:  # documented, so that /docs offers "Authorize" and clients see the 401
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        unauthorized = {
            "description": "Missing or invalid API key",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
        }
        for route, path in schema["paths"].items():
            for operation in path.values() if _needs_key(route) else ():
                operation["security"] = [{"bearer": []}]
                operation.setdefault("responses", {})["401"] = unauthorized
    return schema


def create_app(
    bundle_path: str | Path, options: ServeOptions | None = None, generator: Generator | None = None
) -> FastAPI:
    """The server for one bundle; `generator` replaces the bundle's own engine (tests, wrappers)."""
    options = options or ServeOptions()
    state = ServerState.open(bundle_path, options, generator)
    app = FastAPI(
        title="ilf-deploy",
        summary=f"Image generation with the {state.contract.architecture} bundle {state.model_id!r}",
        version="1",
        lifespan=state.lifespan,
        docs_url=None,  # serving/serve/pages.py: Swagger UI from local files
        redoc_url=None,
    )
    app.state.ilf, app.state.batcher, app.state.metrics = state, state.batcher, state.metrics
    app.add_middleware(
        _Observe,
        metrics=state.metrics,
        max_body=options.max_body_bytes,
        keys=options.api_keys,
        body_timeout_s=options.body_timeout_s,
    )
    _add_error_handlers(app)
    add_routes(app)
    add_pages(app, f"ilf-deploy: {state.model_id}")
    app.openapi = lambda: openapi_document(app, state)  # type: ignore[method-assign]
    return app
