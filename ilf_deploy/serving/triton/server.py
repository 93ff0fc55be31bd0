"""The `tritonserver` binary: installed from the `nvidia-pytriton` wheel, found, and started.

The wheel carries a CPU-capable Triton Inference Server (2.51), its libraries and the Python backend
with stubs for Python 3.8–3.13. We need only those files, not the `pytriton` package, so
`install_server` unpacks them into `sys.prefix/triton` (the virtualenv) without installing the wheel.

The stubs do not work under numpy 2: with our numpy 2.x a BYTES input reached the model as its
first byte repeated and the server aborted, and a numeric output failed Triton's shape check; the
same models work under numpy 1.26 (our guess: the stubs are built against numpy 1.x's C API, which
numpy 2 changed; pytriton pins numpy<2). So the stub gets a Python environment of its own,
`HOME/python`: numpy<2, this environment's onnxruntime and tokenizers versions (the numerics of
`ilf-deploy generate`) and a link to this ilf_deploy package. Our own environment keeps numpy 2.

In NVIDIA's Triton containers `tritonserver` is on PATH with its backends in
/opt/tritonserver/backends; `find_server` uses those when nothing was installed here.

`TritonProcess` is one running server: started, waited for until a model is ready, drained
(SIGTERM: Triton takes no new requests and serves what it holds for its exit timeout) and stopped;
`TritonProcess.serve` runs one until it exits or this process is signalled (`serve --server triton`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from ilf_deploy.core.errors import ConfigError, check_port
from ilf_deploy.core.files import staged_directory

WHEEL = "nvidia-pytriton==0.7.0"
HOME_ENV = "ILF_TRITON_HOME"  # overrides where the server files are looked for
_SERVER = "pytriton/tritonserver/"
_LIBS = "nvidia_pytriton.libs/"
_STAMP = "ilf-triton.json"
EXIT_TIMEOUT_S = 30  # tritonserver's own --exit-timeout-secs default
UNLOAD_S = 30  # after its exit timeout, how long Triton may take to unload the models and exit
READY_POLL_S = 0.5
# The stub's environment: what runtime/ and the onnxruntime backend import, at this env's versions.
STUB_PACKAGES = ("onnxruntime", "tokenizers", "jsonschema")  # what Bundle.load needs, beside numpy
STUB_NUMPY = "numpy>=1.26,<2"  # the stub's numpy (module docstring: why not 2)


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path(sys.prefix) / "triton")


@dataclass(frozen=True)
class TritonServer:
    """Where a `tritonserver` and its backends are, and the environment it needs."""

    binary: Path
    backends: Path
    libraries: tuple[Path, ...] = ()
    python_bin: Path | None = None  # the stub's Python (its bin/ goes first on PATH)

    def environment(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """The stub's Python first on PATH: the Python backend's stub finds its packages (numpy,
        ilf_deploy) through the `python` it finds there (PYTHONPATH alone does not do it)."""
        env = dict(os.environ if base is None else base)
        python_bin = self.python_bin or Path(sys.executable).parent
        env["PATH"] = os.pathsep.join([str(python_bin), env.get("PATH", "")])
        # The stub links libpython3.X: the one this interpreter was built with, not another on the system.
        libdir = sysconfig.get_config_var("LIBDIR")
        paths = [str(p) for p in self.libraries] + ([libdir] if libdir else [])
        if env.get("LD_LIBRARY_PATH"):
            paths.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(paths)
        return env

    def command(
        self,
        repository: Path,
        http_port: int = 8000,
        grpc_port: int = 8001,
        metrics_port: int = 8002,
        host: str = "0.0.0.0",
        extra: tuple[str, ...] = (),
        exit_timeout_s: int | None = None,
    ) -> list[str]:
        """The command line; `exit_timeout_s` is Triton's `--exit-timeout-secs` (EXIT_TIMEOUT_S): how long
        it keeps serving after SIGINT/SIGTERM before it exits, dropping what is still queued."""
        exit_timeout = [f"--exit-timeout-secs={exit_timeout_s}"] if exit_timeout_s is not None else []
        return [
            str(self.binary),
            f"--model-repository={repository}",
            f"--backend-directory={self.backends}",
            f"--http-address={host}",
            f"--http-port={http_port}",
            f"--grpc-address={host}",
            f"--grpc-port={grpc_port}",
            f"--metrics-address={host}",
            f"--metrics-port={metrics_port}",
            *exit_timeout,
            *extra,
        ]


def free_ports(host: str, ports: tuple[int, ...]) -> tuple[int, ...]:
    """`ports` with each 0 replaced by a port free on `host` now (all held open together while they
    are picked, so no two are the same)."""
    with contextlib.ExitStack() as held:
        chosen = []
        for port in ports:
            if port == 0:
                family = socket.AF_INET6 if ":" in host else socket.AF_INET
                sock = held.enter_context(socket.socket(family))
                sock.bind((host, 0))
                port = sock.getsockname()[1]
            chosen.append(port)
    return tuple(chosen)


class _Signalled(Exception):
    """SIGINT or SIGTERM while `TritonProcess.serve` runs."""


def _raise_signalled(_signum: int, _frame: Any) -> None:
    raise _Signalled


class TritonProcess:
    """One `tritonserver` over a model repository, its lifecycle in one place: `start`, `wait_ready`
    (a model answers ready), `drain` (SIGTERM) and `stop` (drain, wait for the exit timeout and the
    models' unloading, then kill). As a context manager it is started, and stopped on the way out."""

    def __init__(
        self,
        server: TritonServer,
        repository: Path,
        ports: tuple[int, int, int] = (8000, 8001, 8002),  # HTTP, gRPC, metrics; 0: a free one
        host: str = "0.0.0.0",
        exit_timeout_s: int | None = None,
        extra: tuple[str, ...] = (),
        output: IO[Any] | None = None,  # where its log goes (None: this process's stdout/stderr)
    ) -> None:
        self.check_ports(ports)
        self.ports = free_ports(host, ports)
        self.command = server.command(
            repository, *self.ports, host=host, extra=extra, exit_timeout_s=exit_timeout_s
        )
        self.environment = server.environment()
        self.exit_timeout_s = EXIT_TIMEOUT_S if exit_timeout_s is None else exit_timeout_s
        self.output = output
        # where a client on this machine reaches the HTTP port (a wildcard address: loopback)
        local = {"0.0.0.0": "127.0.0.1", "": "127.0.0.1", "::": "::1"}.get(host, host)
        self.address = f"[{local}]:{self.ports[0]}" if ":" in local else f"{local}:{self.ports[0]}"
        self.process: subprocess.Popen | None = None

    @staticmethod
    def check_ports(ports: tuple[int, int, int]) -> None:
        for flag, port in zip(("--http-port", "--grpc-port", "--metrics-port"), ports):
            check_port(flag, port)

    def start(self) -> TritonProcess:
        stderr = None if self.output is None else subprocess.STDOUT
        self.process = subprocess.Popen(self.command, env=self.environment, stdout=self.output, stderr=stderr)
        return self

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ready(self, model: str) -> bool:
        """Whether `model` answers ready now (one request, its connection closed: an open one would
        hold Triton's shutdown for its exit timeout)."""
        try:
            with urllib.request.urlopen(f"http://{self.address}/v2/models/{model}/ready", timeout=2) as reply:
                return reply.status == 200
        except OSError:
            return False  # not listening yet, or not ready (4xx)

    def wait_ready(self, model: str, timeout_s: float | None = None) -> bool:
        """True once `model` is ready, False if Triton exited first; TimeoutError after `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while self.running:
            if self.ready(model):
                return True
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"tritonserver: model {model!r} not ready in {timeout_s:g} s")
            time.sleep(READY_POLL_S)
        return False

    def drain(self) -> None:
        """No new requests: Triton serves the queued and running ones for its exit timeout, then exits."""
        if self.running:
            assert self.process is not None
            self.process.send_signal(signal.SIGTERM)  # as SIGINT for Triton; never ignored by a shell

    def kill(self) -> None:
        if self.running:
            assert self.process is not None
            self.process.kill()

    def stop(self) -> int:
        """Drain, wait for the exit timeout and the models' unloading, then kill; Triton's exit status."""
        if self.process is None:
            return 0
        self.drain()
        try:
            return self.process.wait(self.exit_timeout_s + UNLOAD_S)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait()

    def __enter__(self) -> TritonProcess:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def serve(self, model: str, on_ready: Callable[[], None] | None = None) -> int:
        """Start Triton and keep it until it exits or this process gets SIGINT or SIGTERM, then
        drain and stop it (a second signal kills it). SIGINT is handled even when a shell started
        this process in the background, where it is ignored by default. Triton's exit status."""
        signals = (signal.SIGINT, signal.SIGTERM)
        previous = {number: signal.getsignal(number) for number in signals}
        for number in signals:
            signal.signal(number, _raise_signalled)
        try:
            self.start()
            if self.wait_ready(model) and on_ready is not None:
                on_ready()
            assert self.process is not None
            return self.process.wait()
        except _Signalled:
            for number in signals:
                signal.signal(number, lambda *_: self.kill())  # no second drain: stop now
            return self.stop()
        finally:
            if self.running:  # an error on the way: no orphaned server
                self.kill()
            for number, handler in previous.items():
                signal.signal(number, handler)


def find_server(home: Path | None = None) -> TritonServer:
    """The installed server (`ilf-deploy install-triton`), else a `tritonserver` on PATH (containers)."""
    home = home or default_home()
    root = home / _SERVER
    binary = root / "bin" / "tritonserver"
    if binary.is_file() and (root / "backends" / "python" / "triton_python_backend_stub").is_file():
        return TritonServer(binary, root / "backends", (home / _LIBS,), home / "python" / "bin")
    on_path = shutil.which("tritonserver")
    if on_path is not None:
        backends = Path(on_path).resolve().parent.parent / "backends"  # /opt/tritonserver/{bin,backends}
        if (backends / "python").is_dir():
            return TritonServer(Path(on_path), backends)
    raise ConfigError(
        f"no tritonserver in {home} or on PATH: run `ilf-deploy install-triton` "
        "(after pip install 'ilf-deploy[triton]')"
    )


def install_server(home: Path | None = None, wheel: Path | None = None, force: bool = False) -> Path:
    """Unpack the server, its libraries and the Python backend from the nvidia-pytriton wheel into
    `home`; `wheel` is a downloaded copy, else pip downloads it (without its dependencies)."""
    home = home or default_home()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stamp = home / _STAMP
    record = {"wheel": WHEEL, "python": python, "packages": stub_pins()}
    if not force and stamp.is_file() and json.loads(stamp.read_text()) == record:
        try:
            find_server(home)
            return home
        except ConfigError:
            pass  # half an install: redo it
    with tempfile.TemporaryDirectory(prefix="ilf-triton-") as tmp:
        if wheel is None:
            download = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, WHEEL]
            if subprocess.run(download).returncode != 0:
                raise ConfigError(f"pip could not download {WHEEL}")
            wheel = next(Path(tmp).glob("*.whl"))
        home.parent.mkdir(parents=True, exist_ok=True)
        with staged_directory(home, replace=True) as staging:  # renamed into place when complete
            _unpack_server(wheel, staging, python)
            _stub_environment(staging / "python", record["packages"])
            (staging / _STAMP).write_text(json.dumps(record) + "\n")
    return home


def _unpack_server(wheel: Path, staging: Path, python: str) -> None:
    """The server, its libraries and this Python's backend stub from the wheel, into `staging`."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = [n for n in archive.namelist() if n.startswith((_SERVER, _LIBS))]
            if not any(n.endswith("bin/tritonserver") for n in names):
                raise ConfigError(f"{wheel} holds no tritonserver")
            archive.extractall(staging, names)
    except zipfile.BadZipFile:
        raise ConfigError(f"{wheel} is not a wheel") from None
    root = staging / _SERVER
    stub = root / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise ConfigError(f"{WHEEL} has no Python backend stub for Python {python}")
    # The backend runs the stub found beside libtriton_python.so.
    shutil.copy2(stub, root / "backends" / "python" / "triton_python_backend_stub")
    for path in [
        root / "bin" / "tritonserver",
        root / "backends" / "python" / "triton_python_backend_stub",
    ]:
        path.chmod(0o755)
    shutil.rmtree(root / "python_backend_stubs")  # the other Pythons' stubs: 7 MB we never run


def stub_pins() -> list[str]:
    """The stub environment's packages, at this environment's versions (a change reinstalls it)."""
    from importlib import metadata

    pins = []
    for package in STUB_PACKAGES:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins


def _stub_environment(path: Path, pins: list[str]) -> None:
    """A virtualenv for the Python backend's stub: numpy<2 and what our runtime imports."""
    import ilf_deploy

    subprocess.run([sys.executable, "-m", "venv", str(path)], check=True)
    install = [str(path / "bin" / "python"), "-m", "pip", "install", "--quiet", STUB_NUMPY, *pins]
    if subprocess.run(install).returncode != 0:
        raise ConfigError(f"pip could not install {', '.join([STUB_NUMPY, *pins])} for the Triton stub")
    # ilf_deploy itself by a link: an editable checkout stays live, and nothing else of ours comes along.
    source = path / "src"
    source.mkdir()
    (source / "ilf_deploy").symlink_to(Path(ilf_deploy.__file__).resolve().parent)
    site = next((path / "lib").glob("python3*/site-packages"))
    (site / "ilf_deploy.pth").write_text("../../../src\n")  # relative: the install is renamed into place
