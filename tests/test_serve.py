"""`ilf-deploy serve`: endpoints, validation, micro-batching, backpressure, cancellation, fuzzing.

One tiny PixArt-α bundle per module; servers listen on 127.0.0.1 only. Slow engines are the real
bundle generator with a sleep after every denoising step (`SlowGenerator`).
"""

from __future__ import annotations

import asyncio
import base64
import io
import re
import threading
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.model.tiny import make_tiny_pipeline
from ilf_deploy.serving.serve import ServeOptions, create_app
from ilf_deploy.serving.serve.background import background_server

GEN = "/v1/images/generations"


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-2", "base-4", "ilf-4")))


@pytest.fixture(scope="module")
def generator(bundle):
    return open_generator(bundle)  # shared by every app here: loading sessions once saves time


@pytest.fixture(scope="module")
def client(bundle, generator) -> Iterator[TestClient]:
    with TestClient(create_app(bundle, ServeOptions(max_n=4), generator)) as test_client:
        wait_ready(test_client)
        yield test_client


class SlowGenerator:
    """The real generator, sleeping `step_s` after each denoising step; `gate` holds the first call."""

    def __init__(self, inner, step_s: float = 0.0, gate: threading.Event | None = None) -> None:
        self.inner, self.step_s, self.gate = inner, step_s, gate
        self.steps = 0
        self.sizes: list[int] = []  # each engine call's batch size

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def generate_batch(self, plan, requests, latents=None, on_step=None):
        if self.gate is not None:
            assert self.gate.wait(30), "the test never opened the gate"
        self.sizes.append(len(requests))

        def step(index: int) -> None:
            self.steps += 1
            time.sleep(self.step_s)
            if on_step is not None:
                on_step(index)

        return self.inner.generate_batch(plan, requests, latents, step)


def wait_ready(test_client, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while test_client.get("/readyz").status_code != 200:
        assert time.monotonic() < deadline, "the server never became ready"
        time.sleep(0.05)


def png(b64: str) -> np.ndarray:
    data = base64.b64decode(b64, validate=True)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    Image.open(io.BytesIO(data)).verify()  # a complete, uncorrupted PNG
    image = Image.open(io.BytesIO(data))
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image)


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (0 when the series does not exist yet)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(wanted)}\}})? (\S+)$" if wanted else rf"^{name} (\S+)$"
    match = re.search(pattern, text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


# -- endpoints ---------------------------------------------------------------------------------------
def test_generation_returns_the_engines_images(client, generator, bundle):
    body = {"prompt": "a red circle", "n": 2, "seed": 11, "plan": "base-2", "size": "32x32"}
    response = client.post(GEN, json={**body, "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    payload = response.json()
    assert abs(payload["created"] - time.time()) < 60
    images = [png(item["b64_json"]) for item in payload["data"]]
    assert [image.shape for image in images] == [(32, 32, 3)] * 2
    # n=2 means seeds 11 and 12: the same pixels as the engine computes them directly.
    step_plan = Bundle.load(bundle, verify_hashes=False).plan("base-2")
    direct = generator.decode(
        generator.generate_batch(
            step_plan, [Request("a red circle", seed=s, height=32, width=32) for s in (11, 12)]
        )
    )
    for served, expected in zip(images, direct):
        assert np.abs(served.astype(int) - expected.astype(int)).max() <= 1
    assert not np.array_equal(images[0], images[1])  # different seeds, different images
    again = client.post(GEN, json={**body, "n": 1}).json()["data"][0]["b64_json"]
    assert np.array_equal(png(again), images[0])  # a seed reproduces its image


def test_health_models_and_default_plan(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    (model,) = client.get("/v1/models").json()["data"]
    assert model["id"] == "bundle" and model["architecture"] == "pixart-alpha"
    assert [p["name"] for p in model["plans"]] == ["base-2", "base-4", "ilf-4"]
    assert model["default_plan"] == "ilf-4" and model["sizes"] == ["32x32"]
    assert model["max_prompt_tokens"] == 120 and model["max_n"] == 4
    before = metric(client.get("/metrics").text, "ilf_images_total", plan="ilf-4")
    assert client.post(GEN, json={"prompt": "a blue square"}).status_code == 200  # no plan: ilf-4
    assert metric(client.get("/metrics").text, "ilf_images_total", plan="ilf-4") == before + 1


LONG = " ".join(["red"] * 120)  # 120 words + </s> = 121 tokens, one over the limit
INVALID = [
    ({"prompt": "x", "size": "64x64"}, "size"),
    ({"prompt": "x", "size": "32"}, "size"),
    ({"prompt": "x", "size": 32}, "size"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "n": 5}, "n"),
    ({"prompt": "x", "n": "2"}, "n"),
    ({"prompt": "x", "n": 1.5}, "n"),
    ({"prompt": "x", "n": True}, "n"),
    ({"prompt": LONG}, "prompt"),
    ({"prompt": "x", "negative_prompt": LONG}, "negative_prompt"),
    ({"prompt": "x" * 4001}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": "   "}, "prompt"),
    ({"prompt": 3}, "prompt"),
    ({"n": 1}, "prompt"),
    ({"prompt": "x", "plan": "base-0"}, "plan"),
    ({"prompt": "x", "plan": "plans/base-2.json"}, "plan"),  # names only, never paths
    ({"prompt": "x", "guidance_scale": -1}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": 31}, "guidance_scale"),
    ({"prompt": "x", "guidance_scale": "4"}, "guidance_scale"),
    ({"prompt": "x", "seed": -1}, "seed"),
    ({"prompt": "x", "seed": 2**32}, "seed"),
    ({"prompt": "x", "seed": 1.5}, "seed"),  # integral numbers (1e3) are integers, as in JSON Schema
    ({"prompt": "x", "class_label": 1}, "class_label"),  # PixArt has no classes
    ({"prompt": "x", "response_format": "xml"}, "response_format"),
    ({"prompt": "x", "model": "dall-e-3"}, "model"),
    ({"prompt": "x", "quality": "ultra"}, "quality"),
    ({"prompt": "x", "size": None, "n": None}, "n"),
]


@pytest.mark.parametrize(("body", "param"), INVALID, ids=[f"{i}-{p}" for i, (_, p) in enumerate(INVALID)])
def test_invalid_fields_are_400_with_an_openai_error(client, body, param):
    response = client.post(GEN, json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"] and "Traceback" not in response.text


@pytest.mark.parametrize(
    ("raw", "content_type"),
    [
        ("{bad json", "application/json"),
        ("", "application/json"),
        ("[1, 2]", "application/json"),
        ('"prompt"', "application/json"),
        ("null", "application/json"),
        ('{"prompt": "\\ud800"}', "application/json"),  # a lone surrogate is not text
        ('{"prompt": "x", "guidance_scale": NaN}', "application/json"),
        ('{"prompt": "x", "guidance_scale": Infinity}', "application/json"),
        ('{"prompt": "x"}', "text/plain"),
        ("\xff\xfe", "application/json"),
    ],
)
def test_malformed_bodies_are_400(client, raw, content_type):
    response = client.post(
        GEN, content=raw.encode("utf-8", "surrogatepass"), headers={"content-type": content_type}
    )
    assert response.status_code == 400, response.text
    assert set(response.json()["error"]) == {"message", "type", "param"}


def test_other_errors_keep_the_error_shape(client):
    assert client.get("/nope").json()["error"]["message"] == "Not Found"
    assert client.delete(GEN).status_code == 405
    huge = client.post(
        GEN, content=b"{" + b" " * (1 << 20) + b"}", headers={"content-type": "application/json"}
    )
    assert huge.status_code == 413 and "larger than" in huge.json()["error"]["message"]
    chunks = iter([b"{" + b" " * 600_000] * 2 + [b"}"])  # chunked: no Content-Length to refuse early
    chunked = client.post(GEN, content=chunks, headers={"content-type": "application/json"})
    assert chunked.request.headers["transfer-encoding"] == "chunked" and chunked.status_code == 413


def test_without_a_running_engine_generations_are_503(bundle, generator):
    not_started = TestClient(create_app(bundle, ServeOptions(warmup=False), generator))  # no lifespan
    response = not_started.post(GEN, json={"prompt": "a cat"})
    assert response.status_code == 503 and response.json()["error"]["type"] == "server_error"
    assert not_started.get("/readyz").status_code == 503


def test_metrics_expose_requests_latency_queue_batches_and_stages(client):
    assert client.post(GEN, json={"prompt": "a cat", "plan": "base-2"}).status_code == 200
    client.post(GEN, json={"prompt": "a cat", "n": 0})
    response = client.get("/metrics")
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = response.text
    assert metric(text, "ilf_requests_total", endpoint=GEN, status="200") >= 1
    assert metric(text, "ilf_requests_total", endpoint=GEN, status="400") >= 1
    assert metric(text, "ilf_request_duration_seconds_count", endpoint=GEN) >= 2
    buckets = re.findall(
        rf'^ilf_request_duration_seconds_bucket{{endpoint="{GEN}",le="[^"]+"}} (\d+)$', text, re.M
    )
    assert len(buckets) > 5 and [int(b) for b in buckets] == sorted(int(b) for b in buckets)  # cumulative
    assert metric(text, "ilf_queue_depth") == 0
    assert metric(text, "ilf_batch_size_count") >= 1 and metric(text, "ilf_batch_size_sum") >= 1
    for stage in ("text_encoder", "embed", "final", "vae_decoder"):
        assert metric(text, "ilf_stage_calls_total", stage=stage) >= 1
        assert metric(text, "ilf_stage_seconds_total", stage=stage) > 0
    assert metric(text, "ilf_ready") == 1
    for line in text.splitlines():  # every sample line parses as `name{labels} number`
        assert line.startswith("#") or re.fullmatch(r"[a-z_]+(\{[^}]*\})? [-+0-9.eInf]+", line), line


def test_dit_bundle_checks_class_labels(tmp_path):
    model = make_tiny_pipeline("dit", tmp_path / "dit", num_layers=2)
    path = build_bundle(model, tmp_path / "dit-bundle", BuildOptions(plans=("base-2",)))
    with TestClient(create_app(path, ServeOptions(max_n=2))) as dit:
        wait_ready(dit)
        assert dit.get("/v1/models").json()["data"][0]["num_classes"] == 1000
        for body, param in [
            ({}, "class_label"),
            ({"class_label": 1000}, "class_label"),
            ({"class_label": -1}, "class_label"),
            ({"class_label": "3"}, "class_label"),
            ({"class_label": 1, "negative_prompt": "x"}, "negative_prompt"),
        ]:
            response = dit.post(GEN, json=body)
            assert response.status_code == 400 and response.json()["error"]["param"] == param, body
        ok = dit.post(GEN, json={"class_label": 3, "prompt": "ignored", "n": 2, "seed": 1})
        assert ok.status_code == 200 and len(ok.json()["data"]) == 2
        assert png(ok.json()["data"][0]["b64_json"]).shape == (32, 32, 3)


def test_key_limiter_alone():
    from ilf_deploy.serving.serve.limiter import KeyLimiter, OverLimit

    limiter = KeyLimiter(3)
    limiter.acquire("alice", 2)
    with pytest.raises(OverLimit) as error:
        limiter.acquire("alice", 2)  # 2 held + 2 > 3: refused, nothing more held
    assert (error.value.key, error.value.held, error.value.n, error.value.limit) == ("alice", 2, 2, 3)
    assert limiter.held("alice") == 2
    limiter.acquire("bob", 3)  # one key's images never count against another's
    with limiter.hold("alice", 1):
        assert limiter.held("alice") == 3
    with pytest.raises(RuntimeError), limiter.hold("alice", 1):
        raise RuntimeError("the request failed")  # released however the block ends
    limiter.release("alice", 2)
    assert limiter.held("alice") == 0 and limiter.held("bob") == 3
    limiter.acquire(None, 1000)  # no key (no keys configured): nothing to limit
    unlimited = KeyLimiter(None)
    unlimited.acquire("carol", 1000)
    assert limiter.held(None) == 0 and unlimited.held("carol") == 1000


# -- lifecycle, backpressure, cancellation ---------------------------------------------------------
def test_ready_only_after_the_warm_up_generation(bundle, generator):
    gate = threading.Event()
    slow = SlowGenerator(generator, gate=gate)
    with TestClient(create_app(bundle, ServeOptions(), slow)) as test_client:
        time.sleep(0.2)
        assert test_client.get("/healthz").status_code == 200  # alive while warming up
        response = test_client.get("/readyz")
        assert response.status_code == 503 and response.json() == {"status": "warming up"}
        assert metric(test_client.get("/metrics").text, "ilf_ready") == 0
        gate.set()
        wait_ready(test_client, timeout=20)
        assert test_client.app.state.ilf.max_batch == 8
        assert slow.sizes == [1, 2, 4, 8]  # one warm-up batch per bucket: each shape compiled before ready
        assert slow.steps == 4 * 4  # each ran the default plan (ilf-4) to the end
        assert metric(test_client.get("/metrics").text, "ilf_ready") == 1


def test_batch_buckets_cut_waiting_images_without_padding():
    from ilf_deploy.core.batching import batch_buckets, bucket_chunks, bucket_for

    buckets = [(1,), (1, 2), (1, 2, 3), (1, 2, 4, 6), (1, 2, 4, 8)]
    assert [batch_buckets(n) for n in (1, 2, 3, 6, 8)] == buckets
    assert [bucket_for(n, (1, 2, 4, 8)) for n in range(1, 10)] == [1, 2, 2, 4, 4, 4, 4, 8, 8]
    chunks = bucket_chunks(list(range(19)), (1, 2, 4, 8))
    assert [len(c) for c in chunks] == [8, 8, 2, 1] and [i for c in chunks for i in c] == list(range(19))


def test_micro_batches_run_at_bucket_sizes_with_the_images_of_single_runs(bundle, generator):
    slow = SlowGenerator(generator)
    options = ServeOptions(max_batch=4, max_wait_ms=100, warmup=False)
    body = {"prompt": "a red circle", "seed": 40, "plan": "base-2", "response_format": "b64_json"}
    with TestClient(create_app(bundle, options, slow)) as test_client:
        three = test_client.post(GEN, json={**body, "n": 3})
        four = test_client.post(GEN, json={**body, "n": 4})
    assert three.status_code == four.status_code == 200, (three.text, four.text)
    assert slow.sizes == [2, 1, 4]  # 3 waiting: a bucket of 2, then 1 (never padded to 4)
    step_plan = Bundle.load(bundle, verify_hashes=False).plan("base-2")
    for response in (three, four):
        for seed, item in enumerate(response.json()["data"], start=40):
            single = generator.generate_batch(step_plan, [Request("a red circle", seed=seed)])
            alone = generator.decode(single)
            assert np.abs(png(item["b64_json"]).astype(int) - alone[0].astype(int)).max() <= 1


def test_timeout_is_504_and_stops_the_batch(bundle, generator):
    slow = SlowGenerator(generator, step_s=0.3)
    options = ServeOptions(timeout_s=0.4, warmup=False)
    with TestClient(create_app(bundle, options, slow)) as test_client:
        started = time.monotonic()
        response = test_client.post(GEN, json={"prompt": "a dog", "plan": "base-4"})
        assert response.status_code == 504 and response.json()["error"]["type"] == "timeout"
        assert time.monotonic() - started < 1.5
        deadline = time.monotonic() + 5
        while metric(test_client.get("/metrics").text, "ilf_aborted_batches_total") < 1:
            assert time.monotonic() < deadline, "the abandoned batch was not aborted"
            time.sleep(0.05)
        text = test_client.get("/metrics").text
        assert metric(text, "ilf_cancelled_images_total", reason="timeout") == 1
        assert metric(text, "ilf_requests_total", endpoint=GEN, status="504") == 1
        assert slow.steps < 4  # stopped between steps, not run to the end


def test_disconnected_client_has_its_work_dropped(bundle, generator):
    slow = SlowGenerator(generator, step_s=0.3)
    with background_server(create_app(bundle, ServeOptions(warmup=False), slow)) as url:
        with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=0.45) as impatient:
            impatient.post(GEN, json={"prompt": "a fox", "plan": "base-4"})
        deadline = time.monotonic() + 5
        with httpx.Client(base_url=url, timeout=10) as http:
            while metric(http.get("/metrics").text, "ilf_aborted_batches_total") < 1:
                assert time.monotonic() < deadline, "the disconnected request's batch kept running"
                time.sleep(0.05)
            text = http.get("/metrics").text
            assert metric(text, "ilf_cancelled_images_total", reason="disconnect") == 1
            assert metric(text, "ilf_images_total", plan="base-4") == 0
            assert slow.steps < 4
            # The server goes on serving.
            assert http.post(GEN, json={"prompt": "a fox", "plan": "base-2"}).status_code == 200


def test_one_disconnect_in_a_shared_batch_spares_the_other(bundle, generator):
    slow = SlowGenerator(generator, step_s=0.3)
    options = ServeOptions(max_batch=2, max_wait_ms=2000, warmup=False)  # both land in one batch

    async def two(url: str) -> httpx.Response:
        body = {"prompt": "a fox", "plan": "base-4"}
        async with (
            httpx.AsyncClient(base_url=url, timeout=0.6) as impatient,
            httpx.AsyncClient(base_url=url, timeout=30) as patient,
        ):
            gone, kept = await asyncio.gather(
                impatient.post(GEN, json={**body, "seed": 1}),
                patient.post(GEN, json={**body, "seed": 2}),
                return_exceptions=True,
            )
        assert isinstance(gone, httpx.ReadTimeout)
        return kept

    with background_server(create_app(bundle, options, slow)) as url:
        kept = asyncio.run(two(url))
        assert kept.status_code == 200 and png(kept.json()["data"][0]["b64_json"]).shape == (32, 32, 3)
        text = httpx.get(f"{url}/metrics").text
    assert metric(text, "ilf_batch_size_count") == 1 and metric(text, "ilf_batch_size_sum") == 2
    assert metric(text, "ilf_cancelled_images_total", reason="disconnect") == 1
    assert metric(text, "ilf_images_total", plan="base-4") == 1  # the dropped row was not decoded
    assert metric(text, "ilf_aborted_batches_total") == 0


def test_torch_backend_serves_the_same_images(bundle, client):
    body = {"prompt": "a green star", "plan": "base-2", "seed": 5}
    with TestClient(create_app(bundle, ServeOptions(backend="torch", warmup=False))) as torch_client:
        torch_image = png(torch_client.post(GEN, json=body).json()["data"][0]["b64_json"])
    ort_image = png(client.post(GEN, json=body).json()["data"][0]["b64_json"])
    assert np.abs(torch_image.astype(int) - ort_image.astype(int)).max() <= 1


def test_overload_answers_429_with_retry_after(bundle, generator):
    slow = SlowGenerator(generator, step_s=0.1)
    options = ServeOptions(max_batch=1, max_queue=3, max_n=2, warmup=False)

    async def burst(url: str) -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            body = {"prompt": "a cat", "plan": "base-2"}
            return await asyncio.gather(*(http.post(GEN, json={**body, "seed": i}) for i in range(16)))

    with background_server(create_app(bundle, options, slow)) as url:
        responses = asyncio.run(burst(url))
        codes = [r.status_code for r in responses]
        # At least the 3 queue slots' worth are served; the rest of the burst is turned away at once.
        assert set(codes) <= {200, 429} and codes.count(429) >= 8 and codes.count(200) >= 3, codes
        for response in responses:
            if response.status_code == 429:
                assert int(response.headers["retry-after"]) >= 1
                assert response.json()["error"]["type"] == "rate_limit_error"
            else:
                assert len(response.json()["data"]) == 1
        with httpx.Client(base_url=url) as http:
            assert http.get("/healthz").status_code == 200  # still up
            text = http.get("/metrics").text
            assert metric(text, "ilf_rejected_images_total") == codes.count(429)
            assert metric(text, "ilf_queue_depth") == 0
            assert http.post(GEN, json={"prompt": "a cat", "n": 3}).json()["error"]["param"] == "n"


# -- load (fuzzing with every schemathesis check: tests/test_request_contract.py) -----------------
def test_load_200_requests_8_concurrent(bundle, generator):
    total, concurrency = 200, 8
    options = ServeOptions(max_batch=8, max_wait_ms=5, max_queue=64)

    async def client_loop(http: httpx.AsyncClient, worker: int, results: list) -> None:
        for i in range(worker, total, concurrency):
            body = {"prompt": "a small red circle", "plan": "base-2", "seed": i}
            if i % 4 == 0:
                body |= {"guidance_scale": 1.0}  # unguided: batched apart from the guided ones
            elif i % 4 == 1:
                body |= {"negative_prompt": "blurry"}
            response = await http.post(GEN, json=body)
            images = [png(item["b64_json"]) for item in response.json().get("data", [])]
            results.append((response.status_code, [image.shape for image in images]))

    async def load(url: str) -> list:
        results: list = []
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            await asyncio.gather(*(client_loop(http, w, results) for w in range(concurrency)))
        return results

    with background_server(create_app(bundle, options, generator)) as url:
        started = time.monotonic()
        results = asyncio.run(load(url))
        elapsed = time.monotonic() - started
        text = httpx.get(f"{url}/metrics").text
    failures = [r for r in results if r != (200, [(32, 32, 3)])]
    assert len(results) == total and not failures, failures[:5]
    assert metric(text, "ilf_images_total", plan="base-2") == total
    mean_batch = metric(text, "ilf_batch_size_sum") / metric(text, "ilf_batch_size_count")
    assert mean_batch > 1.5, f"requests were not batched (mean batch {mean_batch:.2f})"
    assert elapsed < 120, f"{total} requests took {elapsed:.0f} s"


# -- the CLI command -----------------------------------------------------------------------------------
def test_serve_command_reports_bad_input_in_one_line(bundle, tmp_path):
    from typer.testing import CliRunner

    from ilf_deploy.cli import app  # its IlfError -> one line, exit 2 wrapper included

    runner = CliRunner()
    assert "--max-wait-ms" in runner.invoke(app, ["serve", "--help"]).output
    for args, message in [
        ([str(tmp_path)], "not a bundle"),
        ([str(bundle), "--max-queue", "0"], "--max-queue"),
        ([str(bundle), "--max-n", "100"], "--max-n"),
        ([str(bundle), "--default-plan", "nope"], "--default-plan: unknown plan 'nope'"),
        ([str(bundle), "--backend", "bogus"], "unknown backend"),
        ([str(bundle), "--backend", "tensorrt"], "TensorRT is not installed"),
        ([str(bundle), "--port", "70000"], "--port"),
        ([str(bundle), "--digest", "sha256:" + "0" * 64], "not the pinned --digest"),
        ([str(bundle), "--digest", "latest"], "--digest must look like sha256:"),
    ]:
        result = runner.invoke(app, ["serve", *args])
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output
