"""The serving image (`make images`, containers/build.py), built from Debian packages and the wheel and run
with podman: the image `ilf-deploy generate` makes, bit for bit; a drain on SIGTERM; non-root on a
read-only root filesystem; no torch; at most 700 MiB. The Triton image: tritonserver run as the
Kubernetes manifests run it, over an exported repository, and its own `serve --server triton`, each
answering one request with generate's pixels.

podman runs with containers/containers.conf (runc, the host's ulimits) and the host's network (publishing
ports would change the host's iptables). Skipped, in one line, only where the tools are not installed
(.ci/run installs them).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml
from PIL import Image

from ilf_deploy.serving.triton.server import free_ports

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "containers" / "containers.conf"
TOOLS = ("mmdebstrap", "buildah", "podman", "skopeo")
MAX_MIB = 700
SITE_PACKAGES = "/opt/ilf/lib/python3.11/site-packages"
STUB_SITE_PACKAGES = "/opt/ilf/triton/python/lib/python3.11/site-packages"  # the Triton stub's
BUNDLE = "/opt/ilf/bundle"
GEN = "/v1/images/generations"

missing = [tool for tool in TOOLS if shutil.which(tool) is None]
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        bool(missing) or os.geteuid() != 0,
        reason=f"images: no {', '.join(missing) or 'root'} here (apt-get install {' '.join(TOOLS)} runc)",
    ),
]


def run(*args: object, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "CONTAINERS_CONF": str(CONF)}
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, env=env, **kwargs)
    if check:
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


def cli_png(bundle: Path, prompt: str, seed: int, out: Path) -> bytes:
    """`ilf-deploy generate`'s PNG (plan ilf-10), from the checkout's install."""
    cli = Path(sys.executable).parent / "ilf-deploy"
    run(cli, "generate", bundle, "--plan", "ilf-10", "--prompt", prompt, "--seed", str(seed), "--out", out)
    return out.read_bytes()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", work, ROOT, cwd=work)
    (built,) = work.glob("ilf_deploy-*.whl")
    return built


def build_image(kind: str, wheel: Path, out: Path, *args: object) -> dict:
    """containers/build.py KIND (what `make images` runs), loaded into podman; its images.json row."""
    built = run(sys.executable, ROOT / "containers" / "build.py", kind, "--wheel", wheel, "--out", out, *args,
                timeout=900)  # fmt: skip
    print(built.stdout.strip())
    name = f"ilf-deploy-{kind}"
    row = json.loads((out / "images.json").read_text())[name]
    run("podman", "load", "--quiet", "--input", row["archive"])
    Path(row["archive"]).unlink()  # in podman's storage now: the disk holds one copy, not two
    row["tag"] = f"localhost/{row['tag']}"
    return row


@pytest.fixture(scope="module")
def image(wheel, default_bundle, tmp_path_factory):
    """The serving image with the default model's bundle baked in."""
    row = build_image("serve", wheel, tmp_path_factory.mktemp("images"), "--bundle", default_bundle)
    yield row
    run("podman", "rmi", "--force", row["tag"], check=False)


class Served:
    def __init__(self, image: dict, name: str) -> None:
        self.port = free_port()
        self.name = name
        self.url = f"http://127.0.0.1:{self.port}"
        config = json.loads(run("podman", "image", "inspect", image["tag"]).stdout)[0]["Config"]
        # the image's own command (the baked bundle, its digest pinned) on a port of our own
        args = [*config["Cmd"]]
        args[args.index("--port") + 1] = str(self.port)
        args[args.index("--host") + 1] = "127.0.0.1"
        run("podman", "run", "--detach", "--name", name, "--network=host", "--read-only", "--cap-drop=ALL",
            "--security-opt=no-new-privileges", image["tag"], *args)  # fmt: skip
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            state = json.loads(run("podman", "inspect", name).stdout)[0]["State"]
            assert state["Running"], self.logs()
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.5)

    def logs(self) -> str:
        return run("podman", "logs", self.name, check=False).stdout[-3000:]


@pytest.fixture
def served(image):
    name = f"ilf-test-{os.getpid()}-{time.monotonic_ns()}"
    try:
        yield Served(image, name)
    finally:
        run("podman", "rm", "--force", "--time", "0", name, check=False)


def test_the_image_is_labelled_small_and_has_no_torch(image, default_bundle):
    config = json.loads(run("podman", "image", "inspect", image["tag"]).stdout)[0]
    labels = config["Config"]["Labels"]
    size_mib = config["Size"] / 2**20
    print(f"{image['tag']} {image['digest']} {size_mib:.0f} MiB")
    assert size_mib <= MAX_MIB, f"{size_mib:.0f} MiB"
    digest = (default_bundle / "manifest.sha256").read_text().split()[0]
    assert labels["dev.ilf-deploy.bundle-digest"] == digest == image["bundle_digest"]
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert labels["org.opencontainers.image.source"].startswith("https://")
    assert config["Config"]["User"] == "10001:10001"
    assert config["Config"]["Entrypoint"] == ["/opt/ilf/bin/ilf-deploy", "serve"]
    assert config["Config"]["Cmd"][:1] == [BUNDLE] and digest in config["Config"]["Cmd"]
    listing = run(
        "podman", "run", "--rm", "--network=none", "--entrypoint", "ls", image["tag"], SITE_PACKAGES
    )
    packages = {name.lower() for name in listing.stdout.split()}
    assert {"onnxruntime", "openvino", "fastapi", "uvicorn", "ilf_deploy"} <= packages, packages
    assert not packages & {"torch", "diffusers", "transformers", "onnx", "nncf", "pip"}, packages


def test_the_served_image_generates_as_the_cli_does_non_root_read_only(
    image, served, default_bundle, tmp_path
):
    body = {"prompt": "a small red circle", "plan": "ilf-10", "seed": 3}
    response = httpx.post(f"{served.url}{GEN}", json=body, timeout=60)
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["data"][0]["b64_json"])
    assert png == cli_png(default_bundle, body["prompt"], 3, tmp_path / "cli.png")
    assert run("podman", "exec", served.name, "id", "-u").stdout.strip() == "10001"
    refused = run("podman", "exec", served.name, "touch", "/opt/ilf/x", check=False)
    assert refused.returncode != 0 and "Read-only file system" in refused.stderr, refused.stderr
    labels = json.loads(run("podman", "image", "inspect", image["tag"]).stdout)[0]["Config"]["Labels"]
    health = labels["dev.ilf-deploy.healthcheck"].replace("8000", str(served.port))  # the image's check
    assert run("podman", "exec", served.name, "sh", "-c", health, check=False).returncode == 0


def test_sigterm_drains_the_requests_in_flight(served):
    responses: list[httpx.Response] = []
    body = {"prompt": "x", "plan": "ilf-10", "n": 4, "seed": 1}
    thread = threading.Thread(
        target=lambda: responses.append(httpx.post(f"{served.url}{GEN}", json=body, timeout=60))
    )
    thread.start()
    time.sleep(0.5)  # the request is in the engine's hands
    signalled = time.monotonic()
    run("podman", "kill", "--signal", "TERM", served.name)
    code = run("podman", "wait", served.name, timeout=60).stdout.strip()
    thread.join(60)
    print(f"exited {code} {time.monotonic() - signalled:.1f} s after SIGTERM")
    assert responses and responses[0].status_code == 200, responses and responses[0].text
    assert len(responses[0].json()["data"]) == 4
    assert code == "0", served.logs()
    assert "Traceback" not in served.logs()


# The Ray image takes ~4 min to build (1.2 GiB: Ray, pyarrow, pandas) and a minute to start: opt-in,
# outside the default run (docs/deploy.md ("Images")).
@pytest.mark.skipif(
    not os.environ.get("ILF_TEST_RAY_IMAGE"), reason="ILF_TEST_RAY_IMAGE=1 builds the Ray image"
)
def test_the_ray_image_serves_on_ray_and_stops_on_sigterm(wheel, default_bundle, tmp_path):
    row = build_image("ray", wheel, tmp_path / "images")
    shared = tmp_path / "shared"  # readable by the image's user (pytest's directories are root's only)
    shutil.copytree(default_bundle, shared / "bundle")
    for path in [tmp_path, shared, *shared.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    name = f"ilf-test-ray-{os.getpid()}"
    try:  # no network at all: Ray and the request stay inside the container
        run("podman", "run", "--detach", "--name", name, "--network=none", "--shm-size=512m",
            "-v", f"{shared / 'bundle'}:/models/bundle:ro", row["tag"], "serve", "/models/bundle",
            "--server", "ray", "--ray-address", "local", "--host", "127.0.0.1", "--port", "8000",
            "--replica-cpus", "1")  # fmt: skip
        request = (
            "import base64, json, sys, time, urllib.request\n"
            "body = json.dumps({'prompt': 'a small red circle', 'plan': 'ilf-10', 'seed': 3}).encode()\n"
            "for _ in range(180):\n"
            "    try:\n"
            "        r = urllib.request.urlopen(urllib.request.Request('http://127.0.0.1:8000/v1/images/"
            "generations', data=body, headers={'content-type': 'application/json'}), timeout=120)\n"
            "        break\n"
            "    except OSError:\n"
            "        time.sleep(1)\n"
            "sys.stdout.write(json.load(r)['data'][0]['b64_json'])\n"
        )
        png = base64.b64decode(run("podman", "exec", name, "python", "-c", request, timeout=300).stdout)
        assert png == cli_png(default_bundle, "a small red circle", 3, tmp_path / "cli.png")
        run("podman", "stop", "--time", "30", name)
        assert run("podman", "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip() == "0"
    finally:
        run("podman", "rm", "--force", "--time", "0", name, check=False)
        run("podman", "rmi", "--force", row["tag"], check=False)


@pytest.fixture(scope="module")
def triton_image(wheel, tmp_path_factory):
    """The Triton image as `make images` builds it (no bundle baked in: the manifests mount one)."""
    row = build_image("triton", wheel, tmp_path_factory.mktemp("images"))
    yield row
    run("podman", "rmi", "--force", row["tag"], check=False)


def shared(path: Path) -> Path:
    """`path` readable by the image's user (pytest's directories are root's only)."""
    for item in [path, *path.rglob("*")]:
        item.chmod(0o755 if item.is_dir() else 0o644)
    return path


def triton_pixels(url: str, prompt: str, seed: int) -> np.ndarray:
    """One image from Triton's v2 HTTP API (docs/triton.md, "Clients")."""
    inputs = [
        {"name": "prompt", "shape": [1, 1], "datatype": "BYTES", "data": [prompt]},
        {"name": "seed", "shape": [1, 1], "datatype": "INT64", "data": [seed]},
        {"name": "plan", "shape": [1, 1], "datatype": "BYTES", "data": ["ilf-10"]},
    ]
    response = httpx.post(f"{url}/v2/models/ilf/infer", json={"inputs": inputs}, timeout=120)
    assert response.status_code == 200, response.text
    (image,) = response.json()["outputs"]
    return np.array(image["data"], dtype=np.uint8).reshape(image["shape"])[0]


def run_triton(name: str, ports: tuple[int, ...], mount: str, *args: object) -> str:
    """`podman run` with `mount` (a volume) and `args` (the image and its command), as the manifests'
    pod runs (read-only, no capabilities, a /dev/shm for the Python backend); waits until Triton on
    `ports[0]` is ready; its URL."""
    run("podman", "run", "--detach", "--name", name, "--network=host", "--read-only", "--cap-drop=ALL",
        "--security-opt=no-new-privileges", "--shm-size=1g", "-v", mount, *args)  # fmt: skip
    url = f"http://127.0.0.1:{ports[0]}"
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:
                return url
        except httpx.HTTPError:
            pass
        logs = run("podman", "logs", name, check=False)
        state = json.loads(run("podman", "inspect", name).stdout)[0]["State"]
        assert state["Running"] and time.monotonic() < deadline, (logs.stdout + logs.stderr)[-3000:]
        time.sleep(1)


def stop_cleanly(name: str) -> None:
    """SIGTERM: Triton drains, unloads the model and exits 0."""
    run("podman", "stop", "--time", "60", name)
    code = run("podman", "inspect", "--format", "{{.State.ExitCode}}", name).stdout.strip()
    logs = run("podman", "logs", name, check=False)
    assert code == "0", (logs.stdout + logs.stderr)[-3000:]


def test_the_triton_image_is_labelled_non_root_and_has_no_torch(triton_image):
    config = json.loads(run("podman", "image", "inspect", triton_image["tag"]).stdout)[0]
    print(f"{triton_image['tag']} {triton_image['digest']} {config['Size'] / 2**20:.0f} MiB")
    labels = config["Config"]["Labels"]
    assert labels["org.opencontainers.image.title"] == "ilf-deploy-triton"
    assert labels["org.opencontainers.image.version"] == "0.1.0"
    assert "/v2/health/ready" in labels["dev.ilf-deploy.healthcheck"]  # the manifests' readiness probe
    assert config["Config"]["User"] == "10001:10001"
    assert config["Config"]["Entrypoint"] == ["/opt/ilf/bin/ilf-deploy", "serve"]
    assert config["Config"]["Cmd"][:3] == ["/models/bundle", "--server", "triton"]
    for site in (SITE_PACKAGES, STUB_SITE_PACKAGES):
        listing = run(
            "podman", "run", "--rm", "--network=none", "--entrypoint", "ls", triton_image["tag"], site
        )
        packages = {name.lower() for name in listing.stdout.split()}
        assert {"onnxruntime", "numpy", "tokenizers"} <= packages, (site, packages)
        assert not packages & {"torch", "diffusers", "transformers", "pip"}, (site, packages)


def test_the_triton_image_runs_the_manifests_command_on_an_exported_repository(
    triton_image, default_bundle, tmp_path
):
    """The Deployment's containers as `export-triton --k8s` writes them: the digest check, then
    tritonserver over the repository at /models (read-only), answering generate's pixels; the image's
    health check agrees."""
    cli = Path(sys.executable).parent / "ilf-deploy"
    run(cli, "export-triton", default_bundle, "--out", tmp_path / "repo", "--copy-bundle",
        "--k8s", tmp_path / "k8s")  # fmt: skip
    (deployment, *_) = yaml.safe_load_all((tmp_path / "k8s" / "triton.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    repository = f"{shared(tmp_path / 'repo')}:/models:ro"
    (check,) = pod["initContainers"]  # the bundle's digest, checked before Triton starts
    run("podman", "run", "--rm", "--network=none", "--read-only", "--cap-drop=ALL", "-v", repository,
        "--entrypoint", check["command"][0], triton_image["tag"], *check["command"][1:])  # fmt: skip
    ports = free_ports("127.0.0.1", (0, 0, 0))
    addresses = [f"--{kind}-{key}={value}" for kind, port in zip(("http", "grpc", "metrics"), ports)
                 for key, value in (("address", "127.0.0.1"), ("port", port))]  # fmt: skip
    name = f"ilf-test-triton-{os.getpid()}"
    try:
        url = run_triton(
            name, ports, repository,
            "--entrypoint", container["command"][0], triton_image["tag"], *container["args"], *addresses,
        )  # fmt: skip
        pixels = triton_pixels(url, "a small red circle", 3)
        png = cli_png(default_bundle, "a small red circle", 3, tmp_path / "cli.png")
        assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        assert run("podman", "exec", name, "id", "-u").stdout.strip() == "10001"
        config = json.loads(run("podman", "image", "inspect", triton_image["tag"]).stdout)[0]["Config"]
        health = config["Labels"]["dev.ilf-deploy.healthcheck"].replace("8000", str(ports[0]))
        assert run("podman", "exec", name, "sh", "-c", health, check=False).returncode == 0
        stop_cleanly(name)
    finally:
        run("podman", "rm", "--force", "--time", "0", name, check=False)


def test_the_triton_image_serves_a_mounted_bundle_with_its_own_command(
    triton_image, default_bundle, tmp_path
):
    """`podman run IMAGE` with a bundle at /models/bundle: `ilf-deploy serve --server triton`."""
    config = json.loads(run("podman", "image", "inspect", triton_image["tag"]).stdout)[0]["Config"]
    ports = free_ports("127.0.0.1", (0, 0, 0))
    args = [*config["Cmd"]]  # the image's command on ports of our own
    args[args.index("--host") + 1] = "127.0.0.1"
    args[args.index("--port") + 1] = str(ports[0])
    args += ["--grpc-port", str(ports[1]), "--metrics-port", str(ports[2])]
    bundle = shutil.copytree(default_bundle, tmp_path / "bundle")
    name = f"ilf-test-triton-serve-{os.getpid()}"
    try:
        url = run_triton(name, ports, f"{shared(bundle)}:/models/bundle:ro", triton_image["tag"], *args)
        pixels = triton_pixels(url, "a small red circle", 3)
        png = cli_png(default_bundle, "a small red circle", 3, tmp_path / "cli.png")
        assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(png)).convert("RGB")))
        stop_cleanly(name)
    finally:
        run("podman", "rm", "--force", "--time", "0", name, check=False)
