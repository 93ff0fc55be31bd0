"""Kubernetes manifests for a Triton model repository (`export-triton --k8s DIR`).

`triton.yaml`: a Deployment of N Triton pods that mount the repository from a PersistentVolumeClaim,
a Service in front of them (HTTP 8000, gRPC 8001, metrics 8002), readiness on /v2/health/ready, a
shutdown that drains (a preStop sleep, then Triton's --exit-timeout-secs, within the grace period), and
a HorizontalPodAutoscaler on Triton's queue time per request (a Pods metric that a Prometheus adapter
computes from nv_inference_queue_duration_us and nv_inference_request_success; README).
`kserve.yaml`: the same pods as a KServe InferenceService (raw deployment, KEDA on the same metric).

The image must carry ilf-deploy for the Python-backend model (README: a two-line Dockerfile on
NVIDIA's Triton container).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import ConfigError
from .server import EXIT_TIMEOUT_S

PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
MOUNT = "/models"
IMAGE = "ilf-deploy-triton:latest"
DIGEST_ANNOTATION = "ilf-deploy.dev/bundle-digest"
# Average microseconds a request waited in Triton's queue over the last minute, per pod.
QUEUE_METRIC = "triton_queue_us_per_request"
# On deletion Kubernetes sends SIGTERM while it is still taking the pod out of the Service's endpoints:
# the preStop sleep keeps Triton serving until no new request is routed to it, then Triton drains for
# its --exit-timeout-secs. The grace period covers both (Kubernetes' default, 30 s, would SIGKILL a
# drain that Triton's default 30 s timeout allows).
PRESTOP_SLEEP_S = 5
GRACE_PERIOD_S = PRESTOP_SLEEP_S + EXIT_TIMEOUT_S + 10  # + unloading the model
QUEUE_QUERY = (
    "sum(rate(nv_inference_queue_duration_us[1m]))"
    " / clamp_min(sum(rate(nv_inference_request_success[1m])), 1)"
)


# Kubernetes' own name rules, so a bad name is one line here, not an `kubectl apply` error later:
# an object that a Service is named after is a DNS-1035 label; claims and Secrets are DNS-1123 subdomains.
_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def check_names(name: str, image: str, **references: str | None) -> None:
    """`name` (the objects' and their Service's), `image`, and the claims and Secrets `references`
    names (option -> value; None: not used), as Kubernetes will accept them."""
    if not _LABEL.fullmatch(name):
        raise ConfigError(
            f"name {name!r}: Kubernetes needs a DNS-1035 label (lower-case letters, digits and '-', "
            "starting with a letter, at most 63 characters)"
        )
    if not image or any(c.isspace() for c in image):
        raise ConfigError(f"--image {image!r}: give a container image reference (no spaces)")
    for option, value in references.items():
        if value is not None and not _SUBDOMAIN.fullmatch(value):
            raise ConfigError(
                f"--{option.replace('_', '-')} {value!r}: Kubernetes needs a DNS-1123 name (lower-case "
                "letters, digits, '-' and '.', starting and ending with a letter or digit)"
            )


def _container(name: str, image: str, gpu: bool, claim_mount: str = MOUNT) -> dict[str, Any]:
    probe = {"httpGet": {"path": "/v2/health/ready", "port": PORTS["http"]}, "periodSeconds": 5}
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "command": ["tritonserver"],
        "args": [
            f"--model-repository={claim_mount}",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        ],
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SLEEP_S)]}}},
        "ports": [{"name": n, "containerPort": p, "protocol": "TCP"} for n, p in PORTS.items()],
        "readinessProbe": {**probe, "initialDelaySeconds": 5, "failureThreshold": 3},
        "startupProbe": {
            "httpGet": {"path": "/v2/health/live", "port": PORTS["http"]},
            "periodSeconds": 5,
            "failureThreshold": 60,  # loading and warming the model may take minutes on big bundles
        },
        "livenessProbe": {"httpGet": {"path": "/v2/health/live", "port": PORTS["http"]}, "periodSeconds": 10},
        "volumeMounts": [{"name": "model-repository", "mountPath": claim_mount, "readOnly": True}],
        "resources": {
            "requests": {"cpu": "2", "memory": "4Gi"},
            "limits": {"memory": "8Gi", **({"nvidia.com/gpu": "1"} if gpu else {})},
        },
    }
    return container


def _digest_check(image: str, bundle: str, digest: str) -> dict[str, Any]:
    """An init container that refuses to start the pod unless the mounted bundle is the pinned one."""
    return {
        "name": "bundle-digest",
        "image": image,
        "command": ["ilf-deploy", "inspect", bundle, "--digest", digest],
        "volumeMounts": [{"name": "model-repository", "mountPath": MOUNT, "readOnly": True}],
    }


@dataclass(frozen=True)
class Deployment:
    """What the manifests describe: a model repository on a claim, served by N Triton pods."""

    name: str
    claim: str
    image: str = IMAGE
    replicas: int = 1
    max_replicas: int = 4
    gpu: bool = False
    digest: str | None = None  # the pinned bundle's digest: carried by the pods and checked at start
    bundle: str | None = None  # the bundle's path inside the repository, for the check

    def __post_init__(self) -> None:
        check_names(self.name, self.image, claim=self.claim)

    @property
    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": self.name, "app.kubernetes.io/part-of": "ilf-deploy"}

    @property
    def annotations(self) -> dict[str, str]:
        scrape = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(PORTS["metrics"]),
            "prometheus.io/path": "/metrics",
        }
        # a new bundle changes the pod template's annotations, so Kubernetes rolls the pods
        return {**scrape, DIGEST_ANNOTATION: self.digest} if self.digest else scrape

    def pod(self, container: str) -> dict[str, Any]:
        """A pod spec: the digest check (if pinned), Triton, and the repository's volume."""
        volume = {
            "name": "model-repository",
            "persistentVolumeClaim": {"claimName": self.claim, "readOnly": True},
        }
        spec: dict[str, Any] = {"terminationGracePeriodSeconds": GRACE_PERIOD_S}
        if self.digest is not None:
            spec["initContainers"] = [_digest_check(self.image, f"{MOUNT}/{self.bundle}", self.digest)]
        return {**spec, "containers": [_container(container, self.image, self.gpu)], "volumes": [volume]}


def _deployment(d: Deployment) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": d.name, "labels": d.labels},
        "spec": {
            "replicas": d.replicas,
            "selector": {"matchLabels": d.labels},
            "template": {
                "metadata": {"labels": d.labels, "annotations": d.annotations},
                "spec": d.pod("triton"),
            },
        },
    }


def _service(d: Deployment) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": d.name, "labels": d.labels},
        "spec": {
            "selector": d.labels,
            "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in PORTS.items()],
        },
    }


def _autoscaler(d: Deployment) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": d.name, "labels": d.labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": d.name},
            "minReplicas": d.replicas,
            "maxReplicas": max(d.max_replicas, d.replicas),
            "metrics": [
                {
                    "type": "Pods",
                    "pods": {
                        "metric": {"name": QUEUE_METRIC},
                        # more than 50 ms in the queue per request, on average: add pods
                        "target": {"type": "AverageValue", "averageValue": "50000"},
                    },
                }
            ],
        },
    }


def _inference_service(d: Deployment) -> dict[str, Any]:
    external = {
        "metric": {"backend": "prometheus", "query": QUEUE_QUERY},
        "target": {"type": "Value", "value": "50000"},
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": d.name,
            "labels": d.labels,
            "annotations": {
                "serving.kserve.io/deploymentMode": "RawDeployment",
                "serving.kserve.io/autoscalerClass": "keda",
                **d.annotations,
            },
        },
        "spec": {
            "predictor": {
                "minReplicas": d.replicas,
                "maxReplicas": max(d.max_replicas, d.replicas),
                "autoScaling": {"metrics": [{"type": "External", "external": external}]},
                **d.pod("kserve-container"),
            }
        },
    }


def manifests(**kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    """File name -> the objects it holds (`kwargs`: the fields of `Deployment`)."""
    d = Deployment(**kwargs)
    return {
        "triton.yaml": [_deployment(d), _service(d), _autoscaler(d)],
        "kserve.yaml": [_inference_service(d)],
    }


def write_manifests(directory: str | Path, **kwargs: Any) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file, objects in manifests(**kwargs).items():
        path = out / file
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        written.append(path)
    return written
