"""The TensorRT backend's pure logic, on CPU: optimization profiles and engine-record checks."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle, BundleError
from ilf_deploy.core.runtime.manifest import Manifest, SegmentSpec, TensorSpec
from ilf_deploy.engines.backends.tensorrt import (
    EngineMismatch,
    check_engine_record,
    dim_ranges,
    engine_set,
    environment_record,
    input_profile,
    tensorrt_available,
)


def _manifest(tiny_bundles, name: str) -> Manifest:
    return Bundle.load(tiny_bundles[name], verify_hashes=False).manifest


def test_dim_ranges_from_the_manifest(tiny_bundles):
    m = _manifest(tiny_bundles, "pixart-alpha")
    (h, w), patch = m.latent_sizes[0], m.model.patch_size
    ranges = dim_ranges(m)
    assert ranges["batch"] == (1, 2, 2)  # max_batch 1, doubled by guidance
    tokens = (h // patch) * (w // patch)
    assert ranges["tokens"] == (tokens, tokens, tokens)
    assert ranges["latent_height"] == (h, h, h)
    assert ranges["height"][1] == h * m.model.vae_scale_factor
    assert ranges["text_tokens"] == (1, 120, 120)  # prompts are padded to the tokenizer's max length
    assert dim_ranges(m, max_batch=4)["batch"] == (1, 8, 8)
    assert "text_tokens" not in dim_ranges(_manifest(tiny_bundles, "dit"))  # class-conditional


def test_several_resolutions_span_one_profile(tiny_bundles):
    m = dataclasses.replace(
        _manifest(tiny_bundles, "pixart-alpha"), latent_sizes=((32, 32), (16, 24), (64, 48)), max_batch=3
    )
    ranges = dim_ranges(m)
    assert ranges["tokens"] == (8 * 12, 16 * 16, 32 * 24)  # min, the default size, max
    assert ranges["latent_height"] == (16, 32, 64) and ranges["latent_width"] == (24, 32, 48)
    assert ranges["batch"] == (1, 6, 6)


@pytest.mark.parametrize("name", ["pixart-alpha", "pixart-alpha-1024", "pixart-sigma", "dit"])
def test_every_segment_input_gets_a_profile(tiny_bundles, name):
    m = _manifest(tiny_bundles, name)
    for segment, spec in m.segments.items():
        profile = input_profile(m, spec)
        assert set(profile) == set(spec.input_names), segment
        for tensor, (low, opt, high) in profile.items():
            assert len(low) == len(opt) == len(high)
            assert all(0 < a <= b <= c for a, b, c in zip(low, opt, high)), (segment, tensor)
    hidden = input_profile(m, m.segments["final"])["hidden"]
    assert hidden[0][0] == 1 and hidden[2][0] == 2 * m.max_batch
    width = m.segments["final"].inputs[0].shape[2]
    assert hidden[0][2] == hidden[2][2] == width  # static dims stay static


def test_unknown_dimensions_are_refused(tiny_bundles):
    m = _manifest(tiny_bundles, "dit")
    spec = SegmentSpec("x", "x.onnx", (TensorSpec("x", ("batch", "mystery"), "float32"),), (), None)
    with pytest.raises(BundleError, match="mystery"):
        input_profile(m, spec)


HERE = environment_record("10.13.0.35", "NVIDIA H100 80GB HBM3", (9, 0))


def test_matching_engines_load():
    check_engine_record({**HERE, "segments": {}}, HERE, "bundle", "base")


@pytest.mark.parametrize(
    ("field", "value", "what"),
    [
        ("tensorrt", "11.0.0.1", "TensorRT"),
        ("compute_capability", "8.0", "compute capability"),
        ("gpu", "NVIDIA A100-SXM4-80GB", "GPU"),
    ],
)
def test_mismatched_engines_are_refused_with_a_rebuild_hint(field, value, what):
    record = {**HERE, field: value}
    with pytest.raises(EngineMismatch, match=what) as info:
        check_engine_record(record, HERE, "out/b", "int8_qdq")
    message = str(info.value)
    assert value in message and "rebuild" in message
    assert "ilf-deploy build-engines out/b --variant int8_qdq --force" in message
    assert isinstance(info.value, BundleError)  # the CLI prints it as one line, exit 2


def test_bundles_without_engines_say_how_to_build_them(tiny_bundles):
    with pytest.raises(BundleError, match="build-engines"):
        engine_set(_manifest(tiny_bundles, "dit"), None)
    with pytest.raises(BundleError, match="--variant int8_qdq"):
        engine_set(_manifest(tiny_bundles, "dit"), "int8_qdq")


def test_without_tensorrt_the_backend_says_so(tiny_bundles):
    if tensorrt_available():
        pytest.skip("TensorRT is installed here")
    from ilf_deploy.engines.backends.tensorrt import build_engines
    from ilf_deploy.engines.backends.tensorrt import open_generator as open_trt_generator

    with pytest.raises(ConfigError, match="TensorRT is not installed"):
        build_engines(tiny_bundles["dit"])
    with pytest.raises(ConfigError, match="TensorRT is not installed"):
        open_trt_generator(Bundle.load(tiny_bundles["dit"]))


def test_importing_the_backend_needs_neither_tensorrt_nor_polygraphy():
    code = (
        "import sys, json\n"
        "import ilf_deploy.engines.backends.tensorrt\n"
        "print(json.dumps([m for m in sys.modules if m.split('.')[0] in ('tensorrt', 'polygraphy')]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout) == []


def _fake_builds(monkeypatch, fail_at: int | None = None) -> list[str]:
    """build_engines with TensorRT's parts replaced: each 'engine' is a few bytes written where the
    real one would be, and the timing cache grows with each, as TensorRT's does."""
    from ilf_deploy.engines.backends import tensorrt

    calls: list[str] = []

    def build(bundle, key, spec, shapes, settings, staged):
        if len(calls) == fail_at:
            raise RuntimeError("the builder ran out of memory")
        calls.append(spec.name)
        target = staged / tensorrt.engine_file(key, spec.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f"engine {spec.name} {len(calls)}".encode())
        with (staged / tensorrt.TIMING_CACHE).open("ab") as cache:
            cache.write(spec.name.encode())
        return {
            "file": tensorrt.engine_file(key, spec.name),
            "onnx": spec.file,
            "profile": {},
            "build_s": 0.0,
        }

    monkeypatch.setattr(tensorrt, "_trt", lambda: None)
    monkeypatch.setattr(tensorrt, "_build_engine", build)
    monkeypatch.setattr(tensorrt, "current_environment", lambda: environment_record("10.9.0", "H100", (9, 0)))
    return calls


def test_a_failed_rebuild_leaves_the_bundle_and_its_engines_as_they_were(tiny_bundles, tmp_path, monkeypatch):
    """Engines and the timing cache are built aside and renamed in just before the manifest that
    lists them (before, each engine replaced the old one as it was built, and the timing cache was
    rewritten in place: a failure minutes later left a bundle that refused itself)."""
    import shutil

    from ilf_deploy.engines.backends.tensorrt import TIMING_CACHE, build_engines

    path = shutil.copytree(tiny_bundles["dit"], tmp_path / "bundle")
    calls = _fake_builds(monkeypatch)
    build_engines(path)
    bundle = Bundle.load(path)  # every hash checked, the engines' and the timing cache's too
    assert sorted(calls) == sorted(bundle.manifest.segments) and TIMING_CACHE in bundle.manifest.files
    before = {p.relative_to(path): p.read_bytes() for p in (path / "engines").rglob("*") if p.is_file()}

    calls = _fake_builds(monkeypatch, fail_at=2)
    with pytest.raises(RuntimeError, match="out of memory"):
        build_engines(path, force=True)
    Bundle.load(path)
    after = {p.relative_to(path): p.read_bytes() for p in (path / "engines").rglob("*") if p.is_file()}
    assert after == before and not [p.name for p in path.iterdir() if ".tmp-" in p.name]

    _fake_builds(monkeypatch)
    build_engines(path, force=True)
    rebuilt = {p.relative_to(path): p.read_bytes() for p in (path / "engines").rglob("*") if p.is_file()}
    assert Bundle.load(path) and rebuilt != before and set(rebuilt) == set(before)


def test_build_with_tensorrt_builds_the_engines_inside_its_workspace(tiny_dirs, tmp_path, monkeypatch):
    """`build --backend tensorrt` renames the bundle into place once, complete with its engines and
    the manifest that lists them: an engine that fails leaves no bundle (and, with --force, the
    previous one as it was), never a bundle without engines or one edited after its rename."""
    import os

    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.engines.backends import tensorrt

    out = tmp_path / "bundle"
    options = BuildOptions(plans=("base-2",), copy_model=False, backend="tensorrt")
    renamed = []
    real_rename = os.rename
    wrote_manifest_in = []
    real_rewrite = tensorrt.rewrite_manifest

    def rename(src, dst):
        renamed.append((str(src), str(dst)))
        return real_rename(src, dst)

    def rewrite(path, *args, **kwargs):
        wrote_manifest_in.append(path)
        return real_rewrite(path, *args, **kwargs)

    monkeypatch.setattr(tensorrt, "rewrite_manifest", rewrite)
    monkeypatch.setattr("ilf_deploy.core.files.os.rename", rename)
    calls = _fake_builds(monkeypatch, fail_at=1)
    with pytest.raises(RuntimeError, match="out of memory"):
        build_bundle(tiny_dirs["dit"], out, options)
    assert calls and os.listdir(tmp_path) == []  # nothing at --out, no staging left

    calls = _fake_builds(monkeypatch)
    renamed.clear()
    build_bundle(tiny_dirs["dit"], out, options)
    bundle = Bundle.load(out)  # every hash checked, the engines' too
    assert sorted(calls) == sorted(bundle.manifest.segments)
    assert set(bundle.manifest.engines) == {tensorrt.BASE}
    engines = bundle.manifest.engines[tensorrt.BASE].segments
    assert engines and all((out / e["file"]).is_file() for e in engines.values())
    into_place = [(src, dst) for src, dst in renamed if dst == str(out)]
    assert len(into_place) == 1 and ".bundle.tmp-" in into_place[0][0]  # renamed in once
    assert [p.parent for p in wrote_manifest_in] == [tmp_path] and wrote_manifest_in[-1] != out
    before = (out / "manifest.json").read_bytes()

    _fake_builds(monkeypatch, fail_at=0)
    with pytest.raises(RuntimeError, match="out of memory"):
        build_bundle(tiny_dirs["dit"], out, dataclasses.replace(options, force=True))
    assert (out / "manifest.json").read_bytes() == before and sorted(os.listdir(tmp_path)) == ["bundle"]
