"""CLI commands for NVIDIA Triton Inference Server: `export-triton`, `install-triton`, and
`run_triton`, which `serve --server triton` calls."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from ilf_deploy.cli import command, console
from ilf_deploy.cli.cluster import (
    Image,
    Namespace,
    NodeSelector,
    PodMonitor,
    Prometheus,
    Tolerations,
    cluster,
)
from ilf_deploy.cli.options import VARIANT_HELP, Digest, backend_help, load_bundle
from ilf_deploy.cli.paths import output_dir
from ilf_deploy.core.batching import DEFAULT_BATCHING, BatchingPolicy
from ilf_deploy.core.errors import ConfigError, check_at_least
from ilf_deploy.serving.triton.k8s import CLAIM, IMAGE, MANIFEST_FILES, check_names


@command("export-triton")
def export_triton(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `ilf-deploy build`).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Model repository to write into.")],
    name: Annotated[str, typer.Option(help="Triton model name.")] = "ilf",
    backend: Annotated[str, typer.Option(help=backend_help("onnxruntime"))] = "onnxruntime",
    variant: Annotated[str | None, typer.Option(help=VARIANT_HELP)] = None,
    instances: Annotated[int, typer.Option(help="Model instances (instance_group count).")] = 1,
    kind: Annotated[str, typer.Option(help="Instance kind: cpu or gpu (KIND_CPU / KIND_GPU).")] = "cpu",
    max_batch: Annotated[
        int | None, typer.Option(help="max_batch_size (default: the bundle's, at least 8).")
    ] = None,
    max_queue_delay_us: Annotated[
        int, typer.Option(help="How long Triton holds a request to batch it with others.")
    ] = DEFAULT_BATCHING.max_queue_delay_us,
    max_queue: Annotated[
        int, typer.Option(help="Queued requests before Triton rejects new ones.")
    ] = DEFAULT_BATCHING.max_queue,
    default_plan: Annotated[
        str | None, typer.Option(help="Plan for requests without one (default: first ILF plan).")
    ] = None,
    copy_bundle: Annotated[
        bool, typer.Option(help="Copy the bundle into the repository (ship it as one directory).")
    ] = False,
    layout: Annotated[
        str,
        typer.Option(help="python: one Python-backend model; bls: plus one Triton model per segment."),
    ] = "python",
    k8s: Annotated[
        Path | None, typer.Option(help="Also write Kubernetes and KServe manifests into this directory.")
    ] = None,
    image: Image = None,
    replicas: Annotated[int, typer.Option(help="Replicas for --k8s (the autoscaler's minimum).")] = 1,
    max_replicas: Annotated[int, typer.Option(help="The autoscaler's maximum for --k8s.")] = 4,
    claim: Annotated[str, typer.Option(help="PersistentVolumeClaim holding the repository (--k8s).")] = CLAIM,
    namespace: Namespace = "default",
    toleration: Tolerations = None,
    node_selector: NodeSelector = None,
    pod_monitor: PodMonitor = False,
    prometheus: Prometheus = None,
    warmup: Annotated[bool, typer.Option(help="Generate one image before reporting ready.")] = True,
    force: Annotated[
        bool, typer.Option(help="Replace models of the same name (and --k8s's manifests).")
    ] = False,
    digest: Digest = None,
) -> None:
    """Write a Triton model repository that serves the bundle (Python backend, dynamic batching)."""
    from ilf_deploy.serving.triton.repository import BUNDLE_DIR, ExportOptions, export_repository

    if k8s is not None and not copy_bundle:
        raise ConfigError("--k8s needs --copy-bundle: the pods see only the repository")
    check_at_least("--replicas", replicas)
    check_at_least("--max-replicas", max_replicas, replicas)  # at least --replicas
    output_dir(out, "--out", force=force, files=())  # a repository: export_repository checks its models
    output_dir(k8s, "--k8s", force=force, files=MANIFEST_FILES)
    placement = cluster(namespace, toleration, node_selector, pod_monitor, prometheus)
    if k8s is not None:  # names refused before anything is written (check_names: never rewritten)
        check_names(name, IMAGE if image is None else image, placement.namespace, claim=claim)
    options = ExportOptions(
        name=name,
        backend=backend,
        variant=variant,
        instances=instances,
        kind=kind,
        max_batch=max_batch,
        max_queue_delay_us=max_queue_delay_us,
        max_queue=max_queue,
        default_plan=default_plan,
        copy_bundle=copy_bundle,
        layout=layout,
        warmup=warmup,
        force=force,
        digest=digest,
    )
    for path in export_repository(bundle, out, options):
        console.print(f"model → {path}")
    if k8s is not None:
        from ilf_deploy.serving.triton.k8s import write_manifests

        written = write_manifests(
            k8s,
            name=name,
            claim=claim,
            image=image,
            cluster=placement,
            replicas=replicas,
            max_replicas=max_replicas,
            gpu=kind == "gpu",
            digest=load_bundle(bundle, verify_hashes=False).digest,  # the one just exported
            bundle=f"{name}/1/{BUNDLE_DIR}",
        )
        for path in written:
            console.print(f"manifests → {path}")


@command("install-triton")
def install_triton(
    wheel: Annotated[
        Path | None, typer.Option(help="A downloaded nvidia-pytriton wheel (default: pip downloads it).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Reinstall even if installed.")] = False,
) -> None:
    """Unpack tritonserver and its Python backend from the nvidia-pytriton wheel into this
    environment (the wheel itself is not installed: it would downgrade numpy)."""
    from ilf_deploy.serving.triton.server import find_server, install_server

    home = install_server(wheel=wheel, force=force)
    console.print(f"tritonserver → {find_server(home).binary}")


def run_triton(
    bundle: Path,
    backend: str,
    host: str,
    http_port: int,
    grpc_port: int,
    metrics_port: int,
    policy: BatchingPolicy,
    default_plan: str | None,
    digest: str | None = None,
    drain_s: float | None = None,
) -> int:
    """`serve --server triton`: export to a temporary repository and run tritonserver there until it
    exits or this process gets SIGINT or SIGTERM (`TritonProcess.serve`, backgrounded or not);
    returns its exit status. Signalled, Triton serves queued and running requests for at most
    `drain_s` (`--drain-s`, as Triton's whole-second `--exit-timeout-secs`; None: its default,
    30 s), then exits."""
    from ilf_deploy.serving.triton.repository import ExportOptions, export_repository
    from ilf_deploy.serving.triton.server import TritonProcess, find_server

    ports = (http_port, grpc_port, metrics_port)
    TritonProcess.check_ports(ports)  # before the export
    server = find_server()
    name = "ilf"
    with tempfile.TemporaryDirectory(prefix="ilf-triton-repo-") as repo:
        options = ExportOptions.serving(  # Triton's dynamic batcher, batching as `serve` does
            policy,
            name=name,
            backend=backend,
            default_plan=default_plan,
            digest=digest,  # --digest: export (and so serve) only the pinned bundle
        )
        export_repository(bundle, repo, options)
        exit_timeout_s = math.ceil(drain_s) if drain_s is not None else None
        triton = TritonProcess(server, Path(repo), ports, host, exit_timeout_s)

        def announce() -> None:
            url = f"http://{triton.address}/v2/models/{name}/infer"
            console.print(f"ready: POST {url} (gRPC :{triton.ports[1]}, metrics :{triton.ports[2]})")

        return triton.serve(name, on_ready=announce)
