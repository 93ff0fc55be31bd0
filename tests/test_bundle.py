"""Bundles: build, verify, ONNX Runtime generation, integrity checks, atomic builds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from ilf_deploy.build.export import build as build_module
from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.checks.verify.bundle import verify_bundle
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.plan import baseline_plan
from ilf_deploy.core.runtime.bundle import Bundle, BundleError
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.core.runtime.manifest import CROSS_KV_SCHEMA_VERSION
from ilf_deploy.core.runtime.pipeline import BundleGenerator
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.engines.backends.plans import resolve_bundle_plan

VARIANTS = ["pixart-alpha", "pixart-alpha-1024", "pixart-sigma", "dit"]
REQUEST = Request(prompt="a red circle at the top left", negative_prompt="blurry", class_label=5, seed=2)


def relative_l2(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_onnxruntime_matches_torch_for_every_plan(tiny_bundles, variant):
    ort = open_generator(tiny_bundles[variant])
    torch_gen = open_generator(tiny_bundles[variant], backend="torch")
    assert isinstance(ort, BundleGenerator)
    for name in ort.bundle.plan_names:
        plan = ort.bundle.plan(name)
        got = ort.generate_latents(plan, REQUEST)
        want = torch_gen.generate_latents(plan, REQUEST).numpy()
        assert relative_l2(got, want) < 1e-4, name
    images = ort.decode(got)
    assert images.dtype == np.uint8 and images.shape[-1] == 3


@pytest.mark.parametrize("variant", ["pixart-sigma", "dit"])
def test_verify_passes_and_covers_every_segment(tiny_bundles, variant):
    bundle = Bundle.load(tiny_bundles[variant])
    checks = verify_bundle(bundle, REQUEST)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    kinds = {(c.label, c.name) for c in checks}
    for segment in bundle.manifest.segments:
        assert ("segment (random)", segment) in kinds
        assert ("segment (trajectory)", segment) in kinds
    assert {name for kind, name in kinds if kind == "end-to-end"} == set(bundle.plan_names)


def test_fp16_bundle_verifies_within_its_budget(tiny_dirs, tmp_path):
    path = build_bundle(
        tiny_dirs["pixart-alpha"], tmp_path / "b16", BuildOptions(plans=("ilf-4",), precision="fp16")
    )
    bundle = Bundle.load(path)
    dtypes = {i.dtype for s in bundle.manifest.segments.values() for i in s.inputs if i.name == "hidden"}
    assert dtypes == {"float16"}
    checks = verify_bundle(bundle, REQUEST)
    assert all(c.ok for c in checks)
    assert max(c.rel_l2 for c in checks if c.kind == "end-to-end") > 1e-6  # really ran in half precision


def test_manifest_describes_the_bundle(tiny_bundles):
    bundle = Bundle.load(tiny_bundles["pixart-alpha"])
    m = bundle.manifest
    assert bundle.manifest_json()["schema_version"] == CROSS_KV_SCHEMA_VERSION  # its `cross_kv` segment
    assert m.architecture == "pixart-alpha" and len(m.config_hash) == 64
    assert set(m.plans) == {"base-4", "ilf-4", "cache-6"}
    assert m.cut_points[0] == 0 and m.cut_points[-1] == m.model.num_blocks
    for name, spec in m.segments.items():
        assert spec.file in m.files, name
        assert spec.inputs and spec.outputs
        for value in spec.inputs + spec.outputs:
            assert value.name and value.dtype and isinstance(value.shape, tuple)
    hidden = next(i for i in m.segments["embed"].outputs if i.name == "hidden")
    assert hidden.shape[:2] == ("batch", "tokens")  # dynamic batch and image tokens
    assert {"onnx", "onnxruntime", "torch"} <= set(m.tools)


def test_batched_requests_equal_single_requests(tiny_bundles):
    generator = open_generator(tiny_bundles["pixart-alpha"])
    plan = generator.bundle.plan("ilf-4")
    requests = [
        Request(prompt="a red circle", seed=1, guidance_scale=4.5),
        Request(prompt="a blue square", seed=2, guidance_scale=2.0),
    ]
    batch = generator.generate_batch(plan, requests)
    for i, request in enumerate(requests):
        assert relative_l2(batch[i : i + 1], generator.generate_latents(plan, request)) < 1e-5


def test_corrupted_bundles_are_refused(tiny_bundles, tmp_path):
    source = tiny_bundles["dit"]
    edited = shutil.copytree(source, tmp_path / "edited")
    with (edited / "onnx" / "final.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        Bundle.load(edited)
    missing = shutil.copytree(source, tmp_path / "missing")
    (missing / "plans" / "ilf-4.json").unlink()
    with pytest.raises(BundleError, match="missing"):
        Bundle.load(missing)
    future = shutil.copytree(source, tmp_path / "future")
    manifest = json.loads((future / "manifest.json").read_text())
    manifest["schema_version"] = 99
    (future / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="schema version 99"):
        Bundle.load(future)
    with pytest.raises(BundleError, match="not a bundle"):
        Bundle.load(tmp_path)


def test_interrupted_build_leaves_nothing_behind(tiny_dirs, tmp_path, monkeypatch):
    calls = []
    real_export = build_module.export_segment

    def failing_export(*args, **kwargs):
        calls.append(args[2])
        if len(calls) == 4:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C mid-export
        return real_export(*args, **kwargs)

    monkeypatch.setattr(build_module, "export_segment", failing_export)
    with pytest.raises(KeyboardInterrupt):
        build_bundle(tiny_dirs["dit"], tmp_path / "bundle", BuildOptions(plans=("base-2",)))
    assert len(calls) == 4
    assert list(tmp_path.iterdir()) == []  # no bundle, no temporary directory


def test_existing_bundle_is_kept_unless_forced(tiny_dirs, tiny_bundles, tmp_path):
    target = shutil.copytree(tiny_bundles["dit"], tmp_path / "bundle")
    with pytest.raises(ConfigError, match="--force"):
        build_bundle(tiny_dirs["dit"], target, BuildOptions(plans=("base-2",)))
    assert Bundle.load(target).plan_names == ["base-4", "ilf-4", "cache-6"]
    build_bundle(tiny_dirs["dit"], target, BuildOptions(plans=("base-2",), force=True))
    assert Bundle.load(target).plan_names == ["base-2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle"]


def test_build_input_errors(tiny_dirs, tmp_path):
    with pytest.raises(ConfigError, match="precision"):
        build_bundle(tiny_dirs["dit"], tmp_path / "b", BuildOptions(precision="int3"))
    with pytest.raises(ConfigError, match="multiples"):
        build_bundle(tiny_dirs["dit"], tmp_path / "b", BuildOptions(resolutions=[(30, 30)]))
    with pytest.raises(ConfigError, match="full pipeline"):
        build_bundle(tiny_dirs["dit"] / "transformer", tmp_path / "b")
    with pytest.raises(ConfigError, match="unknown plan"):
        build_bundle(tiny_dirs["dit"], tmp_path / "b", BuildOptions(plans=("warp-9",)))
    assert not (tmp_path / "b").exists()


def test_plans_and_sizes_outside_the_bundle_are_refused(tiny_bundles, tmp_path):
    generator = open_generator(tiny_bundles["pixart-sigma"])
    with pytest.raises(BundleError, match="not in this bundle"):
        generator.bundle.plan("base-20")
    odd = tmp_path / "odd.json"
    plan = baseline_plan(3, 6)
    data = plan.to_dict()
    data["steps"][0]["ops"] = [{"op": "blocks", "start": 0, "end": 2}, {"op": "blocks", "start": 3, "end": 5}]
    odd.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="no segment boundary"):  # the one resolver reads plan files
        resolve_bundle_plan(generator.bundle, str(odd))
    with pytest.raises(ConfigError, match="built for"):
        generator.generate_latents(generator.bundle.plan("base-4"), Request(prompt="x", height=64, width=64))


def test_runtime_generates_without_diffusers_or_transformers(tiny_bundles):
    code = (
        "import sys\n"
        "from ilf_deploy.engines.backends import open_generator\n"
        "from ilf_deploy.core.runtime.generator import Request\n"
        f"g = open_generator({str(tiny_bundles['pixart-alpha'])!r})\n"
        "g.decode(g.generate_latents(g.bundle.plan('ilf-4'), Request(prompt='a cat')))\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('diffusers', 'transformers')]\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_builds_are_deterministic(tiny_dirs, tiny_bundles, tmp_path):
    again = build_bundle(
        tiny_dirs["dit"], tmp_path / "again", BuildOptions(plans=("base-4", "ilf-4", "cache-6"))
    )
    first = Bundle.load(tiny_bundles["dit"]).manifest.files
    second = Bundle.load(again).manifest.files
    assert {k: v for k, v in first.items() if k.startswith("onnx/")} == {
        k: v for k, v in second.items() if k.startswith("onnx/")
    }


def test_large_segments_use_external_data(tiny_dirs, tmp_path, monkeypatch):
    from ilf_deploy.build.export import onnx as onnx_module

    monkeypatch.setattr(onnx_module, "TWO_GB", 2 * 1024)  # treat anything over 1 KiB as "large"
    path = build_bundle(tiny_dirs["dit"], tmp_path / "ext", BuildOptions(plans=("base-2",)))
    files = Bundle.load(path).manifest.files
    assert "onnx/blocks_00_05.onnx.data" in files  # weights beside the graph, hashed like any file
    generator = open_generator(path)
    latents = generator.generate_latents(generator.bundle.plan("base-2"), Request(class_label=1))
    assert np.isfinite(latents).all()
