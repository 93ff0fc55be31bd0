"""The connection layer under uvicorn: accepting, a cap on open connections, header timeouts.

uvicorn (0.54, h11) has none of what a server facing hostile clients needs: no deadline for a
request's headers or body (its keep-alive timer is cancelled by any byte, so a client sending one
header byte every 2 s holds its connection forever), no cap on open connections below the
descriptor limit (`--limit-concurrency` answers 503 but still accepts), and it accepts through
asyncio's `Server`, whose accept loop (CPython 3.10-3.13, `selector_events._accept_connection`),
once out of descriptors, logs "socket.accept() out of system resource" with a traceback and
schedules a retry for each of up to `backlog` (2048) attempts per readiness event: the log grew by
100 MB in 20 s. So `serve` accepts connections itself (`Listener`) and hands each socket to
uvicorn's own protocol through `loop.connect_accepted_socket`, wrapped in `GuardedProtocol`:

- **Header deadline.** A connection that is not in a request (new, or kept alive after a response)
  must complete its next request's headers within `header_timeout_s`; else it is closed, with a
  JSON 408 first when it sent part of a request (silently when it sent nothing: an idle keep-alive
  connection). The body deadline is the app's (`serving/serve/app.py`: 408 through the middleware).
- **Connection cap.** At `max_connections` (default below `ulimit -n`), a new connection takes the
  place of the connection that has been idle longest without a complete request: first one that
  sent nothing (a new connection once `EVICT_GRACE_S` old, an idle keep-alive one), then one whose
  partial request stalled (no byte for `STALLED_S`). Never one in a request (its headers read:
  queued or running) or whose request is being read (bytes within `STALLED_S`), nor one accepted
  so recently that its first bytes may not have been read yet: a reconnect storm of slow clients
  evicts its own connections, not a normal client's. When nothing can be evicted, accepting pauses
  until a connection closes or for `EVICT_RETRY_S` (waiting connections stay in the backlog).
- **Accept errors** are logged at most once per `throttle.LOG_INTERVAL_S`, with the count of what the line
  stands for. Out of descriptors below the cap (other files open), the cap drops to what is open
  less a margin, a connection is freed as above, and accepting pauses briefly.

Which connection an HTTP request came on is known from the client address in its ASGI scope
(`TrackedApp`, outside every other middleware, sees it before any proxy-header rewrite).
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from ilf_deploy.core.throttle import Throttled
from ilf_deploy.serving.serve.schema import ApiError

log = logging.getLogger("ilf_deploy.serving.serve.connections")

ACCEPT_BATCH = 64  # accepts per readiness event of the listening socket
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
RETRY_S = 0.05  # after freeing a descriptor: try accepting again this soon
PAUSE_S = 1.0  # out of descriptors with nothing to free: this long
MAX_CONNECTIONS = 1024  # the default cap where the descriptor limit allows it
DESCRIPTOR_RESERVE = 64  # descriptors kept for everything but connections (engine, logs, threads)
MIN_FREE_DESCRIPTORS = 16  # an explicit --max-connections leaves at least this many
EVICT_GRACE_S = 1.0  # a new connection's first bytes may take this long to arrive and be read
STALLED_S = 1.0  # a partial request with no byte for this long is no longer being read
EVICT_RETRY_S = 0.1  # at the cap with nothing to evict: try again this soon


def descriptor_limit() -> int | None:
    """The soft limit on open files (`ulimit -n`), or None when there is none to read."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def default_max_connections(limit: int | None = None) -> int:
    """`MAX_CONNECTIONS`, or fewer under a low descriptor limit (256 -> 192)."""
    limit = descriptor_limit() if limit is None else limit
    if limit is None:
        return MAX_CONNECTIONS
    return max(8, min(MAX_CONNECTIONS, limit - max(DESCRIPTOR_RESERVE, limit // 8)))


def error_bytes(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response with OpenAI's error body, then `Connection: close`."""
    error = ApiError(status, message, code=HTTPStatus(status).name.lower())
    body = json.dumps(error.body(), separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


@dataclass(eq=False)
class Connection:
    """One accepted TCP connection: whether it is in a request, and since when it is not."""

    idle_since: float  # monotonic: accepted, or its last response ended
    transport: asyncio.Transport | None = None  # None until connected (TLS: after the handshake)
    peer: tuple[str, int] | None = None
    busy: int = 0  # requests in progress on it (h11: 0 or 1)
    received: int = 0  # bytes received since idle_since
    last_byte: float = 0.0  # monotonic: when the last bytes arrived
    closing: bool = False


class ConnectionTable:
    """The open connections, the cap on them and the header deadline."""

    def __init__(self, limit: int, metrics: Any = None, throttle: Throttled | None = None) -> None:
        self.limit, self.metrics = limit, metrics
        self.throttle = throttle or Throttled(log)
        self.on_release: Callable[[], None] = lambda: None  # a place came free (the listener resumes)
        self._open: dict[Connection, None] = {}  # insertion-ordered
        self._by_peer: dict[tuple[str, int], Connection] = {}
        self._active = 0  # open and not closing

    def __len__(self) -> int:
        return self._active

    def full(self) -> bool:
        return self._active >= self.limit

    def add(self, conn: Connection) -> None:
        self._open[conn] = None
        self._active += 1
        self._gauge()

    def connected(self, conn: Connection, transport: asyncio.Transport, peer: Any) -> None:
        conn.transport, conn.idle_since = transport, time.monotonic()
        if isinstance(peer, tuple) and len(peer) >= 2:
            conn.peer = (str(peer[0]), int(peer[1]))
            self._by_peer[conn.peer] = conn

    def remove(self, conn: Connection) -> None:
        if conn not in self._open:
            return
        del self._open[conn]
        if conn.peer is not None and self._by_peer.get(conn.peer) is conn:
            del self._by_peer[conn.peer]
        if not conn.closing:
            self._active -= 1
        self._gauge()
        self.on_release()

    def lookup(self, client: Any) -> Connection | None:
        """The connection an ASGI scope's `client` came on."""
        if not isinstance(client, list | tuple) or len(client) < 2:
            return None
        return self._by_peer.get((str(client[0]), int(client[1])))

    # -- requests (TrackedApp) -------------------------------------------------------------------
    @staticmethod
    def begin(conn: Connection) -> None:
        conn.busy += 1

    @staticmethod
    def end(conn: Connection) -> None:
        conn.busy -= 1
        if conn.busy == 0:
            conn.idle_since, conn.received = time.monotonic(), 0

    # -- closing ---------------------------------------------------------------------------------
    def close(self, conn: Connection, status: int, message: str, reason: str) -> None:
        """Close `conn`; a client that sent part of a request gets the error response first."""
        if conn.closing:
            return
        conn.closing = True
        self._active -= 1
        if self.metrics is not None:
            self.metrics.closed_connections.inc(reason=reason)
        transport = conn.transport
        if transport is None or transport.is_closing():
            return
        if conn.received:
            transport.write(error_bytes(status, message))
        if transport.get_write_buffer_size():  # a client that does not read: do not wait for it
            transport.abort()
        else:
            transport.close()

    def shrink(self) -> int:
        """The descriptors ran out below the cap (other files are open): the cap becomes what is
        open now, less `MIN_FREE_DESCRIPTORS`; returns it."""
        self.limit = min(self.limit, max(8, self._active - MIN_FREE_DESCRIPTORS))
        return self.limit

    def evictable(self, now: float) -> Connection | None:
        """The connection to close for a new one: idle longest with nothing sent (past its grace),
        else the longest-stalled partial request; None when every connection is in a request,
        being read or new."""
        silent, stalled = [], []
        for c in self._open:
            if c.busy or c.closing or c.transport is None:
                continue  # in a request (queued, running), or still connecting
            if not c.received and now - c.idle_since >= EVICT_GRACE_S:
                silent.append(c)
            elif c.received and now - c.last_byte >= STALLED_S:
                stalled.append(c)
        if silent:
            return min(silent, key=lambda c: c.idle_since)
        return min(stalled, key=lambda c: c.last_byte) if stalled else None

    def evict(self) -> bool:
        """Close the connection `evictable` picks (to make room); False when there is none."""
        oldest = self.evictable(time.monotonic())
        if oldest is None:
            return False
        self.close(oldest, 503, "the server has too many open connections; retry later", "limit")
        self.throttle.event("evicted", f"connection limit ({self.limit}) reached: closed idle connections")
        return True

    def sweep(self, timeout_s: float) -> None:
        """Close every connection that has not completed a request's headers within `timeout_s`."""
        deadline = time.monotonic() - timeout_s
        late = [c for c in self._open if not (c.busy or c.closing) and c.idle_since < deadline]
        message = f"the request headers did not arrive within {timeout_s:g} s"
        for conn in late:
            self.close(conn, 408, message, "header_timeout")
        if late:
            self.throttle.event("header_timeout", f"closed connections: {message}", len(late))
        self.throttle.flush()

    def _gauge(self) -> None:
        if self.metrics is not None:
            self.metrics.open_connections.set(len(self._open))


class GuardedProtocol(asyncio.Protocol):
    """uvicorn's protocol for one connection, with the bytes it receives counted."""

    def __init__(self, inner: asyncio.Protocol, table: ConnectionTable, conn: Connection) -> None:
        self.inner, self.table, self.conn = inner, table, conn

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self.table.connected(self.conn, transport, transport.get_extra_info("peername"))
        self.inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        self.conn.received += len(data)
        self.conn.last_byte = time.monotonic()
        self.inner.data_received(data)  # type: ignore[attr-defined]

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()  # type: ignore[attr-defined]

    def connection_lost(self, exc: Exception | None) -> None:
        self.table.remove(self.conn)
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class TrackedApp:
    """The outermost ASGI layer: marks a connection busy from a request's headers to its end."""

    def __init__(self, app: Any, table: ConnectionTable) -> None:
        self.app, self.table = app, table

    async def __call__(self, scope, receive, send) -> None:
        conn = self.table.lookup(scope.get("client")) if scope["type"] == "http" else None
        if conn is None:
            await self.app(scope, receive, send)
            return
        self.table.begin(conn)
        try:
            await self.app(scope, receive, send)
        finally:
            self.table.end(conn)


class Listener:
    """The accept loop of one listening socket, in front of uvicorn's protocol; it closes as an
    `asyncio.Server` does (`close`, `wait_closed`), which is all uvicorn asks of its servers."""

    def __init__(
        self,
        sock,
        protocol_factory: Callable[[], asyncio.Protocol],
        table: ConnectionTable,
        header_timeout_s: float,
        ssl: Any = None,
    ) -> None:
        self.sock, self.factory, self.table, self.ssl = sock, protocol_factory, table, ssl
        self.header_timeout_s = header_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reading = self._closed = False
        self._sweeper: asyncio.Task | None = None
        self._connecting: set[asyncio.Task] = set()

    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.sock.setblocking(False)
        self.table.on_release = self._resume
        self._resume()
        self._sweeper = self._loop.create_task(self._sweep(), name="ilf-connections")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._pause()
        self.sock.close()
        if self._sweeper is not None:
            self._sweeper.cancel()

    async def wait_closed(self) -> None:
        tasks = [*self._connecting, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:  # handshakes still under way, and the sweeper
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- accepting -------------------------------------------------------------------------------
    def _resume(self) -> None:
        if not (self._closed or self._reading) and self._loop is not None:
            self._loop.add_reader(self.sock.fileno(), self._accept)
            self._reading = True

    def _pause(self, retry_s: float | None = None) -> None:
        if self._reading and self._loop is not None:
            self._loop.remove_reader(self.sock.fileno())
            self._reading = False
        if retry_s is not None and self._loop is not None:
            self._loop.call_later(retry_s, self._resume)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            if self.table.full() and not self.table.evict():
                # every connection in a request, being read or new: resumed when one closes, or soon
                self._pause(EVICT_RETRY_S)
                return
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._accept_failed(exc)
                return
            sock.setblocking(False)
            conn = Connection(time.monotonic())
            self.table.add(conn)
            assert self._loop is not None
            task = self._loop.create_task(self._connect(sock, conn))
            self._connecting.add(task)
            task.add_done_callback(self._connecting.discard)

    def _accept_failed(self, exc: OSError) -> None:
        name = errno.errorcode.get(exc.errno or 0, "error")
        if self.table.metrics is not None:
            self.table.metrics.accept_errors.inc(errno=name)
        message = f"accepting a connection failed: {exc.strerror or exc}"
        if exc.errno in RESOURCE_ERRNOS:  # out of descriptors below the cap: lower it, free one
            message += f"; at most {self.table.shrink()} connections from now on"
            self._pause(RETRY_S if self.table.evict() else PAUSE_S)
        self.table.throttle.event(f"accept {name}", message)

    async def _connect(self, sock, conn: Connection) -> None:
        assert self._loop is not None
        try:
            await self._loop.connect_accepted_socket(
                lambda: GuardedProtocol(self.factory(), self.table, conn),
                sock,
                ssl=self.ssl,
                ssl_handshake_timeout=self.header_timeout_s if self.ssl is not None else None,
            )
        except (OSError, asyncio.TimeoutError) as exc:  # a TLS handshake that failed or timed out
            sock.close()
            self.table.remove(conn)
            self.table.throttle.event("handshake", f"TLS handshake failed: {type(exc).__name__}")
        except asyncio.CancelledError:
            sock.close()
            self.table.remove(conn)
            raise

    async def _sweep(self) -> None:
        period = min(1.0, self.header_timeout_s / 4)
        while True:
            await asyncio.sleep(period)
            self.table.sweep(self.header_timeout_s)
