"""Kubernetes manifests for a Triton model repository (`export-triton --k8s DIR`).

`triton.yaml`: a Deployment of N Triton pods that mount the repository from a PersistentVolumeClaim,
a Service in front of them (HTTP 8000, gRPC 8001, metrics 8002), readiness on /v2/health/ready, a
shutdown that drains (a preStop sleep, then Triton's --exit-timeout-secs, within the grace period), and
a HorizontalPodAutoscaler on Triton's queue time per request (a Pods metric that a Prometheus adapter
computes from nv_inference_queue_duration_us and nv_inference_request_success; README).
`kserve.yaml`: the same pods as a KServe InferenceService (raw deployment, KEDA on the same metric).

Every exporter (this one, serving/scale/kuberay.py) shares what makes a manifest fit to apply: names checked
once (refused in one line, never rewritten), one claim name and mount path, images by digest when
`make images` built them here (out/images/images.json), `imagePullPolicy: IfNotPresent`, a hardened
pod (non-root, read-only root filesystem with an emptyDir /tmp, no capabilities, seccomp
RuntimeDefault), resources on every container, GPU tolerations and a node selector, a
PodDisruptionBudget, and a PodMonitor on request (`Cluster`).
"""

from __future__ import annotations

import copy
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ilf_deploy import __version__
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.serving.triton.server import EXIT_TIMEOUT_S

PORTS = {"http": 8000, "grpc": 8001, "metrics": 8002}
MOUNT = "/models"  # where every exporter mounts the claim
CLAIM = "ilf-models"  # the claim every exporter names by default: one volume for a bundle
IMAGE = "ilf-deploy-triton"
IMAGES_FILE = Path("out/images/images.json")  # `make images` writes the digests it built here
UID = 10001  # the images' user (containers/build.py)
PULL_POLICY = "IfNotPresent"
# KEDA's Prometheus scaler needs the server's address: the Prometheus Operator's default Service
PROMETHEUS = "http://prometheus-operated.monitoring.svc:9090"
DIGEST_ANNOTATION = "ilf-deploy.dev/bundle-digest"
# Average microseconds a request waited in Triton's queue over the last minute, per pod.
QUEUE_METRIC = "triton_queue_us_per_request"
# On deletion Kubernetes sends SIGTERM while it is still taking the pod out of the Service's endpoints:
# the preStop sleep keeps Triton serving until no new request is routed to it, then Triton drains for
# its --exit-timeout-secs. The grace period covers both (Kubernetes' default, 30 s, would SIGKILL a
# drain that Triton's default 30 s timeout allows).
PRESTOP_SLEEP_S = 5
GRACE_PERIOD_S = PRESTOP_SLEEP_S + EXIT_TIMEOUT_S + 10  # + unloading the model


def queue_query(selector: str) -> str:
    """Triton's queue time per request over the pods `selector` picks (PromQL label matchers)."""
    return (
        f"sum(rate(nv_inference_queue_duration_us{{{selector}}}[1m]))"
        f" / clamp_min(sum(rate(nv_inference_request_success{{{selector}}}[1m])), 1)"
    )


# Kubernetes' own name rules, so a bad name is one line here, not an `kubectl apply` error later:
# an object that a Service is named after is a DNS-1035 label; claims and Secrets are DNS-1123 subdomains.
_LABEL = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")


def check_names(name: str, image: str, namespace: str = "default", **references: str | None) -> None:
    """`name` (the objects' and their Service's), `image`, `namespace`, and the claims and Secrets
    `references` names (option -> value; None: not used), as Kubernetes will accept them. Checked once,
    here, for every exporter: a name is refused, never rewritten."""
    for option, value in (("name", name), ("namespace", namespace)):
        if not _LABEL.fullmatch(value):
            raise ConfigError(
                f"--{option} {value!r}: Kubernetes needs a DNS-1035 label (lower-case letters, digits and "
                "'-', starting with a letter, at most 63 characters)"
            )
    if not image or any(c.isspace() for c in image):
        raise ConfigError(f"--image {image!r}: give a container image reference (no spaces)")
    for option, value in references.items():
        if value is not None and not _SUBDOMAIN.fullmatch(value):
            raise ConfigError(
                f"--{option.replace('_', '-')} {value!r}: Kubernetes needs a DNS-1123 name (lower-case "
                "letters, digits, '-' and '.', starting and ending with a letter or digit)"
            )


def default_image(name: str, images: Path = IMAGES_FILE) -> str:
    """`name@sha256:...` when `make images` built it here, else `name:VERSION` (never `:latest`)."""
    try:
        table = json.loads(images.read_text())
    except (OSError, ValueError):
        return f"{name}:{__version__}"
    row = table.get(name)
    return row["reference"] if isinstance(row, dict) and "reference" in row else f"{name}:{__version__}"


_TOLERATION = re.compile(r"(?P<key>[A-Za-z0-9./_-]+)(=(?P<value>[A-Za-z0-9._-]*))?:(?P<effect>\w+)")
_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")
GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def parse_toleration(text: str) -> dict[str, str]:
    """`KEY[=VALUE]:EFFECT` as a toleration (Equal with a value, Exists without)."""
    match = _TOLERATION.fullmatch(text)
    if not match or match["effect"] not in _EFFECTS:
        raise ConfigError(
            f"--toleration {text!r}: give KEY[=VALUE]:EFFECT, EFFECT one of {', '.join(_EFFECTS)}"
        )
    if match["value"] is None:
        return {"key": match["key"], "operator": "Exists", "effect": match["effect"]}
    return {"key": match["key"], "operator": "Equal", "value": match["value"], "effect": match["effect"]}


def parse_node_selector(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    selector = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise ConfigError(f"--node-selector {item!r}: give KEY=VALUE")
        selector[key] = value
    return selector


@dataclass(frozen=True)
class Cluster:
    """Where and how the pods run, the same for every exporter."""

    namespace: str = "default"
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: tuple[dict[str, str], ...] = ()  # GPU pods also tolerate nvidia.com/gpu
    monitor: bool = False  # a PodMonitor (Prometheus Operator) for the pods' metrics port
    prometheus: str = PROMETHEUS  # KEDA's serverAddress (KServe)

    def metadata(self, name: str, labels: dict[str, str], **extra: Any) -> dict[str, Any]:
        return {"name": name, "namespace": self.namespace, "labels": labels, **extra}

    def harden(self, spec: dict[str, Any], gpu: bool) -> dict[str, Any]:
        """`spec` (a pod spec) non-root with a read-only root filesystem, every container pulled if
        absent and given resources, placed by the node selector and tolerations."""
        tmp = {"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            container["imagePullPolicy"] = PULL_POLICY
            container.setdefault("resources", INIT_RESOURCES)
            container["securityContext"] = {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "runAsNonRoot": True,
                "capabilities": {"drop": ["ALL"]},
            }
            container["volumeMounts"] = [
                *container.get("volumeMounts", []),
                {"name": "tmp", "mountPath": "/tmp"},
            ]
        spec["volumes"] = [*spec.get("volumes", []), tmp]
        spec["securityContext"] = {
            "runAsNonRoot": True,
            "runAsUser": UID,
            "runAsGroup": UID,
            "fsGroup": UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        tolerations = [*self.tolerations, *([GPU_TOLERATION] if gpu else [])]
        if tolerations:
            spec["tolerations"] = [dict(t) for t in tolerations]
        if self.node_selector:
            spec["nodeSelector"] = dict(self.node_selector)
        return copy.deepcopy(spec)  # no object twice in a document: YAML would write an alias

    def disruption_budget(self, name: str, labels: dict[str, str]) -> dict[str, Any]:
        """Voluntary evictions (drains, upgrades) take one pod at a time."""
        return {
            "apiVersion": "policy/v1",
            "kind": "PodDisruptionBudget",
            "metadata": self.metadata(name, labels),
            "spec": {"maxUnavailable": 1, "selector": {"matchLabels": labels}},
        }

    def pod_monitor(self, name: str, labels: dict[str, str], port: str) -> list[dict[str, Any]]:
        """A PodMonitor scraping `port` (named) on the pods `labels` select, when asked for."""
        if not self.monitor:
            return []
        endpoint = {"port": port, "path": "/metrics", "interval": "15s"}
        return [
            {
                "apiVersion": "monitoring.coreos.com/v1",
                "kind": "PodMonitor",
                "metadata": self.metadata(name, labels),
                "spec": {"selector": {"matchLabels": labels}, "podMetricsEndpoints": [endpoint]},
            }
        ]


# The digest check reads the bundle's files once: small, and bounded like every container.
INIT_RESOURCES = {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "512Mi"}}
SHM = {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}}  # Triton's Python backend


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
        "volumeMounts": [
            {"name": "model-repository", "mountPath": claim_mount, "readOnly": True},
            {"name": SHM["name"], "mountPath": "/dev/shm"},  # the Python backend's shared memory
        ],
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
        "resources": INIT_RESOURCES,
    }


@dataclass(frozen=True)
class Deployment:
    """What the manifests describe: a model repository on a claim, served by N Triton pods."""

    name: str
    claim: str = CLAIM
    image: str | None = None  # None: default_image(IMAGE)
    replicas: int = 1
    max_replicas: int = 4
    gpu: bool = False
    digest: str | None = None  # the pinned bundle's digest: carried by the pods and checked at start
    bundle: str | None = None  # the bundle's path inside the repository, for the check
    cluster: Cluster = field(default_factory=Cluster)

    def __post_init__(self) -> None:
        if self.image is None:
            object.__setattr__(self, "image", default_image(IMAGE))
        check_names(self.name, self.image, self.cluster.namespace, claim=self.claim)

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
        """A hardened pod spec: the digest check (if pinned), Triton, the repository and /dev/shm."""
        volume = {
            "name": "model-repository",
            "persistentVolumeClaim": {"claimName": self.claim, "readOnly": True},
        }
        spec: dict[str, Any] = {"terminationGracePeriodSeconds": GRACE_PERIOD_S}
        if self.digest is not None:
            spec["initContainers"] = [_digest_check(self.image, f"{MOUNT}/{self.bundle}", self.digest)]
        spec["containers"] = [_container(container, self.image, self.gpu)]
        spec["volumes"] = [volume, dict(SHM)]
        return self.cluster.harden(spec, self.gpu)


def _deployment(d: Deployment) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": d.cluster.metadata(d.name, d.labels),
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
        "metadata": d.cluster.metadata(d.name, d.labels),
        "spec": {
            "selector": d.labels,
            "ports": [{"name": n, "port": p, "targetPort": p, "protocol": "TCP"} for n, p in PORTS.items()],
        },
    }


def _autoscaler(d: Deployment) -> dict[str, Any]:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": d.cluster.metadata(d.name, d.labels),
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


def kserve_labels(name: str) -> dict[str, str]:
    """The label KServe puts on an InferenceService's pods."""
    return {"serving.kserve.io/inferenceservice": name}


def _inference_service(d: Deployment) -> dict[str, Any]:
    # this service's pods only: KServe names them NAME-predictor-..., in the namespace
    scope = f'namespace="{d.cluster.namespace}",pod=~"{d.name}-predictor-.*"'
    external = {
        "metric": {
            "backend": "prometheus",
            "serverAddress": d.cluster.prometheus,
            "query": queue_query(scope),
        },
        "target": {"type": "Value", "value": "50000"},
    }
    annotations = {
        "serving.kserve.io/deploymentMode": "RawDeployment",
        "serving.kserve.io/autoscalerClass": "keda",
        **d.annotations,
    }
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": d.cluster.metadata(d.name, d.labels, annotations=annotations),
        "spec": {
            "predictor": {
                "minReplicas": d.replicas,
                "maxReplicas": max(d.max_replicas, d.replicas),
                "autoScaling": {"metrics": [{"type": "External", "external": external}]},
                **d.pod("kserve-container"),
            }
        },
    }


MANIFEST_FILES = ("triton.yaml", "kserve.yaml")  # what `manifests` writes (export-triton --k8s --force)


def manifests(**kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    """File name -> the objects it holds (`kwargs`: the fields of `Deployment`)."""
    d = Deployment(**kwargs)
    kserve = kserve_labels(d.name)
    return {
        "triton.yaml": [
            _deployment(d),
            _service(d),
            _autoscaler(d),
            d.cluster.disruption_budget(d.name, d.labels),
            *d.cluster.pod_monitor(d.name, d.labels, "metrics"),
        ],
        "kserve.yaml": [
            _inference_service(d),
            d.cluster.disruption_budget(f"{d.name}-predictor", kserve),
            *d.cluster.pod_monitor(f"{d.name}-predictor", kserve, "metrics"),
        ],
    }


def write_manifests(directory: str | Path, **kwargs: Any) -> list[Path]:
    out = Path(directory)
    files = manifests(**kwargs)  # every name checked before a file is written
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for file, objects in files.items():
        path = out / file
        path.write_text(yaml.safe_dump_all(objects, sort_keys=False))
        written.append(path)
    return written
