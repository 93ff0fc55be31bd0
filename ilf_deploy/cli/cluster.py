"""Where the Kubernetes exporters' pods run (`export-triton --k8s`, `export-kuberay`): options declared
once, read into one `Cluster` (serving/triton/k8s.py)."""

from __future__ import annotations

from typing import Annotated

import typer

Namespace = Annotated[str, typer.Option(help="Kubernetes namespace of every object written.")]
Tolerations = Annotated[
    list[str] | None,
    typer.Option(
        "--toleration",
        metavar="KEY[=VALUE]:EFFECT",
        help="A toleration for the pods (repeatable); GPU pods also tolerate nvidia.com/gpu.",
    ),
]
NodeSelector = Annotated[
    list[str] | None,
    typer.Option(
        "--node-selector", metavar="KEY=VALUE", help="Schedule the pods on these nodes (repeatable)."
    ),
]
PodMonitor = Annotated[
    bool, typer.Option("--pod-monitor", help="Also write a PodMonitor (Prometheus Operator) for the metrics.")
]
Prometheus = Annotated[
    str | None,
    typer.Option(help="Prometheus' address for KEDA (KServe autoscaling); default the Operator's Service."),
]
Image = Annotated[
    str | None,
    typer.Option(
        help="Container image (default: the one `make images` built here, by digest; else NAME:VERSION)."
    ),
]


def cluster(
    namespace: str,
    tolerations: list[str] | None,
    node_selector: list[str] | None,
    pod_monitor: bool,
    prometheus: str | None = None,
):
    from ilf_deploy.serving.triton.k8s import PROMETHEUS, Cluster, parse_node_selector, parse_toleration

    return Cluster(
        namespace=namespace,
        node_selector=parse_node_selector(node_selector or []),
        tolerations=tuple(parse_toleration(t) for t in tolerations or []),
        monitor=pod_monitor,
        prometheus=prometheus or PROMETHEUS,
    )
