"""A throwaway Ray cluster of several nodes on this machine, in a private network and PID namespace:
what the tests and `benchmarks/batch.py` run on, and a way to try `batch`/`serve --server ray` here.

Ray binds its services to the machine's network interface address even when told 127.0.0.1, so a
cluster started plainly would be reachable from the network and could meet other clusters on the
machine. Inside `unshare --net --pid --fork --mount-proc` only loopback exists. Every process that
talks to the cluster (a driver, an HTTP client of Ray Serve) runs in the namespace too:
`Sandbox.command` wraps a command in `nsenter`. Each node is a `ray start --block` process tree,
killed by its PIDs (`kill_node`: a node lost); `close` kills the namespace's first process, and the
kernel then ends every process in it. Never `ray stop`: it kills Ray processes by name, machine-wide.

Needs `unshare`, `nsenter` and `ip` and the right to create namespaces (root, as in CI);
`unavailable()` says why not, for a test's skip reason.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PORT = 6379
ADDRESS = f"127.0.0.1:{PORT}"
BIN = Path(sys.executable).parent  # ray, ilf-deploy: this environment's
INIT = "ip link set lo up && echo up && while :; do sleep 3600 & wait $!; done"
NODE_ENV = {
    # Serve's proxy would send every request to the replica on its own node (README, Ray Serve)
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
}
# Waits in the namespace until the cluster has `nodes` alive nodes and `cpus` CPUs; prints the nodes.
_PROBE = """
import json, sys, time, ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
nodes, cpus, deadline = int(sys.argv[2]), float(sys.argv[3]), time.monotonic() + float(sys.argv[4])
while True:
    alive = [n for n in ray.nodes() if n["Alive"]]
    if len(alive) == nodes and ray.cluster_resources().get("CPU", 0) == cpus:
        break
    if time.monotonic() > deadline:
        sys.exit(f"{len(alive)} nodes alive, {ray.cluster_resources().get('CPU', 0)} CPUs")
    time.sleep(0.2)
print(json.dumps([{"id": n["NodeID"], "head": "node:__internal_head__" in n["Resources"]} for n in alive]))
"""


def unavailable() -> str | None:
    """Why a sandbox cannot start here (a test's skip reason), or None."""
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"no `{tool}` on this machine: a Ray sandbox needs unshare, nsenter and ip"
    probe = subprocess.run(
        ["unshare", "--net", "--pid", "--fork", "--mount-proc", "true"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["unknown error"])[-1]
        return f"unshare --net --pid is not permitted here ({reason}): Ray tests need root or user namespaces"
    return None


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    found = []
    for child in _children(pid):
        found += [child, *descendants(child)]
    return found


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process under it (their PIDs gathered first)."""
    for target in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(target, signal.SIGKILL)


@dataclass
class Node:
    process: subprocess.Popen
    log: Path
    head: bool = False


def answer_sigint() -> None:
    """In a child before it runs: SIGINT back to its default, since an ignored SIGINT is inherited."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@dataclass
class Sandbox:
    """`with Sandbox() as cluster: cluster.add_node(head=True, cpus=2); cluster.add_node(cpus=1)`."""

    env: dict[str, str] = field(default_factory=dict)  # extra environment for every node
    object_store_mb: int = 256
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="ilf-ray-", dir="/tmp")))
    nodes: list[Node] = field(default_factory=list)
    _unshare: subprocess.Popen | None = None
    _init: int | None = None

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def start(self) -> Sandbox:
        self._unshare = subprocess.Popen(
            ["unshare", "--net", "--pid", "--fork", "--mount-proc", "bash", "-c", INIT],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,  # "sigprocmask unblock failed" when its namespace is killed
            text=True,
            start_new_session=True,
        )
        assert self._unshare.stdout is not None
        if self._unshare.stdout.readline().strip() != "up":
            raise RuntimeError("the namespace did not come up (unshare --net --pid refused?)")
        deadline = time.monotonic() + 10
        while not _children(self._unshare.pid):
            if time.monotonic() > deadline:
                raise RuntimeError("the namespace's first process did not start")
            time.sleep(0.01)
        self._init = _children(self._unshare.pid)[0]
        return self

    def command(self, args: list[Any], cwd: str | Path = "/") -> list[str]:
        """`args` run inside the namespace (its network and its processes)."""
        assert self._init is not None, "start() first"
        return ["nsenter", "-t", str(self._init), "-n", "-p", "-m", f"--wd={cwd}", "--", *map(str, args)]

    def popen(self, args: list[Any], cwd: str | Path = "/", **kwargs: Any) -> subprocess.Popen:
        """`args` started in the namespace, answering SIGINT (`signal`) even where this process was
        started with it ignored, as a background job of a non-interactive shell is."""
        env = {**os.environ, **NODE_ENV, **kwargs.pop("env", {})}
        return subprocess.Popen(
            self.command(args, cwd), env=env, start_new_session=True, preexec_fn=answer_sigint, **kwargs
        )

    def run(self, args: list[Any], cwd: str | Path = "/", **kwargs: Any) -> subprocess.CompletedProcess:
        env = {**os.environ, **NODE_ENV, **kwargs.pop("env", {})}
        return subprocess.run(self.command(args, cwd), env=env, **kwargs)

    @staticmethod
    def signal(process: subprocess.Popen, number: int) -> None:
        """Signal the command `popen` started in the namespace (not `nsenter`, which would just die)."""
        deadline = time.monotonic() + 10
        while not _children(process.pid):
            if process.poll() is not None or time.monotonic() > deadline:
                return
            time.sleep(0.01)
        with contextlib.suppress(ProcessLookupError):
            os.kill(_children(process.pid)[0], number)

    def add_node(self, cpus: float, head: bool = False, env: dict[str, str] | None = None) -> Node:
        """A `ray start --block` node (the first one: `head=True`)."""
        name = "head" if head else f"node{len(self.nodes)}"
        common = [
            f"--num-cpus={cpus:g}",
            "--node-ip-address=127.0.0.1",
            f"--object-store-memory={self.object_store_mb * 2**20}",
            "--disable-usage-stats",
            "--block",
        ]
        if head:
            where = ["--head", f"--port={PORT}", "--include-dashboard=false", f"--temp-dir={self.root}"]
        else:
            where = [f"--address={ADDRESS}"]
        log = self.root / f"{name}.log"
        with log.open("ab") as out:
            process = self.popen(
                [BIN / "ray", "start", *where, *common],
                env={**self.env, **(env or {})},
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        node = Node(process, log, head)
        self.nodes.append(node)
        return node

    def wait_for_head(self, timeout: float = 60) -> None:
        """Until the head's GCS port answers (before the other nodes join)."""
        code = (
            "import socket, sys, time\n"
            "deadline = time.monotonic() + float(sys.argv[1])\n"
            "while True:\n"
            "    try:\n"
            f"        socket.create_connection(('127.0.0.1', {PORT}), 1).close(); break\n"
            "    except OSError:\n"
            "        if time.monotonic() > deadline: sys.exit('the head did not open its port')\n"
            "        time.sleep(0.1)\n"
        )
        probe = self.run([sys.executable, "-c", code, timeout], capture_output=True, text=True)
        if probe.returncode != 0:
            raise RuntimeError(
                f"{probe.stderr.strip()}: {self.nodes[0].log.read_text(errors='replace')[-2000:]}"
            )

    def wait(self, timeout: float = 120) -> list[dict[str, Any]]:
        """Until every node started (and not killed) is up with its CPUs: [{id, head}] of the nodes."""
        live = [n for n in self.nodes if n.process.poll() is None]
        cpus = sum(float(_flag(n, "--num-cpus")) for n in live)
        probe = self.run(
            [sys.executable, "-c", _PROBE, ADDRESS, len(live), cpus, timeout],
            capture_output=True,
            text=True,
            timeout=timeout + 60,
        )
        if probe.returncode != 0:
            logs = "\n".join(n.log.read_text(errors="replace")[-1500:] for n in self.nodes)
            raise RuntimeError(f"the Ray sandbox did not come up: {probe.stderr[-2000:]}\n{logs}")
        return json.loads(probe.stdout.strip().splitlines()[-1])

    def kill_node(self, node: Node) -> None:
        """The node lost: its whole process tree SIGKILLed."""
        kill_tree(node.process.pid)
        node.process.wait(timeout=30)

    def close(self) -> None:
        if self._init is not None:
            kill_tree(self._init)  # the namespace's first process: the kernel ends the rest
            self._init = None
        if self._unshare is not None:
            self._unshare.wait(timeout=30)
            self._unshare = None
        for node in self.nodes:
            if node.process.poll() is None:
                node.process.wait(timeout=30)
        shutil.rmtree(self.root, ignore_errors=True)


def _flag(node: Node, name: str) -> str:
    args = node.process.args
    assert isinstance(args, list)
    return next(str(a).split("=", 1)[1] for a in args if str(a).startswith(name + "="))
