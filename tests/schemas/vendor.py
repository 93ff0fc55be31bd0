"""Regenerate the vendored CRD schemas (tests/schemas/README.md) from checkouts of their repositories:

    python tests/schemas/vendor.py KSERVE_CHECKOUT KUBERAY_CHECKOUT PROMETHEUS_OPERATOR_CHECKOUT

Each file is the `openAPIV3Schema` of the CRD version our exporters write, as upstream has it, less
`status` (the controllers write it, we never do), `description`s (they do not validate) and the
properties in PRUNED (features our exporters do not use: removing a property makes the strict
validation refuse it, so a pruned schema is stricter than upstream's, never looser).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
# file -> (upstream repository, path in it, version)
SOURCES = {
    "inferenceservice.json": (
        "kserve/kserve", "config/crd/full/serving.kserve.io_inferenceservices.yaml", "v1beta1"
    ),
    "rayservice.json": ("ray-project/kuberay", "ray-operator/config/crd/bases/ray.io_rayservices.yaml", "v1"),
    "rayjob.json": ("ray-project/kuberay", "ray-operator/config/crd/bases/ray.io_rayjobs.yaml", "v1"),
    "podmonitor.json": (
        "prometheus-operator/prometheus-operator",
        "example/prometheus-operator-crd/monitoring.coreos.com_podmonitors.yaml", "v1",
    ),
}  # fmt: skip
PRUNED = {  # file -> property paths (from the schema's root) removed
    "inferenceservice.json": [
        "spec.explainer", "spec.transformer", "spec.canary", "spec.predictor.workerSpec",
        *(f"spec.predictor.{framework}" for framework in (
            "model", "huggingface", "lightgbm", "onnx", "paddle", "pmml", "pytorch", "sklearn",
            "tensorflow", "triton", "xgboost",
        )),
    ],
    "rayservice.json": [],
    "rayjob.json": ["spec.submitterPodTemplate"],
    "podmonitor.json": [],
}  # fmt: skip


def without_descriptions(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: without_descriptions(v) for k, v in node.items() if k != "description"}
    if isinstance(node, list):
        return [without_descriptions(v) for v in node]
    return node


def trimmed(crd: dict[str, Any], version: str, pruned: list[str]) -> dict[str, Any]:
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = without_descriptions(served["schema"]["openAPIV3Schema"])
    del schema["properties"]["status"]
    for path in pruned:
        *parents, leaf = path.split(".")
        node = schema
        for key in parents:
            node = node["properties"][key]
        del node["properties"][leaf]
    return schema


def main() -> None:
    repositories = ("kserve/kserve", "ray-project/kuberay", "prometheus-operator/prometheus-operator")
    checkouts = {repo: Path(path) for repo, path in zip(repositories, sys.argv[1:4], strict=True)}
    for file, (repo, path, version) in SOURCES.items():
        git = ["git", "-C", str(checkouts[repo])]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True)
        text = subprocess.run(
            [*git, "show", f"HEAD:{path}"], check=True, capture_output=True, text=True
        ).stdout
        schema = trimmed(yaml.load(text, Loader=yaml.CSafeLoader), version, PRUNED[file])
        schema["x-vendored-from"] = {"repository": repo, "path": path, "commit": commit.stdout.strip(),
                                     "version": version, "pruned": PRUNED[file]}  # fmt: skip
        (HERE / file).write_text(json.dumps(schema, separators=(",", ":"), sort_keys=True) + "\n")
        print(f"{file}: {repo} {path}@{commit.stdout.strip()[:12]} {version}")


if __name__ == "__main__":
    main()
