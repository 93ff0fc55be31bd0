"""Build ilf-deploy's container images from Debian packages and PyPI only (no base image pulled).

    python containers/build.py serve [--bundle DIR] [--wheel dist/ilf_deploy-*.whl] [--out out/images]

1. A wheelhouse: the wheel's dependencies for the image's extras, downloaded once into
   out/wheelhouse/<key> (the key: the extras and the wheel's requirements, so a new ilf-deploy wheel with
   the same requirements reuses it).
2. A root filesystem: `mmdebstrap --variant=essential` (python3, its venv module, CA certificates,
   libstdc++) with a venv at /opt/ilf installed from the wheelhouse with `pip install --no-index`; a
   non-root user (uid 10001); docs, locales, pip and setuptools removed.
3. A `FROM scratch` image committed with buildah to out/images/<image>.oci.tar (an oci-archive), with
   OCI labels (version, source, the baked bundle's digest) and the health check's command, and its digest
   written to out/images/images.json (read by the Kubernetes exporters: `--images`).

The serving image has no torch: ONNX Runtime, OpenVINO and the server (`ilf-deploy[onnx,openvino,serve]`).
The Triton image (`ilf-deploy[onnx]`, no torch either) adds what `ilf-deploy install-triton` unpacks from
the nvidia-pytriton wheel (tritonserver, its libraries, the Python backend and the stub's numpy<2
environment), run in the root filesystem from the same wheelhouse; `tritonserver` on PATH
(containers/tritonserver) is what the Kubernetes manifests run.
Runs as root (mmdebstrap and buildah need it); podman/buildah read containers/containers.conf.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from email.parser import Parser
from pathlib import Path

from ilf_deploy.serving.triton.k8s import PORTS
from ilf_deploy.serving.triton.server import STUB_NUMPY
from ilf_deploy.serving.triton.server import WHEEL as TRITON_WHEEL

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "https://github.com/ilf-deploy/ilf-deploy"
SUITE = "bookworm"  # Debian 12: python3.11, the same CPython minor as the wheelhouse is resolved for
DEBIAN_PYTHON = "3.11"
PACKAGES = ("python3", "python3-venv", "ca-certificates", "libstdc++6")
UID = 10001
VENV = "/opt/ilf"
BUNDLE = "/opt/ilf/bundle"  # a baked bundle; a mounted one goes to /models/bundle (the manifests' path)
MOUNTED = "/models/bundle"
PORT = 8000


def healthcheck(path: str) -> str:
    """What `podman healthcheck`, docker and the manifests' probes ask: the server's readiness at `path`."""
    return (
        f'{VENV}/bin/python -c "import sys, urllib.request; '
        f"sys.exit(urllib.request.urlopen('http://127.0.0.1:{PORT}{path}', timeout=3).status != 200)\""
    )


UNNEEDED = ("usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale", "var/cache/apt",
            "var/lib/apt/lists")  # fmt: skip


@dataclass(frozen=True)
class Image:
    name: str
    extras: str
    entrypoint: tuple[str, ...]
    summary: str
    server: tuple[str, ...] = ()  # `ilf-deploy serve` options after the bundle (the image's command)
    readiness: str = "/readyz"  # the health check's path on PORT
    ports: tuple[int, ...] = (PORT,)
    packages: tuple[str, ...] = ()  # Debian packages beside PACKAGES
    downloads: tuple[str, ...] = ()  # wheels beside the extras' (`pip download --no-deps`)
    triton: bool = False  # `ilf-deploy install-triton` from the wheelhouse, and containers/tritonserver


IMAGES = {
    "serve": Image(
        "ilf-deploy-serve",
        "onnx,openvino,serve",
        (f"{VENV}/bin/ilf-deploy", "serve"),
        "ilf-deploy's server on ONNX Runtime and OpenVINO (no torch)",
        server=("--host", "0.0.0.0", "--port", str(PORT)),
    ),
    "triton": Image(
        "ilf-deploy-triton",
        "onnx",
        (f"{VENV}/bin/ilf-deploy", "serve"),
        "NVIDIA Triton Inference Server (nvidia-pytriton's) and ilf-deploy's Python-backend model, no torch",
        server=("--server", "triton", "--host", "0.0.0.0", "--port", str(PORT)),
        readiness="/v2/health/ready",
        ports=tuple(PORTS.values()),
        packages=(f"libpython{DEBIAN_PYTHON}",),  # the Python backend's stub links libpython
        downloads=(TRITON_WHEEL, STUB_NUMPY),
        triton=True,
    ),
    "ray": Image(
        "ilf-deploy-ray",
        "onnx,openvino,serve,ray",
        (f"{VENV}/bin/ilf-deploy",),
        "Ray and ilf-deploy: serve --server ray, batch --ray-address, KubeRay",
    ),
}


def run(*args: str | Path, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(a) for a in args], check=True, **kwargs)


def wheel_requirements(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return Parser().parsestr(archive.read(name).decode()).get_all("Requires-Dist") or []


def wheelhouse(wheel: Path, image: Image) -> Path:
    """The dependencies' wheels for `image`, downloaded once per requirement set."""
    markers = [f'extra == "{e}"' for e in image.extras.split(",")]
    relevant = [r for r in wheel_requirements(wheel) if "extra ==" not in r or any(m in r for m in markers)]
    # what the image installs: a change to other extras (dev) keeps the wheelhouse
    key_parts = [image.extras, sys.version_info[:2], *relevant, *image.downloads]
    key = hashlib.sha256(json.dumps(key_parts).encode())
    house = ROOT / "out" / "wheelhouse" / f"{image.name}-{key.hexdigest()[:16]}"
    if not (house / ".complete").exists():
        house.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=house.parent))
        run(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
            "--only-binary=:all:", "--dest", staging, f"{wheel}[{image.extras}]")  # fmt: skip
        if image.downloads:
            run(sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
                "--only-binary=:all:", "--no-deps", "--dest", staging, *image.downloads)  # fmt: skip
        for own in staging.glob("ilf_deploy-*.whl"):  # the app's wheel is added per build
            own.unlink()
        (staging / ".complete").touch()
        for stale in house.parent.glob(f"{image.name}-*"):  # an older requirement set's
            shutil.rmtree(stale, ignore_errors=True)
        os.rename(staging, house)
    return house


def triton_hooks(house: Path) -> list[str]:
    """`ilf-deploy install-triton` in the root filesystem (the server, its libraries and the stub's
    environment in /opt/ilf/triton), from the wheelhouse; `tritonserver` on PATH as the manifests run it."""
    (pytriton,) = house.glob("nvidia_pytriton-*.whl")
    offline = "PIP_NO_INDEX=1 PIP_FIND_LINKS=/tmp/wheels PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1"
    stub_python = f"{VENV}/triton/python/bin/python"  # install_server's environment for the stub
    return [
        f'chroot "$1" env -i PATH=/usr/bin:/bin {offline} {VENV}/bin/ilf-deploy install-triton '
        f"--wheel /tmp/wheels/{pytriton.name}",
        f'chroot "$1" {stub_python} -m pip uninstall --quiet --yes pip setuptools',
        f"copy-in {ROOT / 'containers' / 'tritonserver'} /usr/local/bin",
        'chmod 755 "$1/usr/local/bin/tritonserver"',
    ]


def rootfs(wheel: Path, house: Path, image: Image, bundle: Path | None, tarball: Path) -> None:
    """The image's filesystem as one tar, from Debian packages and the wheelhouse."""
    requirement = f"ilf-deploy[{image.extras}]"
    hooks = [
        'mkdir -p "$1/tmp/wheels"',
        f"sync-in {house} /tmp/wheels",
        f"copy-in {wheel} /tmp/wheels",
        f'chroot "$1" python3 -m venv {VENV}',
        # env -i: the host's pip settings (indexes, find-links, constraints) are not the image's
        f'chroot "$1" env -i PATH=/usr/bin:/bin {VENV}/bin/pip install --quiet --no-index --no-cache-dir '
        f"--disable-pip-version-check --find-links /tmp/wheels {shlex.quote(requirement)}",
        *(triton_hooks(house) if image.triton else []),
        f'chroot "$1" {VENV}/bin/pip uninstall --quiet --yes pip setuptools',
        'rm -rf "$1/tmp/wheels" ' + " ".join(f'"$1/{p}"' for p in UNNEEDED),
        f'echo "ilf:x:{UID}:{UID}:ilf-deploy:/home/ilf:/usr/sbin/nologin" >> "$1/etc/passwd"',
        f'echo "ilf:x:{UID}:" >> "$1/etc/group"',
        f'mkdir -p "$1/home/ilf" "$1/models" && chown {UID}:{UID} "$1/home/ilf"',
    ]
    if bundle is not None:
        hooks += [f'mkdir -p "$1{BUNDLE}"', f"sync-in {bundle} {BUNDLE}", f'chmod -R a+rX,go-w "$1{BUNDLE}"']
    packages = ",".join([*PACKAGES, *image.packages])
    args = ["mmdebstrap", "--quiet", "--variant=essential", f"--include={packages}"]
    args += [f"--customize-hook={hook}" for hook in hooks]
    run(*args, SUITE, tarball)


def bundle_digest(bundle: Path) -> str:
    return (bundle / "manifest.sha256").read_text().split()[0]


def commit(image: Image, version: str, tarball: Path, bundle: Path | None, archive: Path) -> str:
    """A `FROM scratch` image of `tarball` in an oci-archive; returns its manifest digest."""
    labels = {
        "org.opencontainers.image.title": image.name,
        "org.opencontainers.image.description": image.summary,
        "org.opencontainers.image.version": version,
        "org.opencontainers.image.source": SOURCE,
        "org.opencontainers.image.licenses": "Apache-2.0",
        "dev.ilf-deploy.healthcheck": healthcheck(image.readiness),
    }
    command: list[str] = []
    if image.server:  # `ilf-deploy serve` on the baked bundle, else on the one mounted
        command = [BUNDLE if bundle is not None else MOUNTED, *image.server]
    if bundle is not None:
        digest = bundle_digest(bundle)
        labels["dev.ilf-deploy.bundle-digest"] = digest
        command += ["--digest", digest] if command else []
    container = run("buildah", "from", "scratch", capture_output=True, text=True).stdout.strip()
    try:
        run("buildah", "add", "--quiet", container, tarball, "/", stdout=subprocess.DEVNULL)
        config = ["--user", f"{UID}:{UID}", "--workingdir", "/home/ilf"]
        config += [arg for port in image.ports for arg in ("--port", str(port))]
        config += ["--env", f"PATH={VENV}/bin:/usr/local/bin:/usr/bin:/bin", "--env", "HOME=/home/ilf"]
        config += ["--env", "PYTHONDONTWRITEBYTECODE=1", "--entrypoint", json.dumps(list(image.entrypoint))]
        config += ["--cmd", json.dumps(command)] if command else []
        for key, value in labels.items():
            config += ["--label", f"{key}={value}"]
        run("buildah", "config", *config, container)
        reference = f"oci-archive:{archive}:{image.name}:{version}"
        run(
            "buildah", "commit", "--quiet", "--format", "oci", container, reference, stdout=subprocess.DEVNULL
        )
    finally:
        run("buildah", "rm", container, stdout=subprocess.DEVNULL)
    inspect = run("skopeo", "inspect", f"oci-archive:{archive}", capture_output=True, text=True).stdout
    return json.loads(inspect)["Digest"]


def record(out: Path, image: Image, version: str, digest: str, archive: Path, bundle: Path | None) -> None:
    """out/images.json: image -> its reference by digest, for the manifests and the tests."""
    index = out / "images.json"
    table = json.loads(index.read_text()) if index.exists() else {}
    table[image.name] = {
        "tag": f"{image.name}:{version}",
        "digest": digest,
        "reference": f"{image.name}@{digest}",
        "archive": str(archive),
        "bundle_digest": bundle_digest(bundle) if bundle is not None else None,
    }
    index.write_text(json.dumps(table, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", choices=sorted(IMAGES))
    parser.add_argument("--bundle", type=Path, help="bake this bundle in (else mount one at /models/bundle)")
    parser.add_argument("--wheel", type=Path, help="default: the newest dist/ilf_deploy-*.whl")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "images")
    args = parser.parse_args()
    image = IMAGES[args.image]
    wheels = sorted((ROOT / "dist").glob("ilf_deploy-*.whl"), key=lambda p: p.stat().st_mtime)
    wheel = (args.wheel or (wheels[-1] if wheels else None)) or sys.exit("no wheel: run `make dist` first")
    if args.bundle is not None and not (args.bundle / "manifest.sha256").is_file():
        sys.exit(f"--bundle {args.bundle}: not a bundle (no manifest.sha256)")
    version = wheel.name.split("-")[1]
    args.out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    house = wheelhouse(wheel.resolve(), image)
    with tempfile.TemporaryDirectory(prefix="ilf-image-", dir=args.out) as work:
        tarball = Path(work) / "rootfs.tar"
        rootfs(wheel.resolve(), house, image, args.bundle and args.bundle.resolve(), tarball)
        archive = (args.out / f"{image.name}.oci.tar").resolve()
        partial = archive.with_name(f".{archive.name}.partial")
        partial.unlink(missing_ok=True)
        digest = commit(image, version, tarball, args.bundle, partial)
        os.replace(partial, archive)  # never a half-written archive under the final name
        size = tarball.stat().st_size
    record(args.out, image, version, digest, archive, args.bundle)
    print(f"{image.name}:{version} {digest} rootfs {size / 2**20:.0f} MiB -> {archive} "
          f"({time.monotonic() - started:.0f} s)")  # fmt: skip


if __name__ == "__main__":
    main()
