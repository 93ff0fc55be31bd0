"""`ilf-deploy serve` against hostile clients, descriptor exhaustion and shutdown with queued work.

Real servers: `ilf-deploy serve` subprocesses on a tiny bundle, on 127.0.0.1 only (port 0: the log
says which), driven by raw sockets for the slow clients. Every loop is bounded in count and time;
the timeouts tested are functional behaviour with generous margins, not performance targets.
"""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.model.tiny import make_tiny_pipeline

GEN = "/v1/images/generations"
HOST = "127.0.0.1"  # loopback only, never any other address
LISTENING = re.compile(rb"listening on http://127\.0\.0\.1:(\d+)")
STATUS_LINE = re.compile(rb"^HTTP/1\.1 (\d{3}) ", re.MULTILINE)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-2", "base-50")))


# -- servers -------------------------------------------------------------------------------------------
@dataclass
class Served:
    process: subprocess.Popen
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def log_size(self) -> int:
        return self.log.stat().st_size


def _limit_descriptors(count: int):
    def apply() -> None:  # in the child, before exec: `ulimit -n COUNT`
        resource.setrlimit(resource.RLIMIT_NOFILE, (count, count))

    return apply


@contextmanager
def served(bundle: Path, log: Path, *args: str, nofile: int | None = None) -> Iterator[Served]:
    """`ilf-deploy serve BUNDLE --port 0 ARGS` until the block ends (then SIGTERM, or kill)."""
    command = [str(Path(sys.executable).parent / "ilf-deploy"), "serve", str(bundle), "--host", HOST]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*command, "--port", "0", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_limit_descriptors(nofile) if nofile else None,
        )
    try:
        server = Served(process, _wait_listening(process, log), log)
        deadline = time.monotonic() + 60
        while httpx.get(f"{server.url}/readyz", timeout=10).status_code != 200:
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _wait_listening(process: subprocess.Popen, log: Path) -> int:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        match = LISTENING.search(log.read_bytes())
        if match:
            return int(match.group(1))
        assert process.poll() is None, log.read_text()[-2000:]
        time.sleep(0.05)
    raise AssertionError(f"the server never listened:\n{log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server(bundle, tmp_path_factory) -> Iterator[Served]:
    log = tmp_path_factory.mktemp("robust-log") / "serve.log"
    with served(bundle, log, "--header-timeout-s", "3", "--body-timeout-s", "3") as running:
        yield running


def normal_requests(url: str) -> float:
    """A health check and a generation, both 200; returns how long they took."""
    started = time.monotonic()
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    body = {"prompt": "a red circle", "plan": "base-2", "seed": 1}
    response = httpx.post(f"{url}{GEN}", json=body, timeout=20)
    assert response.status_code == 200, response.text
    return time.monotonic() - started


def metric(url: str, sample: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{re.escape(sample)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# -- raw clients ---------------------------------------------------------------------------------------
@dataclass(eq=False)
class Raw:
    sock: socket.socket
    data: bytes  # what it sends, `per_tick` bytes at a time
    per_tick: int = 1
    sent: int = 0
    received: bytes = b""
    closed_at: float | None = None  # monotonic: when the server closed it


@dataclass
class Clients:
    """Raw connections that send their bytes slowly; records what each got and when it closed."""

    clients: list[Raw] = field(default_factory=list)

    @classmethod
    def connect(cls, port: int, count: int, data: bytes, first: int = 1) -> Clients:
        clients = cls()
        for _ in range(count):
            sock = socket.create_connection((HOST, port), timeout=5)
            sock.setblocking(False)
            client = Raw(sock, data)
            clients.clients.append(client)
            clients._send(client, first)
        return clients

    def _send(self, client: Raw, count: int) -> None:
        chunk = client.data[client.sent : client.sent + count]
        if not chunk or client.closed_at is not None:
            return
        try:
            client.sent += client.sock.send(chunk)
        except OSError:  # reset by the server: recorded as closed
            client.closed_at = client.closed_at or time.monotonic()

    def run(self, seconds: float, period_s: float, during=None) -> None:
        """Trickle bytes every `period_s` and read whatever comes, for at most `seconds` or
        until every client is closed; `during(elapsed)` runs once per tick."""
        selector = selectors.DefaultSelector()
        for client in self.clients:
            selector.register(client.sock, selectors.EVENT_READ, client)
        started = next_tick = time.monotonic()
        try:
            while time.monotonic() - started < seconds and self.open:
                for key, _ in selector.select(timeout=0.05):
                    self._read(key.data, selector)
                if time.monotonic() >= next_tick:
                    next_tick += period_s
                    for client in self.clients:
                        self._send(client, client.per_tick)
                    if during is not None:
                        during(time.monotonic() - started)
        finally:
            selector.close()

    @staticmethod
    def _read(client: Raw, selector: selectors.BaseSelector) -> None:
        try:
            chunk = client.sock.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        client.received += chunk
        if not chunk:
            client.closed_at = client.closed_at or time.monotonic()
            selector.unregister(client.sock)

    @property
    def open(self) -> list[Raw]:
        return [c for c in self.clients if c.closed_at is None]

    def close(self) -> None:
        for client in self.clients:
            client.sock.close()


def exchange(port: int, data: bytes, timeout: float = 5.0) -> tuple[bytes, bool]:
    """Send `data` at once; what came back, and whether the server closed the connection."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(data)
        received, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return received, False
            if not chunk:
                return received, True
            received += chunk
        return received, False


def error_of(response: bytes) -> dict:
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), response
    return json.loads(body)["error"]


# -- slow clients --------------------------------------------------------------------------------------
def test_slow_clients_are_closed_within_the_timeouts_while_others_are_served(server):
    started = time.monotonic()
    headers = Clients.connect(server.port, 50, b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: 1\r\n\r\n")
    silent = Clients.connect(server.port, 5, b"", first=0)
    head = b"POST " + GEN.encode() + b" HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: 100\r\n\r\n"
    body = Clients.connect(server.port, 1, head + b" " * 50, first=len(head))  # then a byte a second
    everyone = Clients(headers.clients + silent.clients + body.clients)
    timings: list[float] = []
    everyone.run(seconds=9, period_s=1.0, during=lambda t: timings.append(normal_requests(server.url)))
    everyone.close()
    assert not everyone.open, f"{len(everyone.open)} slow clients still open after 9 s"
    assert timings and max(timings) < 5, timings  # served while the slow clients were held
    for client in headers.clients:  # 3 s, swept every 0.75 s: 3.75 s, with a margin for a busy machine
        assert client.closed_at is not None and client.closed_at - started < 6.5
        assert STATUS_LINE.findall(client.received) == [b"408"], client.received
        assert error_of(client.received)["message"] == "the request headers did not arrive within 3 s"
    for client in silent.clients:  # nothing sent: closed without an answer
        assert client.received == b"" and client.closed_at - started < 6.5  # type: ignore[operator]
    (slow_body,) = body.clients
    assert STATUS_LINE.findall(slow_body.received) == [b"408"], slow_body.received
    assert error_of(slow_body.received)["message"] == "the request body did not arrive within 3 s"
    assert b"x-request-id:" in slow_body.received.lower()  # answered by the app: logged, with an id
    assert metric(server.url, 'ilf_closed_connections_total{reason="header_timeout"}') >= 55


def test_descriptor_limited_server_serves_and_keeps_its_log_small(bundle, tmp_path):
    log = tmp_path / "serve.log"
    with served(bundle, log, "--header-timeout-s", "4", nofile=256) as server:
        assert b"max_connections=192" in log.read_bytes()  # below ulimit -n 256, with a reserve
        before = server.log_size()
        slow = Clients.connect(server.port, 300, b"GET /healthz HTTP/1.1\r\nHost: slow\r\nX-Slow: 1\r\n\r\n")
        timings: list[float] = []
        slow.run(seconds=6, period_s=2.0, during=lambda t: timings.append(normal_requests(server.url)))
        slow.close()
        grown = server.log_size() - before
        assert len(timings) >= 3 and max(timings) < 5, timings
        for _ in range(3):  # and after the flood
            assert normal_requests(server.url) < 5
        assert server.process.poll() is None
        text = log.read_text()
    assert grown < 20_000, f"the log grew by {grown} bytes:\n{text[-3000:]}"
    assert "Traceback" not in text and "out of system resource" not in text
    assert text.count("ilf_deploy.serving.serve.connections") <= 4, text[-3000:]  # throttled: one line a kind


# -- framing and bodies --------------------------------------------------------------------------------
SMUGGLED = (
    b"POST /v1/images/generations HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
)


@pytest.mark.parametrize(
    "request_bytes",
    [
        SMUGGLED,
        SMUGGLED.replace(
            b"Content-Length: 4\r\nTransfer-Encoding: chunked",
            b"Transfer-Encoding: chunked\r\nContent-Length: 4",
        ),
    ],
    ids=["cl-te", "te-cl"],
)
def test_content_length_with_transfer_encoding_is_400_and_closed(server, request_bytes):
    received, closed = exchange(server.port, request_bytes)
    assert closed, received
    assert STATUS_LINE.findall(received) == [b"400"], received  # the smuggled GET is never answered
    assert "Content-Length and Transfer-Encoding" in error_of(received)["message"]
    assert b"connection: close" in received.lower()


def test_unparseable_http_gets_a_json_400_and_is_closed(server):
    received, closed = exchange(server.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n")
    assert closed and STATUS_LINE.findall(received) == [b"400"], received
    assert error_of(received)["message"].startswith("the request is not valid HTTP/1.1")


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b'{"prompt": "\xff\xfe"}', "the request body is not valid JSON (it is not UTF-8)"),
        ('{"prompt": "x"}'.encode("utf-16"), "the request body is not valid JSON (it is not UTF-8)"),
        (b"[" * 100_000 + b"]" * 100_000, "the request body is not valid JSON (it is nested too deeply)"),
        (b'{"prompt": "x", "seed": ' + b"9" * 5000 + b"}", "the request body is not valid JSON"),
    ],
    ids=["latin-1", "utf-16", "nested", "huge-number"],
)
def test_malformed_bodies_get_our_one_line_error(server, body, message):
    response = httpx.post(f"{server.url}{GEN}", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"] == {"message": message, "type": "invalid_request_error", "param": None}


# -- shutdown ------------------------------------------------------------------------------------------
def test_sigterm_with_queued_work_answers_everyone_and_exits(bundle, tmp_path):
    log = tmp_path / "serve.log"
    args = ("--max-batch", "1", "--max-queue", "256", "--drain-s", "2")
    with served(bundle, log, *args) as server:

        async def load() -> tuple[list, float]:
            async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=32)) as http:
                bodies = [
                    {"prompt": "x", "plan": "base-50", "n": 8 if i % 3 else 1, "seed": i} for i in range(24)
                ]
                requests = [asyncio.ensure_future(http.post(f"{server.url}{GEN}", json=b)) for b in bodies]
                deadline = time.monotonic() + 20
                while metric(server.url, "ilf_queue_depth") < 100:  # the work is queued
                    assert time.monotonic() < deadline
                    await asyncio.sleep(0.05)
                server.process.send_signal(signal.SIGTERM)
                signalled = time.monotonic()
                return await asyncio.gather(*requests, return_exceptions=True), signalled

        responses, signalled = asyncio.run(load())
        assert server.process.wait(15) == 0
        exited = time.monotonic() - signalled
    text = log.read_text()
    assert exited < 2 + 4, f"exited {exited:.1f} s after SIGTERM"
    statuses = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in responses]
    assert set(statuses) <= {200, 503} and 503 in statuses, statuses
    for response in responses:
        assert isinstance(response, httpx.Response) and response.headers["content-type"] == "application/json"
        if response.status_code == 503:
            assert response.headers["retry-after"].isdigit()
            assert response.json()["error"]["message"].startswith("the server is shutting down")
    assert "Traceback" not in text and "Internal Server Error" not in text, text[-3000:]


def test_serve_server_triton_stops_tritonserver_on_sigterm(bundle, tmp_path):
    """SIGTERM used to kill the CLI and leave tritonserver running; now it drains Triton first, for
    --drain-s (Triton's --exit-timeout-secs, which it logs as it waits: `Timeout 3: Found ...`)."""
    from ilf_deploy.core.errors import ConfigError
    from ilf_deploy.serving.triton.server import find_server

    try:
        find_server()
        import tritonclient.http  # noqa: F401  (run_triton needs it)
    except (ConfigError, ImportError):
        pytest.skip("tritonserver is not installed: `make setup` runs `ilf-deploy install-triton`")
    ports = []
    for _ in range(3):
        with socket.create_server((HOST, 0)) as sock:
            ports.append(str(sock.getsockname()[1]))
    command = [str(Path(sys.executable).parent / "ilf-deploy"), "serve", str(bundle), "--server", "triton"]
    command += ["--host", HOST, "--http-port", ports[0], "--grpc-port", ports[1], "--metrics-port", ports[2]]
    command += ["--drain-s", "2.5"]  # whole seconds for Triton: 3
    log = tmp_path / "triton.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 90
        while b"ready: POST" not in log.read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0, log.read_text()[-2000:]
        assert re.search(r"^.*Timeout 3: Found \d+ model versions", log.read_text(), re.M), log.read_text()[
            -2000:
        ]
    finally:
        if process.poll() is None:
            process.kill()
    with pytest.raises(httpx.ConnectError):  # Triton itself is gone, not orphaned
        httpx.get(f"http://{HOST}:{ports[0]}/v2/health/live", timeout=5)


# -- the parts alone -----------------------------------------------------------------------------------
def test_draining_server_is_not_ready_and_answers_503(bundle):
    from fastapi.testclient import TestClient

    from ilf_deploy.serving.serve import ServeOptions, create_app

    with TestClient(create_app(bundle, ServeOptions(warmup=False))) as client:
        assert client.get("/readyz").status_code == 200
        client.app.state.ilf.begin_drain()  # type: ignore[attr-defined]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json() == {"status": "shutting down"}
        response = client.post(GEN, json={"prompt": "x", "plan": "base-2"})
        assert response.status_code == 503 and response.headers["retry-after"] == "2"
        assert response.headers["connection"] == "close"
        assert response.json()["error"]["type"] == "server_error"
        assert client.get("/healthz").status_code == 200  # alive, only not ready


def test_a_handler_cancelled_at_shutdown_is_answered_json_503():
    """uvicorn cancels what still runs after its grace period; the client gets our 503, not a
    plain-text 500, and uvicorn sees a request that ended (no traceback)."""
    from ilf_deploy.serving.serve.app import _Observe
    from ilf_deploy.serving.serve.auth import ApiKeys
    from ilf_deploy.serving.serve.metrics import ServerMetrics

    async def forever(scope, receive, send) -> None:
        await asyncio.Event().wait()

    async def scenario() -> list[dict]:
        sent: list[dict] = []

        async def send(message) -> None:
            sent.append(message)

        async def receive() -> dict:
            return {"type": "http.request", "body": b"", "more_body": False}

        scope = {"type": "http", "method": "POST", "path": GEN, "headers": [], "client": (HOST, 1)}
        observed = _Observe(forever, ServerMetrics(), 1 << 20, ApiKeys(), body_timeout_s=30.0)
        task = asyncio.ensure_future(observed(scope, receive, send))
        await asyncio.sleep(0.05)
        task.cancel()
        await task  # ends normally: nothing for uvicorn to log
        return sent

    start, body = asyncio.run(scenario())
    headers = dict(start["headers"])
    assert start["status"] == 503 and headers[b"retry-after"] == b"2" and headers[b"connection"] == b"close"
    assert json.loads(body["body"])["error"]["message"].startswith("the server is shutting down")


def test_accept_errors_log_once_per_interval_and_lower_the_cap(caplog):
    from ilf_deploy.serving.serve.connections import ConnectionTable, Listener
    from ilf_deploy.serving.serve.metrics import ServerMetrics

    class Exhausted:
        """A listening socket with a connection waiting whose accept() is out of descriptors."""

        def __init__(self, sock: socket.socket) -> None:
            self.sock, self.calls = sock, 0

        def accept(self):
            self.calls += 1
            raise OSError(errno.EMFILE, "Too many open files")

        def __getattr__(self, name):
            return getattr(self.sock, name)

    async def scenario() -> tuple[Exhausted, ConnectionTable]:
        with socket.create_server((HOST, 0)) as sock, socket.create_connection(sock.getsockname()):
            exhausted, table = Exhausted(sock), ConnectionTable(100, ServerMetrics())
            listener = Listener(exhausted, lambda: asyncio.Protocol(), table, 10.0)
            listener.start()
            await asyncio.sleep(2.5)  # readable all along: asyncio's loop would log every attempt
            listener.close()
            await listener.wait_closed()
            return exhausted, table

    logger = logging.getLogger("ilf_deploy.serving.serve.connections")
    logger.addHandler(caplog.handler)  # whatever an earlier test did to the package's propagation
    try:
        exhausted, table = asyncio.run(scenario())
    finally:
        logger.removeHandler(caplog.handler)
    records = {id(r): r for r in caplog.records if r.name == logger.name}  # caught once or twice
    lines = [r.getMessage() for r in records.values()]
    assert exhausted.calls >= 2 and len(lines) == 1, (exhausted.calls, lines)  # one line per 10 s
    assert "Too many open files" in lines[0] and table.limit == 8  # the cap: what was open, at least 8
    assert table.metrics.accept_errors.value(errno="EMFILE") == exhausted.calls


def test_connection_limits_follow_the_descriptor_limit():
    from ilf_deploy.serving.serve.connections import default_max_connections

    assert default_max_connections(256) == 192
    assert default_max_connections(1024) == 896
    assert default_max_connections(1 << 20) == 1024
    assert default_max_connections(40) == 8


def test_connection_options_are_checked_and_refused_for_triton(bundle):
    from typer.testing import CliRunner

    from ilf_deploy.cli import app

    runner = CliRunner()
    limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    for args, message in [
        (["--header-timeout-s", "0"], "--header-timeout-s must be > 0"),
        (["--body-timeout-s", "-1"], "--body-timeout-s must be > 0"),
        (["--drain-s", "-1"], "--drain-s must be in 0..3600"),
        (["--server", "triton", "--drain-s", "3601"], "--drain-s must be in 0..3600"),  # the same check
        (["--max-connections", "0"], "--max-connections must be >= 1"),
        (["--max-connections", str(limit)], f"ulimit -n is {limit}"),
        (
            ["--server", "triton", "--header-timeout-s", "5", "--max-connections", "9"],
            "--header-timeout-s, --max",
        ),
    ]:
        result = runner.invoke(app, ["serve", str(bundle), *args])
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], (args, result.output)
