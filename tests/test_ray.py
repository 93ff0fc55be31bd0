"""Ray: `batch --ray-address` (a Ray actor pool) and `serve --server ray` (Ray Serve) on a real cluster of two
Ray nodes, the KubeRay manifests, and Ray Serve's batching in front of our engine.

The cluster (one per module, ~1 GiB): a head with 2 CPUs and a second node process with 1 CPU,
started by `tests/support/ray_sandbox.py` inside a private network and PID namespace (Ray binds to the
machine's interface address even when told 127.0.0.1), so every driver and HTTP client of these tests
runs in the namespace too; nodes and drivers are stopped by their PIDs, the namespace by its first
process. The tests that need it skip, saying why, where `unshare` is not permitted (CI runs as root).
The worker-node test is last: it leaves the cluster with the head alone.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import shlex
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import yaml
from PIL import Image
from typer.testing import CliRunner

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.cli import app
from ilf_deploy.core.errors import ConfigError, IlfError
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.model.tiny import make_tiny_pipeline
from ilf_deploy.serving.scale.ship import CACHE_ENV
from ilf_deploy.serving.scale.worker import BatchWorker, job
from tests.support.ray_sandbox import ADDRESS, BIN, Sandbox, unavailable
from tests.test_batch import generate_png

pytest.importorskip("ray", reason="the ray extra is not installed (make setup installs it)")

runner = CliRunner()
PROMPT = "a small red circle on a blue background"
SLOW = {"plan": "base-20", "size": "128x128"}  # ~0.25 s an image here: slow enough to kill mid-batch
REASON = unavailable()
needs_cluster = pytest.mark.skipif(REASON is not None, reason=f"no Ray sandbox: {REASON}")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    options = BuildOptions(
        plans=("base-2", "ilf-4", "base-20"), resolutions=((32, 32), (128, 128)), copy_model=False
    )
    return build_bundle(model, root / "bundle", options)


@dataclass
class Cluster:
    sandbox: Sandbox
    head: str  # node ids
    worker: str
    caches: dict[str, Path]  # each node's cache of shipped bundles


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if REASON is not None:
        pytest.skip(f"no Ray sandbox: {REASON}")
    caches = {name: tmp_path_factory.mktemp(f"cache-{name}") for name in ("head", "worker")}
    sandbox = Sandbox().start()
    try:
        sandbox.add_node(2, head=True, env={CACHE_ENV: str(caches["head"])})
        sandbox.wait_for_head()
        sandbox.add_node(1, env={CACHE_ENV: str(caches["worker"])})
        nodes = sandbox.wait()
        head = next(n["id"] for n in nodes if n["head"])
        worker = next(n["id"] for n in nodes if not n["head"])
        yield Cluster(sandbox, head, worker, caches)
    finally:
        sandbox.close()


def write_prompts(path: Path, rows: int, bad: int | None = None, **extra) -> Path:
    lines = [{"prompt": PROMPT, "seed": i, **extra} for i in range(rows)]
    if bad is not None:
        lines[bad] = {"prompt": PROMPT, "seed": -1}
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def read_rows(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def ray_batch(bundle: Path, prompts: Path, out: Path, *extra, actors: int | None = 2) -> list:
    """`ilf-deploy batch` on the cluster, 2 actors or the default pool (to run in the namespace)."""
    command = [BIN / "ilf-deploy", "batch", bundle, "--prompts", prompts, "--out", out]
    sized = [] if actors is None else ["--actors", str(actors)]
    return [*command, "--ray-address", ADDRESS, *sized, *extra]


def wait_for_rows(out: Path, process, enough) -> list[dict]:
    deadline = time.monotonic() + 180
    while True:
        rows = read_rows(out)
        if enough(rows):
            return rows
        assert process.poll() is None, f"the batch ended ({process.returncode}) first: {len(rows)} rows"
        assert time.monotonic() < deadline, f"only {len(rows)} rows in 180 s"
        time.sleep(0.02)


# -- batch on Ray actors ---------------------------------------------------------------------------
@needs_cluster
def test_batch_on_two_nodes_is_the_local_batch(cluster, bundle, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 24, bad=7)
    lines = [json.loads(line) for line in prompts.read_text().splitlines()]
    out = tmp_path / "ray"
    # the other tests: a shared path and 2 actors; this one the default pool, sized from the cluster
    command = ray_batch(bundle, prompts, out, "--ship-bundle", actors=None)
    done = cluster.sandbox.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "23 rows to make on 3 Ray actors (3 cluster CPUs, 1 each)" in done.stderr, done.stderr[-2000:]
    assert "24 rows: 23 images, 1 refused, 0 failed" in done.stderr, done.stderr[-2000:]
    assert "Warning" not in done.stderr, done.stderr[-3000:]  # e.g. Ray's deprecated settings
    rows = read_rows(out)
    assert sorted(r["index"] for r in rows) == list(range(24))  # every index once
    bad = next(r for r in rows if r["index"] == 7)
    assert bad["error"] == "seed must be >= 0, got -1" and bad["file"] is None
    assert {r["worker"]["node"] for r in rows if r["worker"]} == {cluster.head, cluster.worker}
    local = tmp_path / "local"  # this process, no Ray: the images `generate` makes (test_batch.py)
    assert invoke("batch", bundle, "--prompts", prompts, "--out", local).exit_code == 0
    expected = {r["index"]: r["sha256"] for r in read_rows(local)}
    assert {r["index"]: r["sha256"] for r in rows} == expected
    for row in rows[-3:]:
        png = (out / row["file"]).read_bytes()
        assert hashlib.sha256(png).hexdigest() == row["sha256"]
    for node in (cluster.head, cluster.worker):  # and one row of each node against `generate` itself
        row = next(r for r in rows if r["worker"] and r["worker"]["node"] == node)
        made = generate_png(bundle, tmp_path / f"generate-{row['index']}.png", lines[row["index"]])
        assert (out / row["file"]).read_bytes() == made, row
    digest = Bundle.load(bundle).digest.removeprefix("sha256:")
    for cache in cluster.caches.values():  # shipped: each node wrote its own copy (removed: serve's
        assert (cache / digest / bundle.name / "manifest.json").is_file()  # test checks its own)
        shutil.rmtree(cache / digest)


@needs_cluster
def test_a_killed_driver_is_resumed_without_duplicates(cluster, bundle, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 40, **SLOW)
    out = tmp_path / "out"
    driver = cluster.sandbox.popen(ray_batch(bundle, prompts, out), stderr=(tmp_path / "1.log").open("w"))
    wait_for_rows(out, driver, lambda rows: len(rows) >= 4)
    cluster.sandbox.signal(driver, signal.SIGKILL)  # the driver, not its nsenter
    driver.wait(timeout=60)
    before = read_rows(out)
    assert 4 <= len(before) < 40, len(before)
    again = cluster.sandbox.run(ray_batch(bundle, prompts, out), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"40 rows, {len(before)} from an earlier run" in again.stderr, again.stderr[-2000:]
    rows = read_rows(out)
    assert rows[: len(before)] == before  # nothing redone
    assert sorted(r["index"] for r in rows) == list(range(40)) and not any(r["error"] for r in rows)


UNOPENED = """
import shutil, sys
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.serving.scale.options import BatchOptions
from ilf_deploy.serving.scale.ray_batch import run_on_ray
bundle = Bundle.load(sys.argv[1])
shutil.rmtree(sys.argv[1])  # gone from the shared path after the driver opened it
options = BatchOptions(bundle.path, None, None, ray_address=sys.argv[2], actors=2)
try:
    list(run_on_ray(options, [{"index": 0, "plan": "ilf-4", "request": {"prompt": "x"}}], bundle))
except Exception as exc:
    sys.exit(f"{type(exc).__name__}: {exc}")
"""


@needs_cluster
def test_actors_that_cannot_open_the_bundle_fail_the_batch_at_once_in_one_line(cluster, bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "bundle")
    done = cluster.sandbox.run(
        [sys.executable, "-c", UNOPENED, copy, ADDRESS], capture_output=True, text=True, timeout=120
    )
    expected = f"ConfigError: the Ray batch failed: {copy} is not a bundle on node"
    assert done.returncode == 1 and done.stderr.strip().splitlines()[-1].startswith(expected), done.stderr
    assert "Traceback" not in done.stdout + done.stderr  # not retried: Ray prints each retry's traceback


# -- serve on Ray Serve ----------------------------------------------------------------------------
CLIENT = r"""
import base64, json, sys
from concurrent.futures import ThreadPoolExecutor
import httpx
url, seeds, key = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
http = httpx.Client(base_url=url, timeout=120)
auth = {"Authorization": f"Bearer {key}"}

def post(body, headers=None, keyed=True):
    r = http.post("/v1/images/generations", json=body, headers={**(auth if keyed else {}), **(headers or {})})
    images = [d["b64_json"] for d in r.json().get("data", [])] if r.status_code == 200 else []
    return {"status": r.status_code, "body": r.json() if r.status_code != 200 else None, "images": images,
            "replica": r.headers.get("x-ilf-replica"), "request_ids": r.headers.get_list("x-request-id")}

body = lambda seed: {"prompt": "a small red circle on a blue background", "plan": "ilf-4", "seed": seed}
with ThreadPoolExecutor(8) as pool:
    together = list(pool.map(lambda s: post(body(s), {"X-Request-ID": f"req-{s}"}), seeds))
print(json.dumps({
    "together": together,
    "alone": post(body(7)),
    "bad": post({"prompt": "a small red circle on a blue background", "seed": -1}),
    "anonymous": post(body(1), keyed=False),
    "models": http.get("/v1/models", headers=auth).json(),
    "ready": http.get("/readyz").status_code,
    "metrics": http.get("/metrics", headers=auth).text,
    "metrics_anonymous": http.get("/metrics").status_code,
}))
"""
KEYS = "ray-test:sk-ray-0123456789abcdef"  # ILF_API_KEYS of `serve --server ray` (NAME:KEY)
KEY = KEYS.split(":", 1)[1]


def png_pixels(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))


def serve_400(bundle: Path, body: dict, keys: str | None = None, key: str | None = None) -> tuple[int, dict]:
    """What `ilf-deploy serve` (our server, this process; `keys` as ILF_API_KEYS) answers."""
    from fastapi.testclient import TestClient

    from ilf_deploy.serving.serve import ServeOptions, create_app
    from ilf_deploy.serving.serve.auth import load_keys

    options = ServeOptions(warmup=False, api_keys=load_keys(None, keys))
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with TestClient(create_app(bundle, options)) as client:
        response = client.post("/v1/images/generations", json=body, headers=headers)
        return response.status_code, response.json()


def start_ray_serve(cluster: Cluster, bundle: Path, log: Path, *extra):
    command = [BIN / "ilf-deploy", "serve", bundle, "--server", "ray", "--ray-address", ADDRESS, *extra]
    env = {"ILF_API_KEYS": KEYS}  # the driver reads the keys; every replica checks them
    server = cluster.sandbox.popen(command, stdout=log.open("w"), stderr=log.open("a"), env=env)
    deadline = time.monotonic() + 240
    while "serving " not in log.read_text():  # printed once every replica is up
        assert server.poll() is None, (
            f"serve --server ray exited {server.returncode}:\n{log.read_text()[-3000:]}"
        )
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    return server


@needs_cluster
def test_serve_on_two_replicas_answers_from_both_with_generates_images(cluster, bundle, tmp_path):
    log = tmp_path / "serve.log"
    server = start_ray_serve(
        cluster, bundle, log, "--replicas", "2", "--port", "8123", "--ship-bundle", "--max-batch", "4"
    )
    try:
        seeds = list(range(100, 116))
        asked = cluster.sandbox.run(
            [sys.executable, "-c", CLIENT, "http://127.0.0.1:8123", json.dumps(seeds), KEY],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert asked.returncode == 0, asked.stderr[-3000:]
        answers = json.loads(asked.stdout)
    finally:
        cluster.sandbox.signal(server, signal.SIGINT)
        assert server.wait(timeout=120) == 0, log.read_text()[-3000:]
    assert "stopped: the application was deleted" in log.read_text()
    digest = Bundle.load(bundle).digest
    assert answers["ready"] == 200 and answers["models"]["data"][0]["digest"] == digest
    together = answers["together"]
    assert [a["status"] for a in together] == [200] * len(seeds)
    assert [a["request_ids"] for a in together] == [[f"req-{s}"] for s in seeds]  # once, the client's
    replicas = {a["replica"] for a in together}
    assert len(replicas) == 2, replicas  # both replicas answered...
    assert {r.split("@")[1] for r in replicas} == {cluster.head, cluster.worker}  # ...on both nodes
    worker = BatchWorker(bundle)  # `generate`'s images (tests/test_batch.py)

    def reference(seed: int) -> np.ndarray:
        request = worker.generator.resolve(Request(PROMPT, seed=seed))
        return np.asarray(Image.open(io.BytesIO(worker.run(job(0, "ilf-4", request))[1])))

    np.testing.assert_array_equal(png_pixels(answers["alone"]["images"][0]), reference(7))  # a batch of one
    references = [reference(s) for s in seeds]
    for i, answer in enumerate(together):
        # Ray Serve batched these: a batched row may differ from a batch of one by float rounding
        errors = [np.abs(png_pixels(answer["images"][0]).astype(int) - r).mean() for r in references]
        assert int(np.argmin(errors)) == i and errors[i] < 0.5, (i, errors[i])
    bad, anonymous = answers["bad"], answers["anonymous"]
    assert (bad["status"], bad["body"]) == serve_400(bundle, {"prompt": PROMPT, "seed": -1}, KEYS, KEY)
    assert bad["status"] == 400 and anonymous["status"] == 401  # API keys, checked by the replicas
    fields = {"prompt": PROMPT, "plan": "ilf-4", "seed": 1}
    assert (anonymous["status"], anonymous["body"]) == serve_400(bundle, fields, KEYS)
    metrics, (name, _) = answers["metrics"], KEYS.split(":", 1)
    assert answers["metrics_anonymous"] == 401 and "\nilf_ready 1" in metrics, metrics[-2000:]
    assert any(
        line.startswith("ilf_requests_total{") and f'key="{name}"' in line for line in metrics.splitlines()
    ), metrics[-2000:]  # the answering replica's own series: its requests, by API key name
    for cache in cluster.caches.values():  # shipped: each node opened its own copy
        assert (cache / digest.removeprefix("sha256:") / bundle.name / "manifest.json").is_file()


@needs_cluster
def test_serve_refuses_a_bundle_that_is_not_the_pinned_one_in_one_line(cluster, bundle):
    result = cluster.sandbox.run(
        [BIN / "ilf-deploy", "serve", bundle, "--server", "ray", "--ray-address", ADDRESS,
         "--digest", "sha256:" + "0" * 64],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert result.returncode == 2 and "not the pinned --digest" in result.stderr, result.stderr[-2000:]


# -- losing a node (last: the cluster keeps only its head) ---------------------------------------
@needs_cluster
def test_losing_the_worker_node_mid_batch_still_makes_every_row_once(cluster, bundle, tmp_path):
    prompts = write_prompts(tmp_path / "prompts.jsonl", 40, **SLOW)
    out = tmp_path / "out"
    driver = cluster.sandbox.popen(
        ray_batch(bundle, prompts, out), stderr=(tmp_path / "driver.log").open("w")
    )
    on_worker = lambda rows: any(r["worker"]["node"] == cluster.worker for r in rows)  # noqa: E731
    before = wait_for_rows(out, driver, on_worker)
    cluster.sandbox.kill_node(next(n for n in cluster.sandbox.nodes if not n.head))
    assert driver.wait(timeout=300) == 0, (tmp_path / "driver.log").read_text()[-3000:]
    rows = read_rows(out)
    assert sorted(r["index"] for r in rows) == list(range(40)), "each row exactly once"
    assert not any(r["error"] for r in rows)
    after = rows[len(before) :]
    assert after and {r["worker"]["node"] for r in after[-5:]} == {cluster.head}  # the head finished
    head_pids = {r["worker"]["pid"] for r in rows if r["worker"]["node"] == cluster.head}
    assert len(head_pids) >= 2, "a new actor on the head took over the lost node's rows"


# -- no cluster: Ray Serve's batching, the application builder, KubeRay ----------------------------
def test_ray_serve_batching_runs_our_engine_in_batches(bundle, monkeypatch):
    """@serve.batch outside a replica (it only reads the replica's max_ongoing_requests, faked)."""
    from fastapi.testclient import TestClient
    from ray import serve

    from ilf_deploy.serving.scale.serve import RayServeBatcher
    from ilf_deploy.serving.serve import ServeOptions, create_app

    replica = SimpleNamespace(_deployment_config=SimpleNamespace(max_ongoing_requests=100))
    monkeypatch.setattr(serve, "get_replica_context", lambda: replica)
    server = create_app(bundle, ServeOptions(max_batch=8, max_wait_ms=300, warmup=False))
    state = server.state.ilf
    state.batcher = server.state.batcher = RayServeBatcher.replacing(state.batcher)
    state.batcher.warm_up(None)
    seeds = list(range(8))
    with TestClient(server) as client:
        from concurrent.futures import ThreadPoolExecutor

        def post(seed: int):
            return client.post(
                "/v1/images/generations", json={"prompt": PROMPT, "plan": "ilf-4", "seed": seed}
            )

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(post, seeds))
        metrics = client.get("/metrics").text
        bad = client.post("/v1/images/generations", json={"prompt": PROMPT, "seed": -1})
    assert [a.status_code for a in answers] == [200] * 8
    batches = next(
        float(line.split()[-1]) for line in metrics.splitlines() if line.startswith("ilf_batch_size_count")
    )
    assert batches < 8, f"{batches} engine calls for 8 concurrent requests: Ray Serve batched nothing"
    worker = BatchWorker(bundle)
    for seed, answer in zip(seeds, answers):
        image = png_pixels(answer.json()["data"][0]["b64_json"]).astype(int)
        request = worker.generator.resolve(Request(PROMPT, seed=seed))
        expected = np.asarray(Image.open(io.BytesIO(worker.run(job(0, "ilf-4", request))[1])))
        assert np.abs(image - expected).mean() < 0.5, seed
    assert (bad.status_code, bad.json()) == serve_400(bundle, {"prompt": PROMPT, "seed": -1})


def test_app_builder_pins_the_bundle_and_refuses_unknown_args(bundle):
    from ray.serve.schema import ServeDeploySchema

    from ilf_deploy.serving.scale.serve import app_builder

    application = app_builder({"bundle": str(bundle), "replicas": 2, "max_batch": "4"})
    deployment = application._bound_deployment
    assert deployment.num_replicas == 2
    options = deployment.init_args[1]
    assert options.digest == Bundle.load(bundle).digest and options.max_batch == 4
    with pytest.raises(ConfigError, match=r"app_builder: .*unexpected keyword argument 'steps'"):
        app_builder({"bundle": str(bundle), "steps": 3})
    with pytest.raises(IlfError, match="not the pinned --digest"):
        app_builder({"bundle": str(bundle), "digest": "sha256:" + "0" * 64})
    with pytest.raises(ConfigError, match="--autoscale MIN:MAX needs"):
        app_builder({"bundle": str(bundle), "autoscale": "3:1"})
    scaled = app_builder({"bundle": str(bundle), "autoscale": "1:3"})._bound_deployment
    autoscaling = scaled._deployment_config.autoscaling_config  # Ray Serve's autoscaler, not N replicas
    assert (autoscaling.min_replicas, autoscaling.max_replicas) == (1, 3)
    ServeDeploySchema.model_validate(
        {"applications": [{"import_path": "ilf_deploy.serving.scale.serve:app_builder"}]}
    )


def test_every_replica_opens_the_bundle_with_the_digest_pinned(bundle):
    """A node whose copy at the shared path is another bundle: its replica refuses to start."""
    from ilf_deploy.serving.scale.options import RayServeOptions
    from ilf_deploy.serving.scale.serve import application
    from ilf_deploy.serving.scale.ship import SharedPath
    from ilf_deploy.serving.serve import ServeOptions

    elsewhere = ServeOptions(warmup=False, digest="sha256:" + "0" * 64)  # the driver's bundle's digest
    bound = application(SharedPath(str(bundle)), elsewhere, RayServeOptions())._bound_deployment
    (constructor,) = bound.func_or_class.__bases__[:1]  # IlfReplica, under Ray Serve's ingress wrapper
    assert constructor.__name__ == "IlfReplica"
    with pytest.raises(IlfError, match="not the pinned --digest"):
        constructor.__init__(SimpleNamespace(), *bound.init_args)  # what each replica runs first


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--replicas", "2"], "need --server ray"),
        (["--autoscale", "1:2"], "need --server ray"),
        (["--server", "ray", "--autoscale", "2"], "--autoscale must be MIN:MAX"),
        (["--server", "ray", "--autoscale", "3:1"], "--autoscale MIN:MAX needs"),
        (["--server", "ray", "--replicas", "0"], "--replicas must be >= 1"),
    ],
)
def test_serve_ray_options_are_one_line_errors_before_any_cluster(bundle, args, message):
    before = signal.getsignal(signal.SIGTERM)  # serve --server ray sets it (SIGTERM as Ctrl-C)
    try:
        result = invoke("serve", bundle, *args)
    finally:
        signal.signal(signal.SIGTERM, before)
    assert result.exit_code == 2 and message in result.output, result.output


def test_kuberay_manifests_load_into_the_kubernetes_and_ray_serve_models(bundle, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from tests.test_triton import strict_model

    result = invoke(
        "export-kuberay", bundle, "--out", tmp_path, "--autoscale", "1:4", "--workers", "2",
        "--max-workers", "5", "--gpu", "--image", "registry.example/ilf-ray:1",
        "--api-key-secret", "ilf-keys",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    digest = Bundle.load(bundle).digest
    service = next(yaml.safe_load_all((tmp_path / "rayservice.yaml").read_text()))  # then its PDB
    job_ = next(yaml.safe_load_all((tmp_path / "rayjob.yaml").read_text()))
    assert (service["apiVersion"], service["kind"], job_["kind"]) == ("ray.io/v1", "RayService", "RayJob")
    for document in (service, job_):
        strict_model("V1ObjectMeta", document["metadata"])
        spec = document["spec"].get("rayClusterConfig") or document["spec"]["rayClusterSpec"]
        (workers,) = spec["workerGroupSpecs"]
        assert (workers["minReplicas"], workers["maxReplicas"], spec["enableInTreeAutoscaling"]) == (
            2,
            5,
            True,
        )
        for group in (spec["headGroupSpec"], workers):
            pod = strict_model("V1PodTemplateSpec", group["template"])  # unknown fields are errors
            assert pod.metadata.annotations["ilf-deploy.dev/bundle-digest"] == digest
            (check,) = pod.spec.init_containers
            assert check.command == ["ilf-deploy", "inspect", f"/models/{bundle.name}", "--digest", digest]
            assert pod.spec.volumes[0].persistent_volume_claim.claim_name == "ilf-models"
            assert pod.spec.containers[0].image == "registry.example/ilf-ray:1"
        assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (application,) = config.applications
    assert application.import_path == "ilf_deploy.serving.scale.serve:app_builder"
    assert application.args == {
        "bundle": f"/models/{bundle.name}", "digest": digest, "backend": "auto", "autoscale": "1:4"
    }  # fmt: skip
    cluster = service["spec"]["rayClusterConfig"]  # Serve's build task (app_builder) may run in any pod
    for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
        (container,) = group["template"]["spec"]["containers"]
        assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "ilf-keys", "key": "ILF_API_KEYS"}
    entrypoint = shlex.split(job_["spec"]["entrypoint"])
    assert entrypoint[:2] == ["ilf-deploy", "batch"] and job_["spec"]["backoffLimit"] == 2
    import typer

    command = typer.main.get_command(app).commands["batch"]  # type: ignore[attr-defined]
    params = command.make_context("batch", entrypoint[2:]).params  # the entrypoint parses as `batch`
    assert (params["ray_address"], params["digest"], str(params["out"])) == ("auto", digest, "/data/results")
    head_mounts = job_["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    mounts = {m["mountPath"] for m in head_mounts["volumeMounts"]}
    assert mounts == {"/models", "/data", "/tmp"}  # the driver's; /tmp: the root filesystem is read-only
    bad = invoke("export-kuberay", bundle, "--out", tmp_path / "x", "--autoscale", "4")
    assert bad.exit_code == 2 and "--autoscale must be MIN:MAX" in bad.output
