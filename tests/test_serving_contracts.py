"""The ring around the core trusts its contracts (issue 34): an engine carries the bundle it was
opened from, and serve, Triton, Ray/batch workers and eval read it there instead of loading the
manifest again; a pinned digest is checked once, by the load that opened the engine."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from ilf_deploy.backends import open_generator
from ilf_deploy.errors import ConfigError
from ilf_deploy.export.build import BuildOptions, build_bundle
from ilf_deploy.runtime.bundle import Bundle
from ilf_deploy.runtime.manifest import BundleError
from ilf_deploy.scale.batch import prepare
from ilf_deploy.scale.options import BatchOptions
from ilf_deploy.scale.worker import BatchWorker
from ilf_deploy.serve import ServeOptions, create_app
from ilf_deploy.tiny import make_tiny_pipeline

OTHER = "sha256:" + "0" * 64


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("contracts")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=2)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-2",)))


@pytest.fixture(scope="module")
def generator(bundle):
    return open_generator(bundle)


@pytest.fixture
def loads(monkeypatch) -> list[Path]:
    """Every `Bundle.load` from now on, by path."""
    seen: list[Path] = []
    original = Bundle.load.__func__

    def counting(cls, path, *args, **kwargs):
        seen.append(Path(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(Bundle, "load", classmethod(counting))
    return seen


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


def test_triton_engine_reads_the_generators_bundle(generator, loads):
    from ilf_deploy.triton.model import Engine

    engine = Engine(generator, "base-2")
    assert loads == [] and engine.contract.default_plan == "base-2"
    assert set(engine.plans) == set(generator.bundle.plan_names)


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

    from ilf_deploy.batching import DEFAULT_BATCHING
    from ilf_deploy.cli import app
    from ilf_deploy.triton.repository import ExportOptions

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
    from ilf_deploy.batching import BatchingPolicy
    from ilf_deploy.triton.repository import ExportOptions, generation_config

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
    from ilf_deploy.batching import BatchingPolicy

    values = BatchingPolicy.coerce({"max_batch": "4", "max_wait_ms": "2.5", "backend": "onnxruntime"})
    assert values == {"max_batch": 4, "max_wait_ms": 2.5, "backend": "onnxruntime"}
    assert BatchingPolicy(**BatchingPolicy.coerce({"max_n": "3"})).max_n == 3
    with pytest.raises(ConfigError, match="not a number"):
        BatchingPolicy.coerce({"max_queue": "many"})
