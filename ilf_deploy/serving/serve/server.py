"""`ilf-deploy serve`'s HTTP server: uvicorn's HTTP protocol behind our connection layer, and a
shutdown that drains.

`IlfServer` is a `uvicorn.Server` whose listening sockets are `connections.Listener`s (header
deadline, connection cap, throttled accept errors; see that module for why uvicorn's own accept
loop is not used) and whose shutdown, on SIGTERM or SIGINT, goes:

1. stop accepting (the listening socket closes); `/readyz` answers 503;
2. every queued image fails at once: its request gets a JSON 503 with `Retry-After`;
3. the batch in the engine may finish for up to `drain_s`, then stops at its next step;
4. uvicorn's own shutdown: idle connections close, handlers still running get `GRACE_S`, then
   are cancelled (the middleware answers them a JSON 503, never uvicorn's plain-text 500);
5. the lifespan ends (the engine thread stops) and the process exits with status 0.

A second signal skips the waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.serving.serve.connections import ConnectionTable, Listener, TrackedApp, error_bytes
from ilf_deploy.serving.serve.logs import FloodFilter
from ilf_deploy.serving.serve.state import ServeOptions, ServerState

log = logging.getLogger("ilf_deploy.serving.serve")

BACKLOG = 2048  # the kernel's queue of connections not yet accepted
GRACE_S = 3.0  # after the drain: how long handlers may still take (encoding the last images)
KEEP_ALIVE_S = 5  # an idle kept-alive connection is closed after this (uvicorn's default)
SIGNALS = (signal.SIGINT, signal.SIGTERM)
INVALID_HTTP = "the request is not valid HTTP/1.1 (its request line, headers or framing)"
UVICORN_FLOODS = ("Invalid HTTP request received.", "Unsupported upgrade request.")


class JsonH11Protocol(H11Protocol):
    """uvicorn's h11 protocol, answering a request h11 cannot parse with OpenAI's JSON error
    (then closing, as uvicorn does) instead of a plain-text 400."""

    def send_400_response(self, msg: str) -> None:
        self.transport.write(error_bytes(400, INVALID_HTTP))
        self.transport.close()


def listen(host: str, port: int, backlog: int = BACKLOG) -> socket.socket:
    """A listening TCP socket on host:port (port 0: a free one), or a one-line ConfigError."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
            sock.listen(backlog)
        except OSError:
            sock.close()
            raise
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


class IlfServer(uvicorn.Server):
    """uvicorn's server with our listeners and our shutdown (the module docstring)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        errors = logging.getLogger("uvicorn.error")  # one line per bad request: throttled
        if not any(isinstance(f, FloodFilter) for f in errors.filters):
            errors.addFilter(FloodFilter(UVICORN_FLOODS))
        state = getattr(getattr(config.app, "state", None), "ilf", None)
        self.ilf: ServerState | None = state if isinstance(state, ServerState) else None
        self.options = self.ilf.options if self.ilf is not None else ServeOptions()
        metrics = self.ilf.metrics if self.ilf is not None else None
        self.table = ConnectionTable(self.options.connection_limit(), metrics)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGINT and SIGTERM start the drain (a second one skips the waiting); unlike uvicorn's,
        the signal is not raised again afterwards, so a drained server exits with status 0."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._on_signal) for sig in SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, sig: int, _frame: Any) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            sys.exit(3)  # uvicorn's STARTUP_FAILURE: the lifespan failed and logged why
        config = self.config
        config.loaded_app = TrackedApp(config.loaded_app, self.table)

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        timeout = self.options.header_timeout_s
        listeners = [Listener(sock, protocol, self.table, timeout, config.ssl) for sock in sockets or []]
        for listener in listeners:
            listener.start()
        self.servers = listeners  # type: ignore[assignment]  # uvicorn closes them as it closes servers
        for sock in sockets or []:
            host, port = sock.getsockname()[:2]
            shown = f"[{host}]" if ":" in host else host
            log.info(
                "listening on %s://%s:%d",
                "https" if config.ssl else "http",
                shown,
                port,
                extra={"fields": self._limits()},
            )
        self.started = True

    def _limits(self) -> dict[str, Any]:
        options = self.options
        return {
            "max_connections": self.table.limit,
            "header_timeout_s": options.header_timeout_s,
            "body_timeout_s": options.body_timeout_s,
            "drain_s": options.drain_s,
        }

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for listener in self.servers:
            listener.close()  # stop accepting
        if self.ilf is not None:
            await self._drain(self.ilf)
        await super().shutdown(sockets)

    async def _drain(self, state: ServerState) -> None:
        queued = state.batcher.queued
        state.begin_drain()
        log.info(
            "shutting down: not accepting, not ready; queued images answered 503",
            extra={"fields": {"queued": queued, "drain_s": self.options.drain_s}},
        )
        deadline = time.monotonic() + self.options.drain_s
        while state.batcher.busy and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(0.02)
        if state.batcher.busy:
            log.warning("the batch in the engine did not finish within --drain-s: stopped")
        state.batcher.stop()


def server_config(app: Any, log_level: str = "info", **kwargs: Any) -> uvicorn.Config:
    """uvicorn's settings for our server: h11 (whose parsing the tests check; httptools, when
    installed, would be uvicorn's choice), no websockets, asyncio's loop, our logging
    (serving/serve/logs.py) and access log; the limits are the connection layer's."""
    return uvicorn.Config(
        app,
        http=JsonH11Protocol,
        ws="none",
        loop="asyncio",
        log_level=log_level,
        log_config=None,  # keep configure_logging's handlers
        access_log=False,  # the server logs each request itself, with its id and key name
        timeout_graceful_shutdown=int(GRACE_S),
        timeout_keep_alive=KEEP_ALIVE_S,
        **kwargs,
    )


def run_server(
    app: Any,
    host: str,
    port: int,
    log_level: str = "info",
    ssl_keyfile: str | None = None,
    ssl_certfile: str | None = None,
) -> None:
    """Serve `app` on host:port until SIGINT/SIGTERM, then drain (the module docstring)."""
    sock = listen(host, port)
    config = server_config(app, log_level, ssl_keyfile=ssl_keyfile, ssl_certfile=ssl_certfile)
    try:
        IlfServer(config).run(sockets=[sock])
    finally:
        sock.close()
