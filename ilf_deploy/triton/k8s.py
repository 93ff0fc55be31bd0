"""Kubernetes manifests for a Triton model repository (`export-triton --k8s DIR`).

`triton.yaml`: a Deployment of N Triton pods that mount the repository from a PersistentVolumeClaim,
a Service in front of them (HTTP 8000, gRPC 8001, metrics 8002), readiness on /v2/health/ready, and
a HorizontalPodAutoscaler on Triton's queue time per request (a Pods metric that a Prometheus adapter
computes from nv_inference_queue_duration_us and nv_inference_request_success; README).
`kserve.yaml`: the same pods as a KServe InferenceService (raw deployment, KEDA on the same metric).

The image must carry ilf-deploy for the Python-backend model (README: a two-line Dockerfile on
NVIDIA's Triton container).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
MOUNT = "/models"
IMAGE = "ilf-deploy-triton:latest"
DIGEST_ANNOTATION = "ilf-deploy.dev/bundle-digest"
# Average microseconds a request waited in Triton's queue over the last minute, per pod.
QUEUE_METRIC = "triton_queue_us_per_request"
QUEUE_QUERY = (
    "sum(rate(nv_inference_queue_duration_us[1m]))"
    " / clamp_min(sum(rate(nv_inference_request_success[1m])), 1)"
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
        ],
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


def manifests(
    name: str,
    claim: str,
    image: str = IMAGE,
    replicas: int = 1,
    max_replicas: int = 4,
    gpu: bool = False,
    digest: str | None = None,
    bundle: str | None = None,
) -> dict[str, list[dict[str, Any]]]:
    """File name -> the objects it holds. With `digest` (and `bundle`, the bundle's path in the
    repository), the pods carry the digest and check it before Triton starts."""
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/part-of": "ilf-deploy"}
    pinned: dict[str, Any] = {}
    if digest is not None:
        digest_annotation = {DIGEST_ANNOTATION: digest}  # a new bundle changes the pod template: a rollout
        pinned = {"initContainers": [_digest_check(image, f"{MOUNT}/{bundle}", digest)]}
    else:
        digest_annotation = {}
    volume = {"name": "model-repository", "persistentVolumeClaim": {"claimName": claim, "readOnly": True}}
    scrape = {
        "prometheus.io/scrape": "true",
        "prometheus.io/port": str(PORTS["metrics"]),
        "prometheus.io/path": "/metrics",
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels, "annotations": {**scrape, **digest_annotation}},
                "spec": {**pinned, "containers": [_container("triton", image, gpu)], "volumes": [volume]},
            },
        },
    }
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "selector": labels,
            "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in PORTS.items()],
        },
    }
    autoscaler = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": replicas,
            "maxReplicas": max(max_replicas, replicas),
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
    inference_service = {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {
                "serving.kserve.io/deploymentMode": "RawDeployment",
                "serving.kserve.io/autoscalerClass": "keda",
                **scrape,
                **digest_annotation,
            },
        },
        "spec": {
            "predictor": {
                "minReplicas": replicas,
                "maxReplicas": max(max_replicas, replicas),
                "autoScaling": {
                    "metrics": [
                        {
                            "type": "External",
                            "external": {
                                "metric": {"backend": "prometheus", "query": QUEUE_QUERY},
                                "target": {"type": "Value", "value": "50000"},
                            },
                        }
                    ]
                },
                **pinned,
                "containers": [_container("kserve-container", image, gpu)],
                "volumes": [volume],
            }
        },
    }
    return {"triton.yaml": [deployment, service, autoscaler], "kserve.yaml": [inference_service]}


def write_manifests(directory: str | Path, **kwargs: Any) -> list[Path]:
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file, objects in manifests(**kwargs).items():
        path = out / file
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        written.append(path)
    return written
