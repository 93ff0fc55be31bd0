"""The bundle as a specification: published schemas, the typed manifest, the digest and --digest."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from jsonschema import Draft202012Validator

from ilf_deploy.core.runtime.bundle import DIGEST_FILE, MANIFEST, Bundle, BundleError, rewrite_manifest
from ilf_deploy.core.runtime.manifest import (
    CROSS_KV_SCHEMA_VERSION,
    SCHEMA_VERSION,
    VARIANT_ENGINES,
    Manifest,
)
from ilf_deploy.core.schemas import NAMES, problem, schema

from .test_cli import assert_one_line_error, invoke


def digest_of(path: Path) -> str:
    return "sha256:" + hashlib.sha256((path / MANIFEST).read_bytes()).hexdigest()


@pytest.mark.parametrize("name", NAMES)
def test_published_schemas_are_valid_2020_12_and_printed_by_the_cli(name):
    Draft202012Validator.check_schema(schema(name))
    result = invoke("schema", name)
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == schema(name)
    assert_one_line_error(invoke("schema", "bundle"), "unknown schema 'bundle'")


def test_every_bundle_and_plan_the_suite_builds_follows_the_schemas(tiny_bundles):
    for name, path in tiny_bundles.items():
        raw = json.loads((path / MANIFEST).read_text())  # PixArt's caption K/V segment: 7; DiT: 2
        assert raw["schema_version"] == (SCHEMA_VERSION if name == "dit" else CROSS_KV_SCHEMA_VERSION)
        assert problem("manifest", raw) is None
        for plan_file in raw["plans"].values():
            assert problem("plan", json.loads((path / plan_file).read_text())) is None, plan_file
        parsed = Manifest.parse(raw)  # and the typed manifest round-trips every segment
        assert {n: s.to_dict() for n, s in parsed.segments.items()} == raw["segments"]


def test_the_digest_is_the_manifests_sha256_and_inspect_prints_it(tiny_bundles):
    path = tiny_bundles["dit"]
    bundle = Bundle.load(path)
    assert bundle.digest == digest_of(path) == (path / DIGEST_FILE).read_text().strip()
    result = invoke("inspect", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["digest"] == bundle.digest
    assert bundle.digest in invoke("inspect", path).output


def _edit_manifest_field(path: Path) -> None:  # the issue's `sed`: a field that is not a hash
    text = (path / MANIFEST).read_text()
    assert '"max_length": 120' in text
    (path / MANIFEST).write_text(text.replace('"max_length": 120', '"max_length": 920'))


def _append(relative: str):
    def edit(path: Path) -> None:
        with (path / relative).open("ab") as f:
            f.write(b" ")

    return edit


EDITS = {
    "manifest field": (_edit_manifest_field, "does not match the bundle's digest"),
    "plan": (_append("plans/ilf-4.json"), "plans/ilf-4.json does not match its sha256"),
    "onnx": (_append("onnx/final.onnx"), "onnx/final.onnx does not match its sha256"),
    "tokenizer": (_append("tokenizer/tokenizer.json"), "tokenizer/tokenizer.json does not match its sha256"),
}


@pytest.fixture(scope="module")
def edited(tiny_bundles, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edited")
    bundles = {}
    for kind, (edit, _) in EDITS.items():
        path = shutil.copytree(tiny_bundles["pixart-alpha"], root / kind.replace(" ", "_"))
        edit(path)
        bundles[kind] = path
    return bundles


@pytest.mark.parametrize("kind", EDITS)
def test_every_kind_of_edit_is_refused_in_one_line_by_every_command(edited, tmp_path, kind):
    path, message = edited[kind], EDITS[kind][1]
    with pytest.raises(BundleError, match=message):
        Bundle.load(path)
    commands = {
        "generate": ["generate", path, "--prompt", "a red circle", "--out", tmp_path / "x.png"],
        "serve": ["serve", path, "--port", "0"],
        "verify": ["verify", path],
        "export-triton": ["export-triton", path, "--out", tmp_path / "repo"],
    }
    for args in commands.values():
        assert_one_line_error(invoke(*args), message)
    assert not (tmp_path / "x.png").exists() and not (tmp_path / "repo").exists()


def test_a_pinned_digest_passes_and_another_is_refused(tiny_bundles, tmp_path):
    path = tiny_bundles["dit"]
    right, wrong = digest_of(path), "sha256:" + "0" * 64
    out = tmp_path / "x.png"
    result = invoke("generate", path, "--class-label", 1, "--plan", "base-4", "--out", out, "--digest", right)
    assert result.exit_code == 0, result.output
    assert out.is_file()
    assert invoke("inspect", path, "--digest", right).exit_code == 0
    for args in (
        ["generate", path, "--class-label", 1, "--out", tmp_path / "y.png"],
        ["serve", path, "--port", "0"],
        ["verify", path],
        ["export-triton", path, "--out", tmp_path / "repo"],
        ["inspect", path],
        ["bench", path, "--runs", 1],
        ["eval", path, "--n", 2],
        ["calibrate", path],
        ["quantize", path, "--mode", "int8-dynamic"],
        ["build-engines", path],
        ["tune", path],
        ["verify-variant", path, "--variant", "int8_dynamic"],
    ):
        assert_one_line_error(invoke(*args, "--digest", wrong), f"not the pinned --digest {wrong}")
    assert_one_line_error(invoke("inspect", path, "--digest", "abc"), "--digest must look like sha256:")
    assert not (tmp_path / "y.png").exists()


def test_triton_models_and_kubernetes_manifests_carry_the_digest(tiny_bundles, tmp_path):
    import yaml

    path = tiny_bundles["dit"]
    k8s = tmp_path / "k8s"
    result = invoke("export-triton", path, "--out", tmp_path / "repo", "--copy-bundle", "--k8s", k8s)
    assert result.exit_code == 0, result.output
    config = (tmp_path / "repo" / "ilf" / "config.pbtxt").read_text()
    assert f'key: "digest" value {{ string_value: "{digest_of(path)}" }}' in config
    deployment = next(yaml.safe_load_all((k8s / "triton.yaml").read_text()))
    template = deployment["spec"]["template"]
    assert template["metadata"]["annotations"]["ilf-deploy.dev/bundle-digest"] == digest_of(path)
    check = template["spec"]["initContainers"][0]["command"]
    assert check == ["ilf-deploy", "inspect", "/models/ilf/1/bundle", "--digest", digest_of(path)]


def test_versions_and_a_missing_digest_file_are_refused(tiny_bundles, tmp_path):
    future = shutil.copytree(tiny_bundles["dit"], tmp_path / "future")
    manifest = json.loads((future / MANIFEST).read_text())
    (future / MANIFEST).write_text(json.dumps({**manifest, "schema_version": 1}))
    with pytest.raises(BundleError, match="schema version 1 is not supported"):
        Bundle.load(future)
    unpinned = shutil.copytree(tiny_bundles["dit"], tmp_path / "unpinned")
    (unpinned / DIGEST_FILE).unlink()
    with pytest.raises(BundleError, match=f"{DIGEST_FILE} is missing"):
        Bundle.load(unpinned)


def test_a_rewrite_refuses_an_edited_manifest_and_validates_what_it_writes(tiny_bundles, tmp_path):
    edited = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "edited")
    _edit_manifest_field(edited)
    with pytest.raises(BundleError, match="digest"):
        rewrite_manifest(edited, lambda m: None)  # calibrate/quantize must not bless an edit
    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "ok")
    before = digest_of(path)
    with pytest.raises(BundleError, match="at max_batch"):
        rewrite_manifest(path, lambda m: m.update(max_batch=0))
    assert digest_of(path) == before and Bundle.load(path).digest == before  # nothing written

    def unlisted(manifest: dict) -> None:
        manifest["segments"]["final"]["file"] = "onnx/elsewhere.onnx"

    with pytest.raises(BundleError, match=r"names onnx/elsewhere\.onnx but does not list its sha256"):
        rewrite_manifest(path, unlisted)


def test_schema_errors_name_the_field(tiny_bundles):
    raw = json.loads((tiny_bundles["dit"] / MANIFEST).read_text())
    raw["segments"]["final"]["inputs"][0]["shape"] = "wide"
    with pytest.raises(BundleError, match="at segments/final/inputs/0/shape"):
        Manifest.parse(raw)
    raw = json.loads((tiny_bundles["dit"] / MANIFEST).read_text())
    raw["surprise"] = 1  # closed: a new field is a new schema_version
    with pytest.raises(BundleError, match="surprise"):
        Manifest.parse(raw)


def test_a_variants_engines_are_decided_by_its_mode_alone():
    from ilf_deploy.build.quantization.quantize import MODES

    assert set(VARIANT_ENGINES) == set(MODES)
    modes = schema("manifest")["$defs"]["variant"]["properties"]["mode"]["enum"]
    assert set(modes) == set(MODES)
    assert VARIANT_ENGINES["int8-ov"] == ("openvino",)
    assert VARIANT_ENGINES["int8-dynamic"] == ("onnxruntime",)


def test_a_bf16_variant_and_only_it_makes_a_manifest_version_3(tiny_bundles, tmp_path):
    """Writers write the oldest version that says what the file holds: 3 with a bf16 variant (the
    C++ runtime, which reads 2, refuses it in one line), 2 again once it is gone; 2 cannot hold one."""
    from ilf_deploy.core.runtime.manifest import BF16_SCHEMA_VERSION, SCHEMA_VERSIONS

    path = shutil.copytree(tiny_bundles["dit"], tmp_path / "bundle")  # a version 2 bundle
    bundle = Bundle.load(path)
    first = bundle.manifest.reduced_precision_segments[0]
    entry = {
        "mode": "bf16",
        "segments": {first: bundle.segment_spec(first).to_dict()},  # the bundle's own file
        "quantized_layers": {},
        "calibration": None,
        "tools": {},
        "precision_policy": {"plan": "ilf-4", "f32": {}},
    }
    rewrite_manifest(path, lambda m: m.setdefault("variants", {}).update(bf16=entry))
    raw = json.loads((path / MANIFEST).read_text())
    assert raw["schema_version"] == BF16_SCHEMA_VERSION == 3 and SCHEMA_VERSIONS == (2, 3, 4, 5, 6, 7)
    assert problem("manifest", raw) is None
    assert Bundle.load(path).variant_spec("bf16").precision_policy["plan"] == "ilf-4"
    with pytest.raises(BundleError, match="at variants/bf16"):  # version 2 cannot say "bf16"
        Manifest.parse({**raw, "schema_version": 2})
    for field, value in (("precision_policy", {"plan": "x"}), ("mode", "bf32")):
        broken = json.loads(json.dumps(raw))
        broken["variants"]["bf16"][field] = value
        assert problem("manifest", broken) is not None, field
    ilf_run = Path(sys.executable).parent / "ilf-run"
    if ilf_run.is_file():  # the C++ runtime reads 2: one line, non-zero
        result = subprocess.run([str(ilf_run), str(path), "--prompt", "x"], capture_output=True, text=True)
        assert result.returncode != 0 and "schema version 3 is not supported" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr

    rewrite_manifest(path, lambda m: m["variants"].pop("bf16"))
    assert json.loads((path / MANIFEST).read_text())["schema_version"] == SCHEMA_VERSION == 2
    other = {k: v for k, v in entry.items() if k != "precision_policy"}
    other.update(mode="int8-qdq", quantized_layers={first: 0})  # any other variant: still 2
    rewrite_manifest(path, lambda m: m["variants"].update(other=other))
    assert json.loads((path / MANIFEST).read_text())["schema_version"] == 2
