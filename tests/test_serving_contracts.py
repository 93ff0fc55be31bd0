"""The ring around the core trusts its contracts (issue 34): an engine carries the bundle it was
opened from, and serve, Triton, Ray/batch workers and eval read it there instead of loading the
manifest again; a pinned digest is checked once, by the load that opened the engine."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.manifest import BundleError
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.model.tiny import make_tiny_pipeline
from ilf_deploy.serving.scale.batch import prepare
from ilf_deploy.serving.scale.options import BatchOptions
from ilf_deploy.serving.scale.worker import BatchWorker
from ilf_deploy.serving.serve import ServeOptions, create_app

OTHER = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("contracts")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=2)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-2",)))


@pytest.fixture(scope="module")
def generator(bundle):
    return open_generator(bundle)


def test_open_generator_hands_back_the_bundle_it_loaded(bundle, generator):
    assert isinstance(generator.bundle, Bundle) and generator.bundle.path == Path(bundle)
    assert generator.bundle.digest == Bundle.load(bundle, verify_hashes=False).digest
    assert generator.opened_bundle() is generator.bundle
    assert generator.opened_bundle(generator.bundle.digest) is generator.bundle
    with pytest.raises(BundleError, match="not the pinned --digest"):
        generator.opened_bundle(OTHER)
    with pytest.raises(BundleError, match="--digest must look like"):
        generator.opened_bundle("sha256:nope")


def test_an_engine_on_a_model_has_no_bundle(generator):
    class OnAModel(type(generator)):
        bundle = None

    engine = OnAModel.__new__(OnAModel)
    with pytest.raises(ConfigError, match="runs a model, not a bundle"):
        engine.opened_bundle()


def test_serve_loads_the_manifest_once_and_serves_the_engines_bundle(bundle, loads):
    digest = Bundle.load(bundle, verify_hashes=False).digest
    loads.clear()
    state = create_app(bundle, ServeOptions(digest=digest, warmup=False)).state.ilf
    assert loads == [Path(bundle)]  # open_generator's load: hashes and the pin, once
    assert state.bundle is state.generator.bundle


def test_a_callers_engine_must_be_the_pinned_bundle(bundle, generator, loads):
    digest = generator.bundle.digest
    assert create_app(bundle, ServeOptions(digest=digest, warmup=False), generator).state.ilf.bundle.digest
    with pytest.raises(BundleError, match="not the pinned --digest"):
        create_app(bundle, ServeOptions(digest=OTHER, warmup=False), generator)
    assert BatchWorker(bundle, digest=digest, generator=generator).bundle is generator.bundle
    with pytest.raises(BundleError, match="not the pinned --digest"):
        BatchWorker(bundle, digest=OTHER, generator=generator)
    assert loads == []  # the engine's bundle stands for the path: nothing read again


def test_batch_workers_and_the_driver_load_the_manifest_once(bundle, tmp_path, loads):
    worker = BatchWorker(bundle)
    assert loads == [Path(bundle)] and worker.bundle is worker.generator.bundle
    loads.clear()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red square"}\n{"prompt": "", "seed": -1}\n')
    prepared = prepare(BatchOptions(bundle, prompts, tmp_path / "out", backend="onnxruntime"))
    try:
        assert loads == [Path(bundle)]
        assert prepared.bundle is prepared.generator.bundle and prepared.digest == worker.bundle.digest
    finally:
        prepared.results.close()


def test_bench_opens_its_engine_from_the_bundle_it_checked(bundle, loads):
    from typer.testing import CliRunner

    from ilf_deploy.cli import app

    digest = Bundle.load(bundle, verify_hashes=False).digest
    loads.clear()
    args = [
        "bench",
        str(bundle),
        "--runs",
        "1",
        "--warmup",
        "0",
        "--backend",
        "onnxruntime",
        "--digest",
        digest,
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert loads == [Path(bundle)]  # hashes and pin once; the engine runs that bundle


def test_triton_engine_reads_the_generators_bundle(generator, loads):
    from ilf_deploy.serving.triton.model import Engine

    engine = Engine(generator, "base-2")
    assert loads == [] and engine.contract.default_plan == "base-2"
    assert set(engine.plans) == set(generator.bundle.plan_names)


def test_triton_engine_warms_and_runs_serves_batch_buckets(generator):
    import numpy as np

    from ilf_deploy.serving.triton.model import Engine

    class Recording:
        """The real engine; records each generate_batch's batch size."""

        def __init__(self) -> None:
            self.sizes: list[int] = []

        def __getattr__(self, name):
            return getattr(generator, name)

        def generate_batch(self, plan, requests, *args):
            self.sizes.append(len(requests))
            return generator.generate_batch(plan, requests, *args)

    recording = Recording()
    engine = Engine(recording, "base-2", max_batch=4)
    engine.open_segments(warm=True)
    assert recording.sizes == [1, 2, 4]  # one warm-up batch per bucket, as serve's
    recording.sizes.clear()
    prompts = np.array([[b"a red circle"], [b"a blue square"], [b"a green dot"]], dtype=object)
    (images,) = engine.run([{"prompt": prompts}])
    assert recording.sizes == [2, 1] and images.shape[0] == 3  # 3 rows: buckets 2 + 1, not one call of 3


def test_serve_runs_engine_work_in_the_engines_inference_context(bundle, generator):
    class Recording:
        """The real engine; counts the scopes the server enters around engine work."""

        def __init__(self) -> None:
            self.entered = 0

        def __getattr__(self, name):
            return getattr(generator, name)

        @contextlib.contextmanager
        def inference_context(self):
            self.entered += 1
            yield

    engine = Recording()
    with TestClient(create_app(bundle, ServeOptions(warmup=False), engine)) as client:
        response = client.post("/v1/images/generations", json={"prompt": "a red square", "plan": "base-2"})
    assert response.status_code == 200, response.text
    assert engine.entered >= 1


# -- one batching policy: serve, Triton, Ray Serve and the CLI's defaults -----------------------------
def test_every_server_and_flag_defaults_to_the_one_batching_policy():
    import typer

    from ilf_deploy.cli import app
    from ilf_deploy.core.batching import DEFAULT_BATCHING
    from ilf_deploy.serving.triton.repository import ExportOptions

    knobs = {"max_batch", "max_wait_ms", "max_queue", "timeout_s", "max_n"}
    serve = ServeOptions()
    assert {k: getattr(serve, k) for k in knobs} == {k: getattr(DEFAULT_BATCHING, k) for k in knobs}
    triton = ExportOptions().policy
    assert (triton.max_batch, triton.max_wait_ms, triton.max_queue) == (
        DEFAULT_BATCHING.max_batch,
        DEFAULT_BATCHING.max_wait_ms,
        DEFAULT_BATCHING.max_queue,
    )
    commands = typer.main.get_command(app).commands
    flags = {p.name: p.default for p in commands["serve"].params}
    assert {k: flags[k] for k in knobs} == {k: getattr(DEFAULT_BATCHING, k) for k in knobs}
    exported = {p.name: p.default for p in commands["export-triton"].params}
    assert exported["max_queue_delay_us"] == DEFAULT_BATCHING.max_queue_delay_us
    assert (exported["max_batch"], exported["max_queue"]) == (None, DEFAULT_BATCHING.max_queue)


def test_serve_and_triton_batch_a_bundle_alike_and_refuse_alike(bundle, generator):
    from ilf_deploy.core.batching import BatchingPolicy
    from ilf_deploy.serving.triton.repository import ExportOptions, generation_config

    loaded = generator.bundle
    for policy in [BatchingPolicy(), BatchingPolicy(max_batch=3, max_wait_ms=2.5, max_queue=5, max_n=2)]:
        served = create_app(bundle, ServeOptions(**vars(policy), warmup=False), generator).state.ilf
        exported = ExportOptions.serving(policy, warmup=False)
        config = generation_config(loaded, exported, {})
        assert f"max_batch_size: {served.max_batch}\n" in config
        assert f"max_queue_delay_microseconds: {round(served.batcher.max_wait_s * 1e6)}\n" in config
        assert f"max_queue_size: {served.batcher.max_queue} " in config
    for bad, message in [
        ({"max_batch": 0}, "--max-batch must be >= 1, got 0"),
        ({"max_queue": 0}, "--max-queue must be >= 1, got 0"),
        ({"max_wait_ms": 10_001}, "--max-wait-ms must be in 0..10000, got 10001"),
    ]:
        policy = BatchingPolicy(**bad)
        with pytest.raises(ConfigError) as serve_error:
            ServeOptions(**vars(policy)).check()
        with pytest.raises(ConfigError) as triton_error:
            ExportOptions.serving(policy).check()
        texts = {str(serve_error.value), str(triton_error.value)}
        assert len(texts) == 1 or "max-queue-delay-us" in str(triton_error.value), texts
        assert message in str(serve_error.value)
    with pytest.raises(ConfigError, match=r"--max-queue-delay-us must be in 0\.\.10000000"):
        ExportOptions(max_queue_delay_us=10_000_001).check()


def test_text_knobs_are_read_as_the_policys_types():
    from ilf_deploy.core.batching import BatchingPolicy

    values = BatchingPolicy.coerce({"max_batch": "4", "max_wait_ms": "2.5", "backend": "onnxruntime"})
    assert values == {"max_batch": 4, "max_wait_ms": 2.5, "backend": "onnxruntime"}
    assert BatchingPolicy(**BatchingPolicy.coerce({"max_n": "3"})).max_n == 3
    with pytest.raises(ConfigError, match="not a number"):
        BatchingPolicy.coerce({"max_queue": "many"})


# -- TritonProcess: tritonserver's lifecycle beside its command line --------------------------------
def _triton_server():
    from ilf_deploy.serving.triton.server import find_server

    try:
        return find_server()
    except ConfigError:
        return None


needs_triton = pytest.mark.skipif(
    _triton_server() is None,
    reason="tritonserver is not installed: `make setup` runs `ilf-deploy install-triton`",
)


def test_free_ports_are_picked_distinct_and_ports_follow_one_rule(bundle, tmp_path):
    from typer.testing import CliRunner

    from ilf_deploy.cli import app
    from ilf_deploy.serving.triton.server import free_ports

    picked = free_ports("127.0.0.1", (0, 0, 0))
    assert len(set(picked)) == 3 and all(0 < port <= 65535 for port in picked)
    assert free_ports("127.0.0.1", (8000, 0, 8002))[::2] == (8000, 8002)
    runner = CliRunner()
    for args, flag in [
        (["--port", "70000"], "--port"),
        (["--server", "triton", "--grpc-port", "70000"], "--grpc-port"),
        (["--server", "triton", "--metrics-port", "-1"], "--metrics-port"),
    ]:
        result = runner.invoke(app, ["serve", str(bundle), *args])
        assert result.exit_code == 2, result.output
        assert f"{flag} must be in 0..65535 (0: a free port)" in result.output, result.output


@needs_triton
def test_triton_process_starts_waits_ready_drains_and_stops(bundle, tmp_path):
    from ilf_deploy.serving.triton.repository import ExportOptions, export_repository
    from ilf_deploy.serving.triton.server import TritonProcess

    export_repository(bundle, tmp_path / "repo", ExportOptions(name="tiny", warmup=False))
    with (tmp_path / "triton.log").open("w") as log:
        triton = TritonProcess(_triton_server(), tmp_path / "repo", (0, 0, 0), "127.0.0.1", 5, output=log)
        with triton:
            assert triton.running and 0 not in triton.ports
            assert triton.wait_ready("tiny", timeout_s=120), (tmp_path / "triton.log").read_text()[-2000:]
            assert triton.ready("tiny") and not triton.ready("other")
        assert not triton.running and triton.process.returncode == 0
    assert "Timeout 5: Found" in (tmp_path / "triton.log").read_text()  # drained, for its exit timeout
    assert not triton.ready("tiny")  # gone, not orphaned


def _background_job() -> None:
    """What a non-interactive shell does to a job it starts with `&`: SIGINT ignored."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)


@needs_triton
def test_backgrounded_serve_server_triton_stops_on_sigint(bundle, tmp_path):
    """`ilf-deploy serve B --server triton &` from a script used to ignore SIGINT (and leave
    tritonserver running); now SIGINT drains and stops Triton as SIGTERM does."""
    import signal
    import subprocess
    import sys
    import time

    command = [str(Path(sys.executable).parent / "ilf-deploy"), "serve", str(bundle), "--server", "triton"]
    command += ["--host", "127.0.0.1", "--port", "0", "--grpc-port", "0", "--metrics-port", "0"]
    command += ["--drain-s", "5"]  # Triton exits 1 if it cannot unload the model within it
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, preexec_fn=_background_job)
    try:
        deadline = time.monotonic() + 120
        while b"ready: POST" not in log.read_bytes():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        assert process.wait(60) == 0, log.read_text()[-2000:]
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the old behaviour: SIGINT ignored
            process.wait(60)
    url = log.read_text().split("ready: POST ")[1].split()[0].replace("/infer", "/ready")
    with pytest.raises(OSError):  # Triton itself is gone, not orphaned
        urllib_get(url)


def urllib_get(url: str) -> int:
    import urllib.request

    with urllib.request.urlopen(url, timeout=5) as reply:
        return reply.status


# -- bounds: one mechanism and one wording --------------------------------------------------------------
def test_check_at_least_words_every_lower_bound_alike():
    from ilf_deploy.core.errors import check_at_least

    check_at_least("--x", None)  # not given: nothing to check
    check_at_least("--x", 1)
    check_at_least("--x", 0, 0)
    for value, low, message in [(0, 1, "--x must be >= 1, got 0"), (-1, 0, "--x must be >= 0, got -1")]:
        with pytest.raises(ConfigError) as error:
            check_at_least("--x", value, low)
        assert str(error.value) == message
    with pytest.raises(ConfigError, match=r"^--x must be >= 1, got 0\.5$"):
        check_at_least("--x", 0.5)


def test_lower_bounds_read_the_same_at_every_front_door(bundle, tmp_path):
    from typer.testing import CliRunner

    from ilf_deploy.cli import app

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red square"}\n')
    runner = CliRunner()
    for args, flag in [
        (["plan", "--blocks", "0"], "--blocks"),
        (["export-triton", str(bundle), "-o", str(tmp_path / "repo"), "--instances", "0"], "--instances"),
        (["export-triton", str(bundle), "-o", str(tmp_path / "repo"), "--replicas", "0"], "--replicas"),
        (
            ["batch", str(bundle), "--prompts", str(prompts), "--out", str(tmp_path / "o"), "--actors", "0"],
            "--actors",
        ),
        (["bench", str(bundle), "--runs", "0"], "--runs"),
        (["serve", str(bundle), "--max-batch", "0"], "--max-batch"),
        (["serve", str(bundle), "--server", "triton", "--max-queue", "0"], "--max-queue"),
    ]:
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and f"{flag} must be >= 1, got 0" in result.output, (args, result.output)
    assert not (tmp_path / "repo").exists() and not (tmp_path / "o").exists()


def test_hand_written_lower_bounds_do_not_come_back():
    """`errors.check_at_least` is the bound; the few left by hand say more than a bound (a list,
    an upper limit beside it, a reason) or are in files other work owns."""
    import re

    import ilf_deploy

    allowed = {
        "checks/evaluation.py",  # --n >= 2, with the reason
        "build/training/feedback.py",  # a list of plan steps
        "serving/serve/state.py",  # --max-connections: and the descriptor limit above it
        "core/plan/model.py",
        "build/export/build.py",
        "cli/plans.py",  # --adaptive and --max-reuse together
        "checks/tuning.py",
    }
    root = Path(ilf_deploy.__file__).parent
    found = {
        str(path.relative_to(root))
        for path in root.rglob("*.py")
        if path.name != "errors.py" and re.search(r"must be >= \d", path.read_text())
    }
    assert found <= allowed, sorted(found - allowed)
