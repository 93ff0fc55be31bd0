"""The Kubernetes exporters' manifests are fit to apply (issue: "Manifests fit to apply"), one test per
check: images by digest when built here, pulled if absent; hardened pods; resources on every container;
/dev/shm for Triton; GPU placement; a PodDisruptionBudget; a PodMonitor on request; one namespace; one
claim and bundle path across exporters; names refused, never rewritten; KEDA's Prometheus address and a
query scoped to the service. Every object that the kubernetes client models is loaded into them
strictly (unknown or mistyped fields are errors); the CRDs' pod templates likewise, and the KServe and
KubeRay resources (and the Prometheus Operator's PodMonitors) validate against those CRDs' own schemas
(tests/schemas, vendored from upstream: its README), strictly: an unknown field is an error, as in
`kubectl apply` (strict field validation)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.cli import app
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.model.tiny import make_tiny_pipeline
from tests.test_triton import strict_model

MODELS = {  # kind -> the kubernetes client's model
    "Deployment": "V1Deployment",
    "Service": "V1Service",
    "HorizontalPodAutoscaler": "V2HorizontalPodAutoscaler",
    "PodDisruptionBudget": "V1PodDisruptionBudget",
}
DIGEST = "sha256:" + "ab" * 32
SCHEMAS = Path(__file__).parent / "schemas"
CRDS = {  # (apiVersion, kind) -> the CRD's schema, vendored (tests/schemas/README.md)
    ("serving.kserve.io/v1beta1", "InferenceService"): "inferenceservice.json",
    ("ray.io/v1", "RayService"): "rayservice.json",
    ("ray.io/v1", "RayJob"): "rayjob.json",
    ("monitoring.coreos.com/v1", "PodMonitor"): "podmonitor.json",
}


def invoke(*args: Any):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("manifests")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=2)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-2",), copy_model=False))


def export(bundle: Path, out: Path, *args: Any) -> dict[str, list[dict]]:
    """export-triton --k8s and export-kuberay (over the Triton repository's copy of the bundle) into
    `out`; file name -> its objects."""
    triton = invoke("export-triton", bundle, "--out", out / "repo", "--copy-bundle", "--k8s", out, *args)
    assert triton.exit_code == 0, triton.output
    ray_args = [a for a in args if a not in ("--kind", "gpu")]
    ray = invoke("export-kuberay", bundle, "--out", out, "--bundle-path", "ilf/1/bundle", *ray_args)
    assert ray.exit_code == 0, ray.output
    return {f.name: list(yaml.safe_load_all(f.read_text())) for f in sorted(out.glob("*.yaml"))}


@pytest.fixture(scope="module")
def written(bundle, tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("k8s")
    return export(bundle, out, "--namespace", "ml", "--kind", "gpu", "--node-selector", "pool=gpu",
                  "--toleration", "dedicated=ml:NoSchedule")  # fmt: skip


def pods(files: dict[str, list[dict]]) -> list[tuple[str, dict]]:
    """(where, pod spec) of every pod template the files describe."""
    found = []
    for file, objects in files.items():
        for o in objects:
            spec = o.get("spec", {})
            if o["kind"] == "Deployment":
                found.append((f"{file}:{o['kind']}", spec["template"]["spec"]))
            elif o["kind"] == "InferenceService":
                predictor = spec["predictor"]
                found.append((f"{file}:{o['kind']}", {k: v for k, v in predictor.items() if "eplicas" not in k
                                                         and k != "autoScaling"}))  # fmt: skip
            elif o["kind"] in ("RayService", "RayJob"):
                cluster = spec.get("rayClusterConfig") or spec["rayClusterSpec"]
                for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
                    found.append((f"{file}:{o['kind']}", group["template"]["spec"]))
    assert len(found) == 6, [w for w, _ in found]  # Deployment, InferenceService, 2 x (head, workers)
    return found


def strict_schema(node: Any, path: str = "") -> Any:
    """A CRD's structural schema as the API server's strict field validation applies it: an object
    takes only its `properties` unless it says `additionalProperties` or
    `x-kubernetes-preserve-unknown-fields`; an int-or-string is an integer or a string. The root's
    `metadata` is the API server's ObjectMeta (checked against the kubernetes client's model)."""
    if isinstance(node, list):
        return [strict_schema(item, path) for item in node]
    if not isinstance(node, dict):
        return node
    strict = {key: strict_schema(value, f"{path}/{key}") for key, value in node.items()}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in node:
        strict["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    unknown_allowed = "additionalProperties" in node or node.get("x-kubernetes-preserve-unknown-fields")
    if node.get("type") == "object" and not unknown_allowed and path != "/properties/metadata":
        strict["additionalProperties"] = False
    return strict


def crd_validator(api_version: str, kind: str) -> jsonschema.Draft202012Validator:
    schema = json.loads((SCHEMAS / CRDS[(api_version, kind)]).read_text())
    schema.pop("x-vendored-from")
    return jsonschema.Draft202012Validator(strict_schema(schema))


def crd_errors(o: dict) -> list[str]:
    """What the object's CRD schema refuses in it, one line each (path: message)."""
    errors = crd_validator(o["apiVersion"], o["kind"]).iter_errors(o)
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '$'}: {e.message}" for e in errors]


def containers(spec: dict) -> list[dict]:
    return [*spec.get("initContainers", []), *spec["containers"]]


def test_every_object_validates_strictly(written):
    kinds = []
    for objects in written.values():
        for o in objects:
            kinds.append(o["kind"])
            if o["kind"] in MODELS:
                strict_model(MODELS[o["kind"]], o)
            else:
                strict_model("V1ObjectMeta", o["metadata"])
    for where, spec in pods(written):
        strict_model("V1PodSpec", spec), where
    for objects in written.values():
        for o in objects:
            if (o["apiVersion"], o["kind"]) in CRDS:
                assert not crd_errors(o), (o["kind"], crd_errors(o))
    assert sorted(kinds) == sorted(
        ["Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "InferenceService",
         "PodDisruptionBudget", "RayService", "PodDisruptionBudget", "RayJob"]
    )  # fmt: skip


def test_every_option_s_manifests_validate_against_the_crds(bundle, tmp_path):
    """The optional fields too: KubeRay's autoscaler, Serve's, an API key Secret, GPUs, PodMonitors."""
    triton = invoke("export-triton", bundle, "--out", tmp_path / "repo", "--copy-bundle", "--k8s", tmp_path,
                    "--replicas", "2", "--max-replicas", "5", "--pod-monitor", "--prometheus", "http://prom:9090",
                    "--kind", "gpu", "--toleration", "spot:NoExecute")  # fmt: skip
    assert triton.exit_code == 0, triton.output
    ray = invoke("export-kuberay", bundle, "--out", tmp_path, "--bundle-path", "ilf/1/bundle", "--gpu",
                 "--max-workers", "6", "--autoscale", "1:3", "--api-key-secret", "ilf-keys",
                 "--pod-monitor")  # fmt: skip
    assert ray.exit_code == 0, ray.output
    checked = []
    for file in sorted(tmp_path.glob("*.yaml")):
        for o in yaml.safe_load_all(file.read_text()):
            if (o["apiVersion"], o["kind"]) in CRDS:
                assert not crd_errors(o), (file.name, crd_errors(o))
                checked.append(o["kind"])
    assert sorted(checked) == ["InferenceService", *["PodMonitor"] * 4, "RayJob", "RayService"]


def test_the_crd_schemas_refuse_unknown_pruned_and_mistyped_fields(written):
    """The strict validation can fail: what the API server would refuse, it refuses."""
    (service, *_) = written["rayservice.yaml"]
    (inference, *_) = written["kserve.yaml"]
    (job, *_) = written["rayjob.yaml"]
    edits = [
        (service, ["spec", "rayClusterConfig", "headGroupSpec", "template", "spec", "containers", 0],
         "imagePolicy", "Always", "Additional properties are not allowed ('imagePolicy'"),
        (service, ["spec", "rayClusterConfig", "workerGroupSpecs", 0], "replicas", "two",
         "is not of type 'integer'"),
        (job, ["spec"], "submitterPodTemplate", {}, "Additional properties"),  # pruned: we never write it
        (inference, ["spec", "predictor"], "sklearn", {"storageUri": "s3://x"}, "Additional properties"),
        (inference, ["spec", "predictor", "autoScaling", "metrics", 0, "external", "metric"], "backend",
         "prom", "'prom' is not one of ['prometheus', 'graphite']"),
        (inference, ["spec", "predictor", "containers", 0, "resources", "limits"], "memory", "8 GB",
         "does not match"),
    ]  # fmt: skip
    for o, path, key, value, message in edits:
        edited = copy.deepcopy(o)
        node = edited
        for step in path:
            node = node[step]
        node[key] = value
        errors = crd_errors(edited)
        assert any(message in e for e in errors), (o["kind"], key, errors)


def test_the_crd_rules_not_checked_here_are_on_fields_we_never_write(written):
    """The CRDs' CEL rules (x-kubernetes-validations) are not evaluated by jsonschema: every one sits
    on a field our manifests leave out, so none can refuse them."""
    rules: dict[str, list[list[str]]] = {}

    def walk(node: Any, path: list[str], file: str) -> None:
        if isinstance(node, dict):
            if "x-kubernetes-validations" in node:
                rules.setdefault(file, []).append(path)
            for key, child in node.get("properties", {}).items():
                walk(child, [*path, key], file)
            if "items" in node:
                walk(node["items"], [*path, "*"], file)

    for file in CRDS.values():
        walk(json.loads((SCHEMAS / file).read_text()), [], file)
    assert rules, "the vendored CRDs have CEL rules: this test looks at them"

    def present(value: Any, path: list[str]) -> bool:
        if not path:
            return True
        if path[0] == "*":
            return isinstance(value, list) and any(present(v, path[1:]) for v in value)
        return isinstance(value, dict) and path[0] in value and present(value[path[0]], path[1:])

    for objects in written.values():
        for o in objects:
            for path in rules.get(CRDS.get((o["apiVersion"], o["kind"]), ""), []):
                assert not present(o, path), (o["kind"], ".".join(path))


def test_images_by_digest_when_built_here_and_pulled_only_if_absent(bundle, tmp_path, monkeypatch):
    images = tmp_path / "out" / "images"
    images.mkdir(parents=True)
    table = {name: {"reference": f"{name}@{DIGEST}"} for name in ("ilf-deploy-triton", "ilf-deploy-ray")}
    (images / "images.json").write_text(json.dumps(table))
    monkeypatch.chdir(tmp_path)  # `make images` wrote out/images/images.json here
    files = export(bundle, tmp_path / "k8s")
    for where, spec in pods(files):
        for container in containers(spec):
            assert container["image"].endswith(f"@{DIGEST}"), where
            assert container["imagePullPolicy"] == "IfNotPresent", where
    (images / "images.json").unlink()  # nothing built here: a versioned tag, never :latest
    for _, spec in pods(export(bundle, tmp_path / "k8s-2")):
        for container in containers(spec):
            assert container["image"].endswith(":0.1.0") and container["imagePullPolicy"] == "IfNotPresent"


def test_pods_run_non_root_read_only_without_capabilities(written):
    for where, spec in pods(written):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] == 10001, where
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, where
        for container in containers(spec):
            context = container["securityContext"]
            assert context["readOnlyRootFilesystem"] is True, where
            assert context["allowPrivilegeEscalation"] is False, where
            assert context["capabilities"] == {"drop": ["ALL"]}, where
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert tmp and any(v["name"] == tmp[0]["name"] and "emptyDir" in v for v in spec["volumes"]), (
                where
            )


def test_every_container_has_resources_init_containers_too(written):
    for where, spec in pods(written):
        assert spec["initContainers"], where
        for container in containers(spec):
            resources = container["resources"]
            assert resources["requests"]["cpu"] and resources["requests"]["memory"], (
                where,
                container["name"],
            )
            assert resources["limits"]["memory"], (where, container["name"])


def test_triton_pods_have_a_memory_backed_dev_shm(written):
    for where, spec in pods(written):
        if "Ray" in where:
            continue
        volumes = {v["name"]: v for v in spec["volumes"]}
        (main,) = spec["containers"]
        (shm,) = [m for m in main["volumeMounts"] if m["mountPath"] == "/dev/shm"]
        assert volumes[shm["name"]]["emptyDir"]["medium"] == "Memory", where


def test_gpu_pods_tolerate_the_gpu_taint_and_follow_the_placement_options(written, bundle, tmp_path):
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    given = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    for where, spec in pods(written):
        assert spec["nodeSelector"] == {"pool": "gpu"}, where
        assert given in spec["tolerations"], where
        has_gpu = any("nvidia.com/gpu" in c["resources"]["limits"] for c in spec["containers"])
        assert (gpu in spec["tolerations"]) == has_gpu, where
    bad = invoke("export-kuberay", bundle, "--out", tmp_path / "x", "--toleration", "dedicated=ml")
    assert bad.exit_code == 2 and "KEY[=VALUE]:EFFECT" in bad.output and len(bad.output.splitlines()) == 1


def test_a_disruption_budget_covers_the_serving_pods(written):
    for file, objects in written.items():
        budgets = [o for o in objects if o["kind"] == "PodDisruptionBudget"]
        if file == "rayjob.yaml":
            assert not budgets  # a batch job resumes: no budget to hold a drain
            continue
        (budget,) = budgets
        assert budget["spec"]["maxUnavailable"] == 1
        selector = budget["spec"]["selector"]["matchLabels"]
        workload = objects[0]
        if workload["kind"] == "Deployment":
            labels = workload["spec"]["template"]["metadata"]["labels"]
        elif workload["kind"] == "RayService":
            labels = workload["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"]["labels"]
        else:  # KServe labels its pods with the InferenceService's name
            labels = {"serving.kserve.io/inferenceservice": workload["metadata"]["name"]}
        assert selector.items() <= labels.items(), file


def test_a_pod_monitor_on_request_scrapes_a_named_port(bundle, tmp_path, written):
    assert not [o for objects in written.values() for o in objects if o["kind"] == "PodMonitor"]
    files = export(bundle, tmp_path, "--pod-monitor")
    monitors = [o for objects in files.values() for o in objects if o["kind"] == "PodMonitor"]
    assert len(monitors) == 4  # Triton, KServe, RayService, RayJob
    ports = {p["name"] for _, spec in pods(files) for c in spec["containers"] for p in c.get("ports", [])}
    for monitor in monitors:
        strict_model("V1ObjectMeta", monitor["metadata"])
        strict_model("V1LabelSelector", monitor["spec"]["selector"])
        (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
        assert endpoint["port"] in ports and endpoint["path"] == "/metrics"


def test_one_namespace_for_every_object_and_a_bad_one_refused(written, bundle, tmp_path):
    for objects in written.values():
        for o in objects:
            assert o["metadata"]["namespace"] == "ml", o["kind"]
    bad = invoke("export-kuberay", bundle, "--out", tmp_path / "x", "--namespace", "ML_team")
    assert bad.exit_code == 2 and "--namespace 'ML_team'" in bad.output and len(bad.output.splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_one_claim_and_one_bundle_path_across_exporters(written, bundle):
    digest = Bundle.load(bundle).digest
    claims, checked = set(), set()
    for _, spec in pods(written):
        (main, *_) = spec["containers"]
        (models,) = [m["name"] for m in main["volumeMounts"] if m["mountPath"] == "/models"]
        claims |= {v["persistentVolumeClaim"]["claimName"] for v in spec["volumes"] if v["name"] == models}
        (check,) = spec["initContainers"]
        assert check["command"][:2] == ["ilf-deploy", "inspect"] and check["command"][-1] == digest
        checked.add(check["command"][2])
    assert claims == {"ilf-models"} and checked == {"/models/ilf/1/bundle"}


@pytest.mark.parametrize("command", ["export-triton", "export-kuberay"])
def test_a_bad_name_is_refused_in_one_line_not_rewritten(command, bundle, tmp_path):
    extra = ("--copy-bundle", "--k8s", tmp_path / "k8s") if command == "export-triton" else ()
    result = invoke(command, bundle, "--out", tmp_path / "out", "--name", "Bad_Name", *extra)
    assert result.exit_code == 2 and "--name 'Bad_Name'" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert not (tmp_path / "out").exists() and not (tmp_path / "k8s").exists()  # nothing half-written


def test_kserve_autoscaling_names_prometheus_and_counts_only_this_service(written):
    (service, *_) = written["kserve.yaml"]
    (metric,) = service["spec"]["predictor"]["autoScaling"]["metrics"]
    source = metric["external"]["metric"]
    assert source["backend"] == "prometheus" and source["serverAddress"].startswith("http")
    scope = 'namespace="ml",pod=~"ilf-predictor-.*"'
    assert source["query"].count(scope) == 2, source["query"]  # both series, this service's pods only


def test_export_kuberay_replaces_manifests_only_with_force(bundle, tmp_path):
    out = tmp_path / "k"
    assert invoke("export-kuberay", bundle, "--out", out).exit_code == 0
    one_replica = (out / "rayservice.yaml").read_text()
    (out / "rayjob.yaml").write_text("# edited by hand\n")
    again = invoke("export-kuberay", bundle, "--out", out, "--replicas", "3")
    assert again.exit_code == 2 and "--force" in again.output and len(again.output.splitlines()) == 1
    assert (out / "rayjob.yaml").read_text() == "# edited by hand\n"  # nothing was written
    forced = invoke("export-kuberay", bundle, "--out", out, "--replicas", "3", "--force")
    assert forced.exit_code == 0, forced.output
    assert (out / "rayservice.yaml").read_text() != one_replica  # --replicas 3 is in it now
    assert (out / "rayjob.yaml").read_text() != "# edited by hand\n"
