"""`export-triton` and `serve --server triton` against the real tritonserver (nvidia-pytriton wheel).

`make setup` installs the server (`ilf-deploy install-triton`); without it the server tests skip and
say so. One server runs for the module: it is started on 127.0.0.1 with free ports and stopped by
its PID. Config files are parsed with protobuf into Triton's own ModelConfig; Kubernetes objects
are loaded into the official client's models with unknown fields as errors.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import types
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.cli import app
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.model.tiny import make_tiny_pipeline
from ilf_deploy.serving.triton.repository import ExportOptions, export_repository, segment_model_name
from ilf_deploy.serving.triton.server import find_server

runner = CliRunner()
PROMPT = "a small red circle on a blue background"


def _server():
    try:
        return find_server()
    except ConfigError:
        return None


SERVER = _server()
needs_server = pytest.mark.skipif(
    SERVER is None, reason="tritonserver is not installed: `make setup` runs `ilf-deploy install-triton`"
)


def invoke(*args: Any):
    return runner.invoke(app, [str(a) for a in args])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triton")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-2", "ilf-4")))


@pytest.fixture(scope="module")
def dit_bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("triton-dit")
    model = make_tiny_pipeline("dit", root / "model", num_layers=2)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-2",), copy_model=False))


@pytest.fixture(scope="module")
def repository(bundle, dit_bundle, tmp_path_factory) -> Path:
    repo = tmp_path_factory.mktemp("repo")
    export_repository(dit_bundle, repo, ExportOptions(name="dit"))
    # a 100 ms batching window: 16 requests sent together are sure to meet in Triton's queue
    export_repository(bundle, repo, ExportOptions(name="tiny", max_batch=8, max_queue_delay_us=100_000))
    # one image at a time and one waiting: the 3rd concurrent request finds the queue full
    export_repository(bundle, repo, ExportOptions(name="tiny_q", max_batch=1, max_queue=1))
    broken = export_repository(bundle, repo, ExportOptions(name="broken", copy_bundle=True))[0]
    with (broken / "1" / "bundle" / "plans" / "base-2.json").open("a") as f:
        f.write(" ")  # an edited file: its sha256 no longer matches the manifest
    return repo


class Server:
    def __init__(self, process: subprocess.Popen, http: int, grpc: int, metrics: int, log: Path) -> None:
        self.process, self.log = process, log
        self.http, self.grpc, self.metrics = f"127.0.0.1:{http}", f"127.0.0.1:{grpc}", metrics
        self.clients: list[Any] = []  # closed before the server stops: it waits for open connections

    def metric(self, name: str, model: str) -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5).read().decode()
        pattern = rf'^{name}{{[^}}]*model="{model}"[^}}]*}} (\S+)$'
        return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)  # in the child: an ignored SIGINT is inherited


def start_server(command: list[str], env: dict[str, str], log: Path, ready: list[str], ports) -> Server:
    process = subprocess.Popen(
        command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, preexec_fn=default_sigint
    )  # the tests stop it with SIGINT, which a background pytest may have been started ignoring
    server = Server(process, *ports, log)
    deadline = time.monotonic() + 120
    pending = list(ready)
    while pending:
        if process.poll() is not None:
            raise AssertionError(f"tritonserver exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            stop(process)
            raise AssertionError(f"models {pending} not ready in 120 s:\n{log.read_text()[-3000:]}")
        try:
            url = f"http://{server.http}/v2/models/{pending[0]}/ready"
            if urllib.request.urlopen(url, timeout=2).status == 200:
                pending.pop(0)
                continue
        except OSError:
            pass
        time.sleep(0.2)
    return server


def stop(process: subprocess.Popen) -> None:
    """By its PID: SIGTERM, then SIGKILL if it has not exited in 30 s."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def server(repository, tmp_path_factory) -> Iterator[Server]:
    if SERVER is None:
        pytest.skip("tritonserver is not installed: `make setup` runs `ilf-deploy install-triton`")
    ports = (free_port(), free_port(), free_port())
    log = tmp_path_factory.mktemp("log") / "tritonserver.log"
    # explicit model control: the broken model is loaded by its test, through the repository API
    models = ["tiny", "tiny_q", "dit"]
    extra = ("--model-control-mode=explicit", *(f"--load-model={m}" for m in models))
    command = SERVER.command(repository, *ports, host="127.0.0.1", extra=extra)
    started = start_server(command, SERVER.environment(), log, models, ports)
    yield started
    for client in started.clients:
        client.close()
    stop(started.process)


# -- clients -------------------------------------------------------------------------------------
def inputs(module, prompt: str = PROMPT, seed: int = 0, **extra: Any) -> list:
    """InferInputs of one row each: prompt, seed and any of core/plan/height/width/guidance_scale."""
    values: dict[str, Any] = {"prompt": prompt, "seed": seed, **extra}
    kinds = {
        "prompt": ("BYTES", object),
        "negative_prompt": ("BYTES", object),
        "plan": ("BYTES", object),
        "seed": ("INT64", np.int64),
        "guidance_scale": ("FP32", np.float32),
        "height": ("INT32", np.int32),
        "width": ("INT32", np.int32),
    }
    out = []
    for name, value in values.items():
        datatype, dtype = kinds[name]
        if isinstance(value, tuple):  # (Triton datatype, numpy dtype, value): a deliberately wrong type
            datatype, dtype, value = value
        array = np.array([[value.encode() if isinstance(value, str) else value]], dtype=dtype)
        tensor = module.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        out.append(tensor)
    return out


def http_client(server: Server):
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http, concurrency=16, network_timeout=120)
    server.clients.append(client)
    return http, client


def grpc_client(server: Server):
    import tritonclient.grpc as grpc

    client = grpc.InferenceServerClient(server.grpc)
    server.clients.append(client)
    return grpc, client


def generate_png(bundle: Path, plan: str, seed: int, out: Path) -> np.ndarray:
    result = invoke("generate", bundle, "--plan", plan, "--prompt", PROMPT, "--seed", seed, "--out", out)
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out))


# -- the real server -----------------------------------------------------------------------------
@needs_server
@pytest.mark.parametrize("plan", ["ilf-4", "base-2"])
def test_http_and_grpc_images_equal_ilf_deploy_generate(server, bundle, tmp_path, plan):
    expected = generate_png(bundle, plan, 5, tmp_path / "generate.png")
    for module, client in (http_client(server), grpc_client(server)):
        result = client.infer("tiny", inputs(module, seed=5, plan=plan))
        image = result.as_numpy("image")
        assert image.dtype == np.uint8 and image.shape == (1, *expected.shape)
        np.testing.assert_array_equal(image[0], expected)  # the PNG's pixels, bit for bit


@needs_server
def test_dit_class_labels_equal_ilf_deploy_generate(server, dit_bundle, tmp_path):
    from tritonclient.utils import InferenceServerException

    out = tmp_path / "dit.png"
    result = invoke("generate", dit_bundle, "--plan", "base-2", "--class-label", 3, "--seed", 6, "--out", out)
    assert result.exit_code == 0, result.output
    expected = np.asarray(Image.open(out))
    for module, client in (http_client(server), grpc_client(server)):
        tensors = []
        for name, value in (("class_label", 3), ("seed", 6)):
            tensor = module.InferInput(name, [1, 1], "INT64")
            tensor.set_data_from_numpy(np.array([[value]], dtype=np.int64))
            tensors.append(tensor)
        np.testing.assert_array_equal(client.infer("dit", tensors).as_numpy("image")[0], expected)
        tensors[0].set_data_from_numpy(np.array([[1000]], dtype=np.int64))
        with pytest.raises(InferenceServerException, match=r"class_label must be in 0\.\.\d+, got 1000"):
            client.infer("dit", tensors)
        with pytest.raises(InferenceServerException, match="class_label is required"):
            client.infer("dit", tensors[1:])


@needs_server
def test_a_request_of_several_rows_gets_one_image_per_row(server, bundle, tmp_path):
    from tritonclient.utils import InferenceServerException

    http, client = http_client(server)
    prompts = http.InferInput("prompt", [2, 1], "BYTES")
    prompts.set_data_from_numpy(np.array([[PROMPT.encode()], [PROMPT.encode()]], dtype=object))
    seeds = http.InferInput("seed", [2, 1], "INT64")
    seeds.set_data_from_numpy(np.array([[11], [12]], dtype=np.int64))
    images = client.infer("tiny", [prompts, seeds]).as_numpy("image")
    assert images.shape == (2, 32, 32, 3)
    for image, seed in zip(images, (11, 12)):  # one batch of two: equal up to float rounding
        expected = generate_png(bundle, "ilf-4", seed, tmp_path / f"{seed}.png")
        assert np.abs(image.astype(int) - expected.astype(int)).mean() < 0.5
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 5  # two seeds, two images
    seeds = http.InferInput("seed", [1, 1], "INT64")
    seeds.set_data_from_numpy(np.array([[11]], dtype=np.int64))
    with pytest.raises(InferenceServerException, match="'prompt' batch size does not match other inputs"):
        client.infer("tiny", [prompts, seeds])


@needs_server
def test_default_plan_is_the_bundles_ilf_plan(server, bundle, tmp_path):
    http, client = http_client(server)
    expected = generate_png(bundle, "ilf-4", 9, tmp_path / "generate.png")
    np.testing.assert_array_equal(client.infer("tiny", inputs(http, seed=9)).as_numpy("image")[0], expected)


@needs_server
def test_concurrent_requests_are_batched_and_keep_their_seeds(server, bundle):
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.engines.backends import open_generator

    generator = open_generator(bundle)
    plan = generator.bundle.plan("ilf-4")
    seeds = list(range(100, 116))
    references = [
        generator.decode(generator.generate_latents(plan, Request(PROMPT, seed=s)))[0] for s in seeds
    ]
    http, client = http_client(server)
    executions = server.metric("nv_inference_exec_count", "tiny")
    successes = server.metric("nv_inference_request_success", "tiny")
    pending = [client.async_infer("tiny", inputs(http, seed=s)) for s in seeds]  # 16 in flight at once
    images = [p.get_result().as_numpy("image")[0] for p in pending]
    assert server.metric("nv_inference_request_success", "tiny") - successes == len(seeds)
    batches = server.metric("nv_inference_exec_count", "tiny") - executions
    assert batches < len(seeds), f"{batches} executions for {len(seeds)} requests: nothing was batched"
    for i, image in enumerate(images):
        # Batched rows may differ from a batch of one by float rounding, not by a whole image.
        errors = [np.abs(image.astype(int) - ref.astype(int)).mean() for ref in references]
        assert int(np.argmin(errors)) == i and errors[i] < 0.5, (
            i,
            errors[i],
            min(errors[:i] + errors[i + 1 :]),
        )


@needs_server
@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"plan": "nope"}, "unknown plan 'nope'; this bundle has: base-2, ilf-4"),
        ({"height": 48, "width": 48}, "the bundle was built for 32x32, not 48x48"),
        ({"prompt": "circle " * 200}, "prompt is 201 tokens long; this model reads at most 120"),
        ({"prompt": "   "}, "prompt must not be empty"),
        ({"seed": -1}, "seed must be >= 0, got -1"),
        ({"guidance_scale": float("nan")}, "guidance_scale must be in 0..30"),
        (
            {"seed": ("FP32", np.float32, 1.0)},
            "inference input 'seed' data-type is 'FP32', but model 'tiny' expects 'INT64'",
        ),
    ],
)
def test_bad_requests_get_one_line_errors_and_the_model_stays_up(server, extra, message):
    from tritonclient.utils import InferenceServerException

    for module, client in (http_client(server), grpc_client(server)):
        with pytest.raises(InferenceServerException) as error:
            client.infer("tiny", inputs(module, **{"seed": 1, **extra}))
        assert message in error.value.message(), error.value.message()
        assert "\n" not in error.value.message()
        if module.__name__ == "tritonclient.http":
            assert error.value.status() == "400"  # the client's error, not the server's
        assert client.is_model_ready("tiny")
        assert client.infer("tiny", inputs(module, seed=2)).as_numpy("image").shape == (1, 32, 32, 3)


@needs_server
def test_bad_row_fails_only_its_request_in_a_shared_batch(server):
    from tritonclient.utils import InferenceServerException

    http, client = http_client(server)
    good = client.async_infer("tiny", inputs(http, seed=3))
    bad = client.async_infer("tiny", inputs(http, seed=3, plan="nope"))
    assert good.get_result().as_numpy("image").shape == (1, 32, 32, 3)
    with pytest.raises(InferenceServerException, match="unknown plan"):
        bad.get_result()


@needs_server
def test_full_queue_rejects_at_once(server):
    import tritonclient.http as http

    # one connection per request, all sent before any is read: a few ms of inference each must not
    # drain the queue (1 running + 1 waiting) between arrivals, as 12 requests over 16 connections once did
    burst = 48
    client = http.InferenceServerClient(server.http, concurrency=burst, network_timeout=120)
    server.clients.append(client)
    started = time.monotonic()
    pending = [client.async_infer("tiny_q", inputs(http, seed=s, plan="ilf-4")) for s in range(burst)]
    outcomes = []
    for p in pending:
        try:
            p.get_result()
            outcomes.append("ok")
        except Exception as exc:  # InferenceServerException
            outcomes.append(str(exc))
    rejected = [o for o in outcomes if o != "ok"]
    assert "ok" in outcomes and rejected, outcomes
    assert all("Exceeds maximum queue size" in o for o in rejected), rejected
    assert time.monotonic() - started < 30
    assert client.infer("tiny_q", inputs(http, seed=1)).as_numpy("image").shape == (1, 32, 32, 3)


@needs_server
def test_corrupted_bundle_model_is_not_ready_and_the_log_says_why(server):
    from tritonclient.utils import InferenceServerException

    _, client = http_client(server)
    with pytest.raises(InferenceServerException) as error:
        client.load_model("broken")
    line = "plans/base-2.json does not match its sha256 in the manifest (edited or corrupted)"
    assert line in error.value.message()
    assert not client.is_model_ready("broken")
    assert client.is_model_ready("tiny")  # the others keep serving
    logged = [row for row in server.log.read_text().splitlines() if line in row]
    assert any("ilf-deploy: broken:" in row for row in logged), server.log.read_text()[-2000:]


# -- serve --server triton -------------------------------------------------------------------------
@needs_server
def test_serve_server_triton_serves_until_interrupted(bundle, tmp_path):
    ports = [free_port(), free_port(), free_port()]
    command = [
        str(Path(sys.executable).parent / "ilf-deploy"), "serve", str(bundle), "--server", "triton",
        "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
    ]  # fmt: skip
    log = tmp_path / "serve.log"
    server = start_server(command, dict(os.environ), log, ["ilf"], ports)
    try:
        http, client = http_client(server)
        expected = generate_png(bundle, "ilf-4", 4, tmp_path / "generate.png")
        np.testing.assert_array_equal(
            client.infer("ilf", inputs(http, seed=4)).as_numpy("image")[0], expected
        )
        client.close()  # Triton waits (up to 30 s) for open HTTP connections when it stops
        deadline = time.monotonic() + 10
        while "ready: POST http://127.0.0.1" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)  # the CLI polls readiness every 0.5 s
    finally:
        server.process.send_signal(signal.SIGINT)  # Ctrl-C: Triton stops, the temporary repository goes
        assert server.process.wait(timeout=60) == 0, log.read_text()[-2000:]
    assert "ready: POST http://127.0.0.1" in log.read_text()


def test_serve_server_triton_without_the_server_is_one_line(bundle, tmp_path, monkeypatch):
    monkeypatch.setenv("ILF_TRITON_HOME", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no tritonserver on PATH either
    result = invoke("serve", bundle, "--server", "triton")
    assert result.exit_code == 2
    assert "run `ilf-deploy install-triton`" in result.output
    assert "Traceback" not in result.output
    result = invoke("serve", bundle, "--server", "nginx")
    assert result.exit_code == 2 and "--server must be one of ilf, triton" in result.output


# -- the repository's files ----------------------------------------------------------------------
def parse_config(path: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())


def test_export_cli_writes_configs_that_parse_as_triton_model_configs(bundle, tmp_path):
    result = invoke(
        "export-triton", bundle, "--out", tmp_path, "--name", "gen", "--instances", "2", "--kind", "gpu",
        "--max-batch", "4", "--max-queue-delay-us", "2500", "--max-queue", "7", "--default-plan", "base-2",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    config = parse_config(tmp_path / "gen" / "config.pbtxt")
    assert config.name == "gen" and config.backend == "python" and config.max_batch_size == 4
    types_ = {i.name: (model_config_pb2_name(i.data_type), i.optional) for i in config.input}
    assert types_ == {
        "prompt": ("TYPE_STRING", False),
        "negative_prompt": ("TYPE_STRING", True),
        "seed": ("TYPE_INT64", True),
        "plan": ("TYPE_STRING", True),
        "guidance_scale": ("TYPE_FP32", True),
        "height": ("TYPE_INT32", True),
        "width": ("TYPE_INT32", True),
    }
    assert [(o.name, list(o.dims)) for o in config.output] == [("image", [-1, -1, 3])]
    assert config.instance_group[0].count == 2 and config.instance_group[0].kind == 1  # KIND_GPU
    batching = config.dynamic_batching
    assert list(batching.preferred_batch_size) == [4] and batching.max_queue_delay_microseconds == 2500
    assert (
        batching.default_queue_policy.max_queue_size == 7
        and batching.default_queue_policy.timeout_action == 0
    )
    assert config.version_policy.latest.num_versions == 1
    (warmup,) = config.model_warmup  # one image through `execute` before the model is ready
    assert warmup.batch_size == 1 and warmup.inputs["prompt"].input_data_file == "prompt"
    assert (tmp_path / "gen" / "warmup" / "prompt").read_bytes() == b"\x07\x00\x00\x00warm up"
    params = {k: v.string_value for k, v in config.parameters.items()}
    assert params["bundle"] == str(bundle.resolve()) and params["default_plan"] == "base-2"
    assert "IlfPythonModel" in (tmp_path / "gen" / "1" / "model.py").read_text()
    # an existing model is not overwritten without --force
    again = invoke("export-triton", bundle, "--out", tmp_path, "--name", "gen")
    assert again.exit_code == 2 and "pass --force" in again.output


def model_config_pb2_name(value: int) -> str:
    from tritonclient.grpc import model_config_pb2

    return model_config_pb2.DataType.Name(value)


def test_export_refuses_a_corrupted_bundle_in_one_line(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "onnx" / "final.onnx").write_bytes(b"not onnx")
    result = invoke("export-triton", copy, "--out", tmp_path / "repo")
    assert result.exit_code == 2
    assert "onnx/final.onnx does not match its sha256" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "repo" / "ilf").exists()
    for args, message in [
        (("--kind", "tpu"), "--kind must be one of cpu, gpu"),
        (("--backend", "nope"), "unknown backend 'nope'"),
        (("--name", "a/b"), "--name 'a/b'"),
        (("--layout", "bls", "--backend", "torch"), "--layout bls runs segments in Triton's"),
    ]:
        result = invoke("export-triton", bundle, "--out", tmp_path / "repo2", *args)
        assert result.exit_code == 2 and message in result.output, result.output


def test_install_triton_refuses_what_is_not_the_server_wheel(tmp_path, monkeypatch):
    import zipfile

    monkeypatch.setenv("ILF_TRITON_HOME", str(tmp_path / "home"))

    not_a_wheel = tmp_path / "x.whl"
    not_a_wheel.write_text("no")
    result = invoke("install-triton", "--wheel", not_a_wheel)
    assert result.exit_code == 2 and "is not a wheel" in result.output
    other = tmp_path / "other-1.0-py3-none-any.whl"
    with zipfile.ZipFile(other, "w") as archive:
        archive.writestr("pytriton/tritonserver/README", "no binary")
    from ilf_deploy.serving.triton.server import install_server

    with pytest.raises(ConfigError, match="holds no tritonserver"):
        install_server(tmp_path / "home", wheel=other)
    assert not (tmp_path / "home").exists()


# -- the BLS layout, with a fake Triton Python backend ---------------------------------------------
class FakeTriton:
    """What `triton_python_backend_utils` gives a model, with BLS calls answered by ONNX Runtime
    sessions over the repository's segment models; each call is checked against the segment's
    config.pbtxt (model name, input names and dtypes, requested outputs)."""

    def __init__(self, repo: Path) -> None:
        import onnxruntime as ort

        self.repo, self.calls, self._sessions, self._ort = repo, [], {}, ort
        self.metrics: dict[tuple, float] = {}  # (name, *sorted labels) -> value
        fake = types.SimpleNamespace()
        fake.Tensor = FakeTensor
        fake.InferenceRequest = lambda **kw: FakeRequest(self, **kw)
        fake.InferenceResponse = FakeResponse
        fake.TritonError = FakeError
        fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
        fake.TritonModelException = type("TritonModelException", (Exception,), {})
        fake.Logger = types.SimpleNamespace(
            log_error=lambda msg: self.calls.append(("log", msg)),
            log_warn=lambda msg: self.calls.append(("warn", msg)),
        )
        fake.MetricFamily = type("MetricFamily", (FakeMetricFamily,), {"values": self.metrics})
        fake.get_input_tensor_by_name = lambda request, name: request.tensors.get(name)
        fake.get_output_tensor_by_name = lambda response, name: response.tensors.get(name)
        self.module = fake

    def run(self, model_name: str, outputs: list[str], inputs: list[FakeTensor]) -> FakeResponse:
        from tritonclient.grpc import model_config_pb2

        config = parse_config(self.repo / model_name / "config.pbtxt")
        assert config.platform == "onnxruntime_onnx"
        declared = {i.name: model_config_pb2.DataType.Name(i.data_type) for i in config.input}
        names = {"TYPE_FP32": "float32", "TYPE_INT64": "int64", "TYPE_FP16": "float16"}
        assert {t.name: names[declared[t.name]] for t in inputs} == {
            t.name: str(t.array.dtype) for t in inputs
        }
        assert set(outputs) <= {o.name for o in config.output}
        if model_name not in self._sessions:
            path = str(self.repo / model_name / "1" / "model.onnx")
            self._sessions[model_name] = self._ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        self.calls.append(("bls", model_name))
        values = self._sessions[model_name].run(outputs, {t.name: t.array for t in inputs})
        return FakeResponse([FakeTensor(n, v) for n, v in zip(outputs, values)])


class FakeMetricFamily:
    """pb_utils.MetricFamily's counters, summed in the FakeTriton's `metrics`."""

    COUNTER = "counter"
    values: dict[tuple, float]

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name = name

    def Metric(self, labels: dict[str, str]) -> types.SimpleNamespace:
        key = (self.name, *sorted(labels.items()))

        def increment(amount: float) -> None:
            self.values[key] = self.values.get(key, 0) + amount

        return types.SimpleNamespace(increment=increment)


class FakeTensor:
    def __init__(self, name: str, array: np.ndarray) -> None:
        self.name, self.array = name, np.asarray(array)

    def as_numpy(self) -> np.ndarray:
        return self.array


class FakeRequest:
    def __init__(
        self, triton: FakeTriton, model_name: str, requested_output_names: list[str], inputs: list
    ) -> None:
        self.triton, self.model_name, self.outputs, self.inputs = (
            triton,
            model_name,
            requested_output_names,
            inputs,
        )

    def exec(self) -> FakeResponse:
        return self.triton.run(self.model_name, self.outputs, self.inputs)


class FakeError:
    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        self._message, self.code = message, code

    def message(self) -> str:
        return self._message


class FakeResponse:
    def __init__(self, output_tensors: list[FakeTensor], error: FakeError | None = None) -> None:
        self.tensors = {t.name: t for t in output_tensors}
        self.error_ = error

    def has_error(self) -> bool:
        return self.error_ is not None

    def error(self) -> FakeError | None:
        return self.error_


def load_model(repo: Path, name: str, fake: FakeTriton, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake.module)
    from ilf_deploy.serving.triton import model as triton_model

    config = parse_config(repo / name / "config.pbtxt")
    from google.protobuf import json_format

    cls = re.search(r"import (\w+) as TritonPythonModel", (repo / name / "1" / "model.py").read_text())[1]
    instance = getattr(triton_model, cls)()
    instance.initialize(
        {
            "model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
            "model_repository": str(repo / name),
            "model_version": "1",
            "model_name": name,
            "model_instance_kind": "CPU",
        }
    )
    return instance


def fake_request(**values: Any) -> types.SimpleNamespace:
    arrays = {k: np.array([[v.encode() if isinstance(v, str) else v]]) for k, v in values.items()}
    request = types.SimpleNamespace(tensors={k: FakeTensor(k, v) for k, v in arrays.items()}, sent=[])
    sender = types.SimpleNamespace(send=lambda response, flags: request.sent.append(response))
    request.get_response_sender = lambda: sender
    return request


def test_bls_layout_runs_the_same_loop_through_segment_models(bundle, tmp_path, monkeypatch):
    result = invoke(
        "export-triton", bundle, "--out", tmp_path, "--layout", "bls", "--name", "gen", "--no-warmup"
    )
    assert result.exit_code == 0, result.output
    segments = Path(bundle, "manifest.json").read_text()
    names = list(json.loads(segments)["segments"])
    for name in names:  # one onnxruntime_onnx model per segment, with its ONNX file
        config = parse_config(tmp_path / segment_model_name("gen", name) / "config.pbtxt")
        assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 0
        assert (tmp_path / segment_model_name("gen", name) / "1" / "model.onnx").is_file()
    assert parse_config(tmp_path / "gen" / "config.pbtxt").backend == "python"
    fake = FakeTriton(tmp_path)
    model = load_model(tmp_path, "gen", fake, monkeypatch)
    requests = [
        fake_request(prompt=PROMPT, seed=np.int64(7), plan="ilf-4"),
        fake_request(prompt=PROMPT, seed=np.int64(8), plan="base-2"),
        fake_request(prompt=PROMPT, seed=np.int64(7), plan="nope"),
    ]
    responses = model.execute(requests)  # one response per request, the refused one's an error
    assert responses[2].has_error() and "unknown plan 'nope'" in responses[2].error().message()
    assert responses[2].error().code == "INVALID_ARG"
    called = {name for kind, name in fake.calls if kind == "bls"}
    assert called == {segment_model_name("gen", n) for n in names}  # every segment ran through BLS
    for response, (plan, seed) in zip(responses[:2], [("ilf-4", 7), ("base-2", 8)]):
        expected = generate_png(bundle, plan, seed, tmp_path / f"{plan}.png")
        np.testing.assert_array_equal(response.tensors["image"].as_numpy()[0], expected)


def test_python_model_reports_a_corrupted_bundle_in_one_logged_line(bundle, tmp_path, monkeypatch):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    export_repository(copy, tmp_path / "repo", ExportOptions(name="gen", warmup=False))
    (copy / "tokenizer" / "tokenizer.json").write_text("{}")
    fake = FakeTriton(tmp_path / "repo")
    with pytest.raises(Exception, match=r"tokenizer/tokenizer\.json does not match its sha256") as error:
        load_model(tmp_path / "repo", "gen", fake, monkeypatch)
    assert type(error.value).__name__ == "TritonModelException"
    assert [kind for kind, _ in fake.calls] == ["log"] and "\n" not in fake.calls[0][1]


# -- Kubernetes ------------------------------------------------------------------------------------
def strict_model(type_name: str, value: Any, path: str = "$") -> Any:
    """`value` as the kubernetes client's model `type_name`; unknown or mistyped fields are errors."""
    import kubernetes.client as k8s

    match = re.fullmatch(r"(?:list|List)\[(.+)\]", type_name)
    if match:
        assert isinstance(value, list), f"{path}: expected a list"
        return [strict_model(match[1], v, f"{path}[{i}]") for i, v in enumerate(value)]
    match = re.fullmatch(r"(?:dict\(str, (.+)\)|Dict\[str, (.+)\])", type_name)
    if match:
        assert isinstance(value, dict), f"{path}: expected a mapping"
        return {key: strict_model(match[1] or match[2], v, f"{path}.{key}") for key, v in value.items()}
    scalars = {"str": str, "int": int, "bool": bool, "float": (int, float)}
    if type_name in scalars:
        assert isinstance(value, scalars[type_name]), f"{path}: expected {type_name}, got {value!r}"
        return value
    if type_name == "object":  # IntOrString, quantities
        return value
    cls = getattr(k8s, type_name)
    assert isinstance(value, dict), f"{path}: expected a {type_name} object"
    fields = {json_key: attr for attr, json_key in cls.attribute_map.items()}
    unknown = sorted(set(value) - set(fields))
    assert not unknown, f"{path}: {type_name} has no field(s) {unknown}"
    return cls(
        **{
            fields[key]: strict_model(cls.openapi_types[fields[key]], v, f"{path}.{key}")
            for key, v in value.items()
        }
    )


def test_k8s_manifests_load_into_the_kubernetes_models(bundle, tmp_path):
    result = invoke(
        "export-triton", bundle, "--out", tmp_path / "repo", "--copy-bundle", "--k8s", tmp_path / "k8s",
        "--replicas", "3", "--max-replicas", "6", "--kind", "gpu", "--image", "registry.example/ilf-triton:1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (tmp_path / "repo" / "ilf" / "1" / "bundle" / "manifest.json").is_file()
    objects = list(yaml.safe_load_all((tmp_path / "k8s" / "triton.yaml").read_text()))
    kinds = {
        "Deployment": "V1Deployment",
        "Service": "V1Service",
        "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
        "PodDisruptionBudget": "V1PodDisruptionBudget",
    }
    loaded = {o["kind"]: strict_model(kinds[o["kind"]], o) for o in objects}
    assert set(loaded) == set(kinds)
    deployment = loaded["Deployment"]
    assert deployment.spec.replicas == 3
    container = deployment.spec.template.spec.containers[0]
    assert container.image == "registry.example/ilf-triton:1"
    assert container.readiness_probe.http_get.path == "/v2/health/ready"
    assert container.resources.limits["nvidia.com/gpu"] == "1"
    assert {p.container_port for p in container.ports} == {8000, 8001, 8002}
    # deletion drains: routed away during the preStop sleep, then Triton's exit timeout, in the grace
    sleep = int(container.lifecycle.pre_stop._exec.command[-1])
    (exit_timeout,) = [int(a.split("=")[1]) for a in container.args if a.startswith("--exit-timeout-secs=")]
    assert sleep > 0 and deployment.spec.template.spec.termination_grace_period_seconds > sleep + exit_timeout
    assert deployment.spec.selector.match_labels == loaded["Service"].spec.selector
    hpa = loaded["HorizontalPodAutoscaler"]
    assert (hpa.spec.min_replicas, hpa.spec.max_replicas) == (3, 6)
    assert hpa.spec.metrics[0].pods.metric.name == "triton_queue_us_per_request"
    (service, _budget) = yaml.safe_load_all((tmp_path / "k8s" / "kserve.yaml").read_text())
    # KServe's CRD is not in the kubernetes client: its pod parts are checked with the core models
    assert (service["apiVersion"], service["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    strict_model("V1ObjectMeta", service["metadata"])
    predictor = service["spec"]["predictor"]
    assert set(predictor) == {
        "minReplicas",
        "maxReplicas",
        "autoScaling",
        "terminationGracePeriodSeconds",
        "initContainers",
        "containers",
        "volumes",
        "securityContext",  # tests/test_manifests.py checks the hardening and placement
        "tolerations",  # --kind gpu
    }
    (check,) = strict_model("list[V1Container]", predictor["initContainers"])  # the bundle's digest
    assert check.command[:2] == ["ilf-deploy", "inspect"] and check.command[-2] == "--digest"
    (kserve_container,) = strict_model("list[V1Container]", predictor["containers"])
    assert kserve_container.name == "kserve-container"
    strict_model("list[V1Volume]", predictor["volumes"])
    assert (
        "nv_inference_queue_duration_us"
        in predictor["autoScaling"]["metrics"][0]["external"]["metric"]["query"]
    )
    without_copy = invoke("export-triton", bundle, "--out", tmp_path / "r2", "--k8s", tmp_path / "k2")
    assert without_copy.exit_code == 2 and "--k8s needs --copy-bundle" in without_copy.output
