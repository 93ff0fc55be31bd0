"""KubeRay manifests (`ilf-deploy export-kuberay`): the same Ray Serve deployment and Ray batch
on Kubernetes, beside the Triton/KServe ones (serving/triton/k8s.py).

`rayservice.yaml`: a RayService whose `serveConfigV2` deploys `ilf_deploy.serving.scale.serve:app_builder`
over the bundle at a path every pod mounts (a PersistentVolumeClaim, read-only), with its digest
pinned; KubeRay's serve Service spreads requests over the pods' Serve proxies.
`rayjob.yaml`: a RayJob whose entrypoint is `ilf-deploy batch ... --ray-address auto` with the digest
pinned; prompts and results live on a second claim that the head pod (where the driver runs)
mounts. The job is resumable, so RayJob's `backoffLimit` retries finish what a failed run left.

Every pod checks the bundle's digest in an init container (`ilf-deploy inspect BUNDLE --digest`)
before Ray starts, and carries it as the annotation `ilf-deploy.dev/bundle-digest` (a new bundle
rolls the pods); the replicas and actors check it again when they open the bundle. The image is
`ilf-deploy-ray` (`make images IMAGES=ray`; by digest when built here). The claim, its mount path,
the names' checks, the pods' hardening, placement, PodDisruptionBudget and PodMonitor are the Triton
exporter's (serving/triton/k8s.py `Cluster`): one bundle, one claim, the same path in every manifest.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import write_atomic
from ilf_deploy.serving.triton.k8s import CLAIM, DIGEST_ANNOTATION, MOUNT, Cluster, check_names, default_image

RAY_VERSION = "2.60.0"  # the Ray these manifests and the tests were made with
IMAGE = "ilf-deploy-ray"
MODELS = MOUNT  # where the bundle's claim is mounted (the Triton exporter's too)
DATA = "/data"  # the batch's prompts and results (RayJob)
METRICS_PORT = 8080  # Ray's metrics export port on every node (PodMonitor)
PORTS = {"gcs-server": 6379, "dashboard": 8265, "client": 10001, "serve": 8000}


@dataclass(frozen=True)
class KubeRay:
    """What the manifests describe: a bundle on a claim, a Ray cluster, and what runs on it."""

    name: str
    bundle: str  # the bundle's path on the claim: it is at /models/BUNDLE in every pod
    digest: str
    claim: str = CLAIM
    image: str | None = None  # None: default_image(IMAGE)
    cluster: Cluster = field(default_factory=Cluster)
    workers: int = 2  # worker pods (the autoscaler's minimum)
    max_workers: int | None = None  # None: a fixed number of pods; else KubeRay's autoscaler
    worker_cpus: int = 2
    worker_memory: str = "8Gi"
    gpu: bool = False
    replicas: int = 1  # Ray Serve replicas
    autoscale: tuple[int, int] | None = None  # Ray Serve's autoscaler, MIN..MAX replicas
    backend: str = "auto"
    api_key_secret: str | None = None  # a Secret with an ILF_API_KEYS key: serve's API keys
    data_claim: str = "ilf-batch-data"  # RayJob: prompts and results
    prompts: str = "prompts.jsonl"  # on the data claim
    results: str = "results"  # on the data claim
    actors: int = 2  # RayJob: Ray actors of `batch`

    def __post_init__(self) -> None:
        if self.image is None:
            object.__setattr__(self, "image", default_image(IMAGE))
        check_names(
            self.name, self.image, self.cluster.namespace, claim=self.claim, data_claim=self.data_claim,
            api_key_secret=self.api_key_secret,
        )  # fmt: skip
        if self.bundle.startswith("/") or ".." in self.bundle.split("/"):
            raise ConfigError(f"--bundle-path {self.bundle!r}: give a path inside the claim")

    @property
    def bundle_path(self) -> str:
        return f"{MODELS}/{self.bundle}"

    @property
    def labels(self) -> dict[str, str]:
        return {"app.kubernetes.io/name": self.name, "app.kubernetes.io/part-of": "ilf-deploy"}

    def pod_labels(self, batch: bool) -> dict[str, str]:
        """The pods' labels: the RayService's and the RayJob's apart (each its own budget)."""
        return {**self.labels, "app.kubernetes.io/component": "batch" if batch else "serve"}


def _volume(name: str, claim: str, read_only: bool) -> dict[str, Any]:
    return {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}}


def _pod(k: KubeRay, container: str, head: bool, batch: bool) -> dict[str, Any]:
    """A pod template: the digest check, then the Ray container with the bundle (and batch data)."""
    bundle_mount = {"name": "bundle", "mountPath": MODELS, "readOnly": True}
    mounts = [bundle_mount]
    volumes = [_volume("bundle", k.claim, True)]
    if batch and head:  # the driver runs on the head: it reads the prompts and writes the results
        mounts.append({"name": "data", "mountPath": DATA})
        volumes.append(_volume("data", k.data_claim, False))
    cpus, memory = ("1", "4Gi") if head else (str(k.worker_cpus), k.worker_memory)
    limits = {"memory": memory, **({"nvidia.com/gpu": "1"} if k.gpu and not head else {})}
    ray: dict[str, Any] = {
        "name": container,
        "image": k.image,
        "resources": {"requests": {"cpu": cpus, "memory": memory}, "limits": limits},
        "volumeMounts": mounts,
    }
    ports = {**(PORTS if head else {}), "metrics": METRICS_PORT}
    ray["ports"] = [{"name": n, "containerPort": p} for n, p in ports.items()]
    if k.api_key_secret and not batch:  # app_builder reads the keys where Serve builds it: any pod
        secret = {"name": k.api_key_secret, "key": "ILF_API_KEYS"}
        ray["env"] = [{"name": "ILF_API_KEYS", "valueFrom": {"secretKeyRef": secret}}]
    check = {
        "name": "bundle-digest",
        "image": k.image,
        "command": ["ilf-deploy", "inspect", k.bundle_path, "--digest", k.digest],
        "volumeMounts": [dict(bundle_mount)],
    }
    spec = {"initContainers": [check], "containers": [ray], "volumes": volumes}
    return {
        "metadata": {"labels": k.pod_labels(batch), "annotations": {DIGEST_ANNOTATION: k.digest}},
        "spec": k.cluster.harden(spec, k.gpu and not head),
    }


def cluster_spec(k: KubeRay, batch: bool) -> dict[str, Any]:
    """A RayCluster spec: a head that runs no work (num-cpus 0) and a group of worker pods."""
    workers: dict[str, Any] = {
        "groupName": "workers",
        "replicas": k.workers,
        "minReplicas": k.workers,
        "maxReplicas": max(k.max_workers or k.workers, k.workers),
        "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
        "template": _pod(k, "ray-worker", head=False, batch=batch),
    }
    return {
        "rayVersion": RAY_VERSION,
        "enableInTreeAutoscaling": k.max_workers is not None,
        "headGroupSpec": {
            "rayStartParams": {
                "num-cpus": "0",
                "dashboard-host": "0.0.0.0",
                "metrics-export-port": str(METRICS_PORT),
            },
            "template": _pod(k, "ray-head", head=True, batch=batch),
        },
        "workerGroupSpecs": [workers],
    }


def serve_config(k: KubeRay) -> dict[str, Any]:
    """Ray Serve's config (serveConfigV2): the application `serve --server ray` deploys."""
    args: dict[str, Any] = {"bundle": k.bundle_path, "digest": k.digest, "backend": k.backend}
    if k.autoscale is not None:
        args["autoscale"] = f"{k.autoscale[0]}:{k.autoscale[1]}"
    else:
        args["replicas"] = k.replicas
    application = {
        "name": "ilf",
        "route_prefix": "/",
        "import_path": "ilf_deploy.serving.scale.serve:app_builder",
        "args": args,
    }
    return {"applications": [application]}  # KubeRay's proxies listen on 0.0.0.0:8000


def batch_entrypoint(k: KubeRay) -> str:
    args = ["ilf-deploy", "batch", k.bundle_path, "--prompts", f"{DATA}/{k.prompts}"]
    args += ["--out", f"{DATA}/{k.results}", "--ray-address", "auto", "--actors", str(k.actors)]
    args += ["--backend", k.backend, "--digest", k.digest]
    return shlex.join(args)


def manifests(k: KubeRay) -> dict[str, list[dict[str, Any]]]:
    """File name -> the objects it holds: the RayService with its pods' disruption budget (and
    PodMonitor), the RayJob (and its PodMonitor)."""
    metadata = k.cluster.metadata(k.name, k.labels, annotations={DIGEST_ANNOTATION: k.digest})
    service = {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(k), sort_keys=False),
            "rayClusterConfig": cluster_spec(k, batch=False),
        },
    }
    job = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {**metadata, "name": f"{k.name}-batch"},
        "spec": {
            "entrypoint": batch_entrypoint(k),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": 600,
            "backoffLimit": 2,  # a retried run resumes where the failed one stopped
            "rayClusterSpec": cluster_spec(k, batch=True),
        },
    }
    serve_pods, batch_pods = k.pod_labels(batch=False), k.pod_labels(batch=True)
    return {
        "rayservice.yaml": [
            service,
            k.cluster.disruption_budget(k.name, serve_pods),
            *k.cluster.pod_monitor(k.name, serve_pods, "metrics"),
        ],
        "rayjob.yaml": [job, *k.cluster.pod_monitor(f"{k.name}-batch", batch_pods, "metrics")],
    }


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (serveConfigV2) as YAML block literals, readable in the file."""


def _text(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def write_manifests(directory: str | Path, k: KubeRay, force: bool = False) -> list[Path]:
    """Write every manifest (each file atomically); existing ones are replaced only with `force`."""
    out = Path(directory)
    documents = {out / file: docs for file, docs in manifests(k).items()}
    existing = [path.name for path in documents if path.exists()]
    if existing and not force:
        raise ConfigError(f"{out} already holds {', '.join(existing)}; pass --force to replace them")
    for path, docs in documents.items():
        write_atomic(path, yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False).encode())
    return list(documents)
