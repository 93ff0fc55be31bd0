"""Issue 31 on `serve`: non-finite latents are a counted 500 and keep a warming-up server not ready
(item 1); the connection cap evicts only connections idle without a request, so a reconnect storm
of slow clients leaves normal requests answered (item 6)."""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.model.tiny import make_tiny_pipeline
from ilf_deploy.serving.serve import ServeOptions, create_app
from ilf_deploy.serving.serve.connections import EVICT_GRACE_S, STALLED_S, Connection, ConnectionTable
from tests.test_serve_robustness import GEN, HOST, served


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("hardening")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-2", "ilf-4")))


class HugeLatents:
    """The real generator started from latents of 3e38: finite in float32, Inf after one step."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate_batch(self, plan, requests, latents=None, on_step=None):
        huge = [np.full_like(self.inner.initial_latents(r), 3e38) for r in requests]
        return self.inner.generate_batch(plan, requests, huge, on_step)


def _metric(text: str, sample: str) -> float:
    line = next((x for x in text.splitlines() if x.startswith(sample + " ")), None)
    return float(line.split()[-1]) if line else 0.0


def test_a_warm_up_with_non_finite_latents_keeps_the_server_not_ready(bundle):
    with TestClient(create_app(bundle, ServeOptions(), HugeLatents(open_generator(bundle)))) as client:
        deadline = time.monotonic() + 30
        while (response := client.get("/readyz")).json() == {"status": "warming up"}:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert response.status_code == 503
        assert response.json()["status"] == "failed"
        assert response.json()["error"].startswith("NonFiniteError: non-finite latents after step")
        text = client.get("/metrics").text
    assert _metric(text, "ilf_ready") == 0
    assert _metric(text, 'ilf_engine_errors_total{batch="warmup",reason="non_finite"}') == 1


def test_non_finite_latents_are_a_counted_500_with_the_reason(bundle):
    app = create_app(bundle, ServeOptions(warmup=False), HugeLatents(open_generator(bundle)))
    with TestClient(app) as client:
        response = client.post(GEN, json={"prompt": "a red circle", "plan": "base-2", "n": 2})
        assert response.status_code == 500, response.text
        error = response.json()["error"]
        assert error["type"] == "server_error"
        assert "non-finite latents after step 0 of plan 'base-2'" in error["message"]
        text = client.get("/metrics").text
    assert _metric(text, 'ilf_engine_errors_total{reason="non_finite"}') == 1
    assert _metric(text, 'ilf_images_total{plan="base-2"}') == 0


# -- the connection cap ---------------------------------------------------------------------------
class _Transport:
    def __init__(self) -> None:
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    abort = close


def _connection(table: ConnectionTable, idle_s: float, received: int = 0, last_byte_s: float = 0.0):
    now = time.monotonic()
    conn = Connection(now - idle_s, _Transport(), received=received, last_byte=now - last_byte_s)  # type: ignore[arg-type]
    table.add(conn)
    return conn


def test_eviction_spares_requests_being_read_and_new_connections():
    table = ConnectionTable(limit=5)
    being_read = _connection(table, idle_s=30, received=40, last_byte_s=0.0)  # headers arriving now
    in_request = _connection(table, idle_s=20)
    table.begin(in_request)  # headers complete: queued or running
    new = _connection(table, idle_s=0.0)  # accepted just now; its bytes not read yet
    silent = _connection(table, idle_s=EVICT_GRACE_S + 1)  # a connection that never sent anything
    stalled = _connection(table, idle_s=25, received=3, last_byte_s=STALLED_S + 5)  # slowloris
    assert table.full()
    assert table.evict() and silent.closing  # silent first, although the others are older
    assert table.evict() and stalled.closing  # then the stalled partial request
    assert not table.evict()  # the rest: in a request, being read, or new
    assert not (being_read.closing or in_request.closing or new.closing)


class Storm:
    """`count` slow clients, each reopened as soon as the server closes it: half send nothing,
    half a partial request line that never ends."""

    def __init__(self, port: int, count: int) -> None:
        self.port, self.count = port, count
        self.stop = threading.Event()
        self.opened = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _open(self, selector: selectors.BaseSelector, index: int) -> None:
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((HOST, self.port))
        selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, [index, False])
        self.opened += 1

    def _run(self) -> None:
        selector = selectors.DefaultSelector()
        for index in range(self.count):
            self._open(selector, index)
        while not self.stop.is_set():
            for key, events in selector.select(timeout=0.05):
                index, sent = key.data
                sock = key.fileobj
                if events & selectors.EVENT_WRITE and not sent:
                    if index % 2:  # the slow half: a request line with no end
                        with contextlib.suppress(OSError):
                            sock.send(b"GET /healthz HTTP/1.1\r\nHost: storm\r\n")  # type: ignore[union-attr]
                    selector.modify(sock, selectors.EVENT_READ, [index, True])
                    continue
                try:
                    closed = not sock.recv(65536)  # type: ignore[union-attr]
                except BlockingIOError:
                    continue
                except OSError:
                    closed = True
                if closed:  # evicted or timed out: reconnect at once
                    selector.unregister(sock)
                    sock.close()  # type: ignore[union-attr]
                    self._open(selector, index)
        for key in list(selector.get_map().values()):
            key.fileobj.close()  # type: ignore[union-attr]
        selector.close()

    def __enter__(self) -> Storm:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(10)


async def _normal_clients(url: str, count: int) -> list[int | str]:
    async def one(index: int) -> int | str:
        await asyncio.sleep(index * 0.1)
        # a new connection per request, as a client behind a load balancer makes them
        async with httpx.AsyncClient(timeout=20) as http:
            try:
                if index % 4 == 0:
                    body = {"prompt": "a red circle", "plan": "base-2", "seed": index}
                    return (await http.post(f"{url}{GEN}", json=body)).status_code
                return (await http.get(f"{url}/healthz")).status_code
            except httpx.HTTPError as exc:
                return type(exc).__name__

    return await asyncio.gather(*(one(i) for i in range(count)))


@pytest.fixture()
def capped(bundle, tmp_path) -> Iterator:
    args = ("--max-connections", "24", "--header-timeout-s", "5")
    with served(bundle, tmp_path / "serve.log", *args) as server:
        yield server


def test_a_reconnect_storm_of_slow_clients_leaves_normal_requests_answered(capped):
    with Storm(capped.port, 72) as storm:
        time.sleep(1.5)  # the cap is full and evicting
        results = asyncio.run(_normal_clients(capped.url, 40))
    answered = sum(r == 200 for r in results)
    assert storm.opened > 72 + 24  # the storm did reconnect: the cap evicted its connections
    assert answered >= 0.95 * len(results), results
    assert capped.process.poll() is None


def test_a_batch_row_with_non_finite_latents_is_an_error_row_without_an_image(bundle, tmp_path):
    """The Ray/local batch worker (serving/scale/worker.py): the row says why, no black PNG is written."""
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.serving.scale.worker import BatchWorker, job
    from tests.test_triton_hardening import non_finite_bundle

    worker = BatchWorker(non_finite_bundle(bundle, tmp_path / "nonfinite"))
    request = worker.generator.resolve(Request("a red circle", seed=1))
    row, png = worker.run(job(0, "base-2", request))
    assert png is None and "sha256" not in row
    assert row["error"].startswith("generation failed: NonFiniteError: non-finite latents after step 0")
