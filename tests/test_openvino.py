"""The OpenVINO backend: parity with ONNX Runtime fp32, the int8-ov variant, bf16 gating, the
compiled-model cache, the CLI commands on it, and the one-line error without the extra."""

from __future__ import annotations

import base64
import io
import json
import logging
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("openvino")

from ilf_deploy.build.quantization.calibration import collect_calibration
from ilf_deploy.build.quantization.quantize import verify_variant
from ilf_deploy.cli import app
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.memory import GIB, MemoryGauge
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Request, warm_up
from ilf_deploy.core.runtime.manifest import CROSS_KV_SCHEMA_VERSION, CROSS_KV_SEGMENT
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.engines.backends.openvino import CACHE_DIR, cpu_has_bf16
from ilf_deploy.engines.compare import budget, compare_to_reference, run_reference

PROMPT = Request(prompt="a green triangle", seed=5)
SEGMENT_TOLERANCE, END_TO_END_TOLERANCE = 1e-4, 1e-3  # verify's fp32 budgets (rel. L2)


@pytest.fixture(scope="module")
def ov_bundle(tiny_bundles, tmp_path_factory):
    """The tiny PixArt-α bundle, calibrated on 2 prompts (4 samples per segment), with an int8-ov variant."""
    from ilf_deploy.build.quantization.quantize import quantize_bundle

    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path_factory.mktemp("ov") / "bundle")
    collect_calibration(path, "ilf-4", ["a red circle", "a blue square on grass"], max_samples=4)
    quantize_bundle(path, "int8-ov")
    return path


def rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


class FirstFeeds:
    def __init__(self) -> None:
        self.feeds: dict[str, dict] = {}

    def __call__(self, name, feeds) -> None:
        self.feeds.setdefault(name, {k: np.array(v) for k, v in feeds.items()})


def test_f32_segments_match_onnxruntime_within_the_segment_budget(ov_bundle):
    ort = open_generator(ov_bundle, "onnxruntime")
    ov = open_generator(ov_bundle, "openvino", cache=False)
    assert (ov.backend, ov.variant) == ("openvino", None)
    plan = ort.bundle.plan("ilf-4")
    recorder = FirstFeeds()
    ort.segments.recorder = recorder
    want = ort.generate_latents(plan, PROMPT)
    want_images = ort.decode(want)
    ort.segments.recorder = None
    recorder.feeds["vae_decoder"] = {"latents": np.asarray(want)}
    assert set(recorder.feeds) == set(ort.bundle.manifest.segments)  # every segment, on real feeds
    for name, feeds in recorder.feeds.items():
        a, b = ov.segments.run(name, feeds), ort.segments.run(name, feeds)
        assert set(a) == set(b), name
        for key in b:
            assert a[key].shape == b[key].shape, (name, key)
            assert rel_l2(a[key], b[key]) <= SEGMENT_TOLERANCE, (name, key, rel_l2(a[key], b[key]))
    got = ov.generate_latents(plan, PROMPT)
    assert rel_l2(got, want) <= END_TO_END_TOLERANCE
    assert np.abs(ov.decode(got).astype(int) - want_images).max() <= 2
    assert ov.segments.timings["feedback"], "stage times for bench/serve"


def _fed_by_fake_quantize(op) -> bool:
    """An op whose inputs all come from a FakeQuantize, through layout-only ops."""

    def quantized(node) -> bool:
        while node.get_type_name() in ("Transpose", "Reshape", "Convert", "Squeeze", "Unsqueeze"):
            node = node.input_value(0).get_node()
        return node.get_type_name() == "FakeQuantize"

    return all(quantized(value.get_node()) for value in op.input_values())


def test_int8_ov_runs_the_attention_in_int8_where_the_cpu_has_8bit_dot_products(ov_bundle):
    """`int8-ov` hands the attention BMMs to NNCF beside the linear layers where the CPU has 8-bit dot
    products: NNCF quantizes Q·Kᵀ (both inputs; its transformer pattern leaves the softmax output and
    so P·V in float) and OpenVINO runs its fused attention in int8; without them (AVX2 only) the
    attention stays in float."""
    import onnx
    import openvino as ov

    from ilf_deploy.build.quantization.quantize import attention_bmms, linear_nodes
    from ilf_deploy.engines.backends.machine import cpu_has_int8_dot

    bundle = Bundle.load(ov_bundle)
    entry = bundle.variant_spec("int8_ov")
    for name, spec in entry.segments.items():
        graph = onnx.load(str(bundle.segment_path(name)), load_external_data=False)
        bmms = set(attention_bmms(graph))
        first, last = bundle.manifest.segments[name].blocks or (0, 0)
        assert len(bmms) == 4 * (last - first + 1), name  # self and cross attention: Q·Kᵀ, P·V each
        want = len(linear_nodes(graph)) + (len(bmms) if cpu_has_int8_dot() else 0)  # the query too
        assert entry.quantized_layers[name] == want, name
        model = ov.Core().read_model(str(bundle.path / spec.file))
        fed = {
            op.get_friendly_name()
            for op in model.get_ops()
            if op.get_friendly_name() in bmms and _fed_by_fake_quantize(op)
        }
        scores = {n for n in bmms if n.endswith("/MatMul")}  # Q·Kᵀ; P·V is `…/MatMul_1`
        assert fed == (scores if cpu_has_int8_dot() else set()) and len(scores) == len(bmms) // 2, name
        runtime = ov.Core().compile_model(model, "CPU").get_runtime_model()
        infos = [op.get_rt_info() for op in runtime.get_ordered_ops()]
        precisions = {  # of the fused attentions (snippet subgraphs holding a Softmax)
            info["runtimePrecision"].astype(str)
            for info in infos
            if "originalLayersNames" in info and "Softmax" in info["originalLayersNames"].astype(str)
        }
        assert ("i8" in precisions or "u8" in precisions) == cpu_has_int8_dot(), (name, precisions)


def test_int8_variant_is_within_its_budget_and_runs_only_on_openvino(ov_bundle):
    import openvino as ov

    bundle = Bundle.load(ov_bundle)  # the variant's .xml/.bin are hashed like any variant's files
    entry = bundle.variant_spec("int8_ov")
    assert entry.mode == "int8-ov" and entry.engines == ("openvino",)
    assert "nncf" in bundle.manifest_json()["variants"]["int8_ov"]["tools"]
    assert set(entry.segments) == {
        n for n, s in bundle.manifest.segments.items() if s.blocks or n == "feedback"
    }
    for name, spec in entry.segments.items():
        assert spec.file.endswith(".xml") and spec.file in bundle.manifest.files
        assert spec.file[:-4] + ".bin" in bundle.manifest.files
        ops = [op.get_type_name() for op in ov.Core().read_model(str(bundle.path / spec.file)).get_ops()]
        assert ops.count("FakeQuantize") > 0 and entry.quantized_layers[name] > 0, name
    rows = verify_variant(bundle, "int8_ov")
    limits = budget("openvino", "int8-ov")
    snr, rel = limits.segment.bound, limits.end_to_end.bound
    assert all(r.ok for r in rows), rows
    segments = [r for r in rows if r.kind == "segment"]
    assert {r.name for r in segments} == set(entry.segments)
    assert all(r.snr_db >= snr for r in segments)
    end_to_end = rows[-1]
    # quantized for real: not fp32's output, but within budget
    assert end_to_end.kind == "end-to-end" and 1e-5 < end_to_end.rel_l2 <= rel
    with pytest.raises(ConfigError, match="runs on --backend openvino"):
        open_generator(ov_bundle, "onnxruntime", variant="int8_ov")
    result = CliRunner().invoke(app, ["verify-variant", str(ov_bundle), "--variant", "int8_ov"])
    assert result.exit_code == 0, result.output
    assert "int8-ov, on openvino" in " ".join(result.output.split())  # the title, however wrapped


def test_ort_only_variants_are_refused_with_one_line(ov_bundle, tmp_path):
    path = shutil.copytree(ov_bundle, tmp_path / "bundle")
    from ilf_deploy.build.quantization.quantize import quantize_bundle

    quantize_bundle(path, "int8-dynamic")
    with pytest.raises(ConfigError, match=r"\(int8-dynamic\) runs on --backend onnxruntime, not openvino"):
        open_generator(path, "openvino", variant="int8_dynamic")


@pytest.mark.skipif(cpu_has_bf16(), reason="this CPU has bf16: the budget test below runs instead")
def test_bf16_is_refused_on_a_cpu_without_bf16(ov_bundle):
    with pytest.raises(ConfigError, match="AVX512_BF16 or AMX"):
        open_generator(ov_bundle, "openvino", variant="bf16")


@pytest.mark.skipif(not cpu_has_bf16(), reason="needs AVX512_BF16 or AMX (OpenVINO bf16)")
def test_bf16_is_within_the_variant_budget(ov_bundle):
    bundle = Bundle.load(ov_bundle)
    generator = open_generator(ov_bundle, "openvino", variant="bf16")
    assert generator.variant == "bf16"
    limits = budget("openvino", "bf16")
    rows = compare_to_reference(generator, run_reference(bundle), list(bundle.manifest.segments), limits)
    assert all(r.ok for r in rows), rows
    blocks = [r for r in rows if r.kind == "segment" and r.name.startswith("blocks_")]
    assert blocks and all(r.metrics.rel_l2 > 1e-5 for r in blocks)  # the blocks really ran in bf16
    assert rows[-1].kind == "end-to-end" and rows[-1].metrics.rel_l2 > 1e-5


def test_bf16_keeps_the_conditioning_segments_in_f32(ov_bundle):
    from ilf_deploy.engines.backends.openvino import OvSegments

    bundle = Bundle.load(ov_bundle)
    segments = OvSegments(bundle, precision="bf16", cache=False)
    reduced = set(bundle.manifest.reduced_precision_segments)
    assert CROSS_KV_SEGMENT in reduced  # the caption's K/V projections: bf16 like the blocks
    assert reduced == {
        n for n, s in bundle.manifest.segments.items() if s.blocks or n in ("feedback", CROSS_KV_SEGMENT)
    }
    for name in bundle.manifest.segments:
        want = "bf16" if name in reduced else "f32"
        assert segments.config_for(name)["INFERENCE_PRECISION_HINT"] == want, name


def test_compiled_models_are_cached_in_the_bundle_outside_its_manifest(ov_bundle, tmp_path, monkeypatch):
    from ilf_deploy.engines.backends import openvino as backend

    path = shutil.copytree(ov_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(CACHE_DIR))
    plan = Bundle.load(path).plan("ilf-4")
    first = open_generator(path, "openvino").generate_latents(plan, PROMPT)
    cache = path / CACHE_DIR
    blobs = sorted(cache.iterdir())
    names = {b.name.split(".")[0] for b in blobs}
    assert names == {"text_encoder", "context", CROSS_KV_SEGMENT, "time", "embed", "feedback", "final"} | {
        n for n in Bundle.load(path).manifest.segments if n.startswith("blocks_")
    }
    assert not any(b.name.startswith(".") for b in blobs)  # no temporary file left behind
    assert not any(f.startswith(CACHE_DIR) for f in Bundle.load(path).manifest.files)
    Bundle.load(path)  # its sha256 check still passes

    # A second start imports every blob: compiling is never needed.
    compile_model = backend.core().compile_model

    def refuse(*args, **kwargs):
        raise AssertionError("compiled although a cached blob exists")

    monkeypatch.setattr(type(backend.core()), "compile_model", refuse)
    again = open_generator(path, "openvino").generate_latents(plan, PROMPT)
    np.testing.assert_array_equal(again, first)
    monkeypatch.setattr(type(backend.core()), "compile_model", compile_model.__func__)

    # Half a blob (a crash while some other tool wrote it) is recompiled and replaced.
    broken = next(b for b in blobs if b.name.startswith("feedback."))
    broken.write_bytes(broken.read_bytes()[:100])
    repaired = open_generator(path, "openvino").generate_latents(plan, PROMPT)
    np.testing.assert_array_equal(repaired, first)
    assert broken.stat().st_size > 100

    # f32 and int8 are separate blobs; turning the cache off writes none.
    open_generator(path, "openvino", variant="int8_ov").generate_latents(plan, PROMPT)
    assert len(list(cache.iterdir())) > len(blobs)
    shutil.rmtree(cache)
    open_generator(path, "openvino", cache=False).generate_latents(plan, PROMPT)
    assert not cache.exists()


def test_generate_bench_verify_and_eval_run_on_openvino(ov_bundle, tmp_path):
    runner = CliRunner()
    image = tmp_path / "x.png"
    args = ["generate", str(ov_bundle), "--backend", "openvino", "--plan", "ilf-4", "--prompt", "a cat"]
    result = runner.invoke(app, [*args, "--out", str(image)])
    assert result.exit_code == 0 and image.is_file(), result.output
    report = tmp_path / "bench.json"
    args = ["bench", str(ov_bundle), "--backend", "openvino", "--variant", "int8_ov", "--plans", "ilf-4"]
    result = runner.invoke(app, [*args, "--runs", "1", "--warmup", "0", "--json-out", str(report)])
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert (data["backend"], data["variant"]) == ("openvino", "int8_ov")
    assert "on openvino int8_ov" in result.output and "feedback" in result.output  # per-stage times
    result = runner.invoke(app, ["verify", str(ov_bundle), "--backend", "openvino"])
    assert result.exit_code == 0, result.output

    from ilf_deploy.checks.evaluation import bundle_backend

    evaluated = bundle_backend(ov_bundle, backend="openvino")
    assert evaluated.name == "openvino"
    samples = evaluated.generate(Bundle.load(ov_bundle).plan("ilf-4"), ["a red circle"], [0])
    assert samples[0].image.shape[-1] == 3


def test_segments_run_compiled_for_their_call_shapes_up_to_a_cap(ov_bundle):
    from ilf_deploy.engines.backends import openvino as backend

    bundle = Bundle.load(ov_bundle)
    plan = bundle.plan("ilf-4")
    first = FirstFeeds()
    generator = backend.open_generator(bundle, cache=False)
    generator.segments.recorder = first
    static = generator.generate_latents(plan, PROMPT)
    feeds = first.feeds["blocks_00_00"]
    shapes = generator.segments.shapes_for("blocks_00_00", feeds)
    assert shapes == tuple((k, feeds[k].shape) for k in bundle.segment_spec("blocks_00_00").input_names)
    compiled = generator.segments.compiled("blocks_00_00", shapes)
    assert all(port.get_partial_shape().is_static for port in compiled.inputs)
    assert not all(
        port.get_partial_shape().is_static for port in generator.segments.compiled("blocks_00_00").inputs
    )

    dynamic_only = backend.open_generator(bundle, cache=False)
    dynamic_only.segments.static_shapes = 0  # every call on the dynamic-shape model: the same math
    dynamic = dynamic_only.generate_latents(plan, PROMPT)
    assert rel_l2(static, dynamic) < SEGMENT_TOLERANCE

    segments = backend.open_generator(bundle, cache=False).segments
    segments.static_shapes = 1  # a second batch size runs on the dynamic model
    segments.infer_impl("blocks_00_00", feeds)
    doubled = {k: np.concatenate([v, v]) for k, v in feeds.items()}
    assert segments.shapes_for("blocks_00_00", feeds) == shapes
    assert segments.shapes_for("blocks_00_00", doubled) is None
    out = segments.infer_impl("blocks_00_00", doubled)
    single = segments.infer_impl("blocks_00_00", feeds)
    for key, value in single.items():
        assert rel_l2(out[key][: len(value)], value) < SEGMENT_TOLERANCE


def test_openvino_device_names(ov_bundle):
    with pytest.raises(ConfigError, match="not an OpenVINO device"):
        open_generator(ov_bundle, "openvino", device="cuda")
    generator = open_generator(ov_bundle, "openvino", device="CPU")
    assert generator.segments.device == "CPU"


def test_missing_openvino_is_a_one_line_error_naming_the_extra(ov_bundle, tmp_path):
    code = (
        "import sys\n"
        "for name in ('openvino', 'nncf'):\n"
        "    sys.modules[name] = None  # as if not installed: importing them raises ImportError\n"
        "from ilf_deploy.cli import main\n"
        "main()\n"
    )

    def cli(*args):
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)

    copy = shutil.copytree(ov_bundle, tmp_path / "bundle", ignore=shutil.ignore_patterns(CACHE_DIR))
    for args, extra in (
        (("generate", copy, "--backend", "openvino", "--plan", "ilf-4", "--prompt", "x"), "openvino"),
        (("quantize", copy, "--mode", "int8-ov", "--name", "again"), "export"),  # nncf: a build tool
    ):
        result = cli(*args)
        text = (result.stdout + result.stderr).strip()
        assert result.returncode == 2 and "Traceback" not in text, text
        assert f"pip install 'ilf-deploy[{extra}]'" in text and len(text.splitlines()) == 1, text
    assert not (copy / "onnx" / "again").exists() and "again" not in Bundle.load(copy).variants
    assert not list((copy / "onnx").glob(".again*"))  # no half-written variant either


def test_serve_runs_openvino_and_auto(ov_bundle, tmp_path):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from ilf_deploy.serving.serve import ServeOptions, create_app

    for backend in ("openvino", "auto"):
        with TestClient(create_app(ov_bundle, ServeOptions(backend=backend, max_n=2))) as client:
            response = client.post("/v1/images/generations", json={"prompt": "a blue square", "n": 2})
            assert response.status_code == 200, response.text
            assert len(response.json()["data"]) == 2


# -- `quantize --mode bf16`: the precision policy per segment, recorded in the manifest ----------


def precision_hints(generator) -> dict[str, str]:
    """Each segment's INFERENCE_PRECISION_HINT as OpenVINO compiled it (read back, not our config)."""
    import openvino as ov

    hints = {}
    for name in generator.bundle.manifest.segments:
        hint = generator.segments.compiled(name).get_property("INFERENCE_PRECISION_HINT")
        hints[name] = "bf16" if hint == ov.Type.bf16 else "f32" if hint == ov.Type.f32 else str(hint)
    return hints


@pytest.mark.skipif(not cpu_has_bf16(), reason="needs AVX512_BF16 or AMX (OpenVINO bf16)")
def test_bf16_variant_records_its_policy_and_openvino_runs_exactly_it(ov_bundle, tmp_path):
    from ilf_deploy.build.quantization.quantize import quantize_bundle
    from ilf_deploy.core.runtime.manifest import BF16_SCHEMA_VERSION

    path = shutil.copytree(ov_bundle, tmp_path / "bundle")
    files = sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file() and "cache" not in str(p))
    entry = quantize_bundle(path, "bf16")
    bundle = Bundle.load(path)
    spec = bundle.variant_spec("bf16")
    reduced = set(bundle.manifest.reduced_precision_segments)
    assert (
        spec.mode == "bf16" and spec.engines == ("openvino",) and entry["precision_policy"]["plan"] == "ilf-4"
    )
    assert set(spec.segments) | set(spec.precision_policy["f32"]) == reduced
    assert not set(spec.segments) & set(spec.precision_policy["f32"]) and spec.segments
    for name, segment in spec.segments.items():  # the bundle's own ONNX files: "this segment in bf16"
        assert segment.file == bundle.manifest.segments[name].file
    after = sorted(p.relative_to(path) for p in path.rglob("*") if p.is_file() and "cache" not in str(p))
    assert after == files  # no new files (manifest.json and its digest rewritten in place)
    # a bf16 variant needs 3; this PixArt bundle's `cross_kv` segment already made it 7, which holds it
    assert bundle.manifest_json()["schema_version"] == CROSS_KV_SCHEMA_VERSION > BF16_SCHEMA_VERSION

    generator = open_generator(path, "openvino", variant="bf16", cache=False)
    assert generator.variant == "bf16"
    hints = precision_hints(generator)
    assert hints == {n: "bf16" if n in spec.segments else "f32" for n in bundle.manifest.segments}

    checks = verify_variant(bundle, "bf16")  # verify-variant: segment by segment, then end to end
    assert [c.name for c in checks if c.kind == "segment"] == list(spec.segments)
    assert all(c.ok for c in checks) and checks[-1].kind == "end-to-end"
    assert checks[-1].metrics.rel_l2 > 1e-5  # it really ran in bf16


@pytest.mark.skipif(not cpu_has_bf16(), reason="needs AVX512_BF16 or AMX (OpenVINO bf16)")
def test_a_segment_beyond_its_bf16_budget_on_its_own_stays_f32(ov_bundle, tmp_path, monkeypatch):
    """A segment budget between the segments' measured bf16 SNRs: those below it miss on their own
    and must stay f32 (in the manifest and in what OpenVINO compiles); a budget none meets is refused."""
    from ilf_deploy.build.quantization import bf16
    from ilf_deploy.build.quantization.quantize import quantize_bundle
    from ilf_deploy.checks.tuning import candidates
    from ilf_deploy.engines.compare import Budget, Limit

    path = shutil.copytree(ov_bundle, tmp_path / "bundle")
    measured: dict[str, float] = {}
    real_compare = bf16.compare_segment

    def spy(name, *args, **kwargs):
        row = real_compare(name, *args, **kwargs)
        if row is not None:
            measured[name] = row.metrics.snr_db
        return row

    monkeypatch.setattr(bf16, "compare_segment", spy)
    bf16.bf16_policy(Bundle.load(path))
    worst, best = min(measured.values()), max(measured.values())
    assert worst < best, measured
    bound = (worst + best) / 2
    end_to_end = budget("openvino", "bf16").end_to_end
    monkeypatch.setattr(bf16, "bf16_budget", lambda: Budget(Limit("snr_db", bound), end_to_end))
    quantize_bundle(path, "bf16")
    bundle = Bundle.load(path)
    spec = bundle.variant_spec("bf16")
    missed = {n for n, snr in measured.items() if snr < bound}
    assert missed and set(spec.precision_policy["f32"]) == missed, (measured, bound)
    assert set(spec.segments) == set(measured) - missed
    assert all("beyond" in why for why in spec.precision_policy["f32"].values())
    hints = precision_hints(open_generator(path, "openvino", variant="bf16", cache=False))
    assert all(hints[n] == "f32" for n in missed) and all(hints[n] == "bf16" for n in spec.segments)

    # tune's OpenVINO bf16 candidate is the variant (its policy), not the engine's bf16 on every block
    ov_bf16 = [c for c in candidates(bundle) if c.backend == "openvino" and c.label == "openvino bf16"]
    assert len(ov_bf16) == 1 and ov_bf16[0].variant == "bf16" and ov_bf16[0].segments == list(spec.segments)
    assert ov_bf16[0].budget == budget("openvino", "bf16")

    monkeypatch.setattr(bf16, "bf16_budget", lambda: Budget(Limit("snr_db", best + 1), end_to_end))
    with pytest.raises(ConfigError, match="no segment stays within the bf16 budget"):
        quantize_bundle(path, "bf16")
    assert Bundle.load(path).variant_spec("bf16").precision_policy["f32"].keys() == missed  # unchanged


def test_quantize_bf16_is_one_line_without_bf16_hardware(ov_bundle, tmp_path, monkeypatch):
    from ilf_deploy.engines.backends import openvino as backend

    monkeypatch.setattr(backend, "cpu_has_bf16", lambda: False)
    result = CliRunner().invoke(app, ["quantize", str(ov_bundle), "--mode", "bf16"])
    assert result.exit_code != 0 and "needs AVX512_BF16 or AMX" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


@pytest.mark.skipif(not cpu_has_bf16(), reason="needs AVX512_BF16 or AMX (OpenVINO bf16)")
def test_int8_ov_with_bf16_for_the_rest_is_a_tune_candidate_auto_can_open(ov_bundle, tmp_path):
    """int8-ov's segments with bf16 (not f32) for the ops NNCF left unquantised: a `tune` candidate
    held to the variant's int8-ov budget, compiled with the bf16 hint on exactly those segments."""
    from ilf_deploy.checks.tuning import candidates, tune
    from ilf_deploy.engines.backends import open_bundle_generator
    from ilf_deploy.engines.backends.auto import TUNING_FILE

    path = shutil.copytree(ov_bundle, tmp_path / "bundle")
    bundle = Bundle.load(path)
    found = {c.label: c for c in candidates(bundle)}
    mixed = found["openvino int8_ov +bf16"]
    assert mixed.variant == "int8_ov" and mixed.options == {"precision": "bf16"}
    # compared: the variant's segments and `cross_kv`, which the bf16 hint also reaches
    assert mixed.budget == budget("openvino", "int8-ov") and mixed.segments == [
        *bundle.variant_spec("int8_ov").segments,
        CROSS_KV_SEGMENT,
    ]
    hints = precision_hints(
        open_generator(path, "openvino", variant="int8_ov", precision="bf16", cache=False)
    )
    assert hints == {n: "bf16" if n in mixed.segments else "f32" for n in bundle.manifest.segments}

    report = tune(path, "ilf-4", budget_s=60, include=lambda c: c.label == "openvino int8_ov +bf16")
    row = report["candidates"][1]
    assert row["label"] == "openvino int8_ov +bf16" and row["fidelity"] and row["ms_per_step"] > 0
    assert row["ok"] == all(f["ok"] for f in row["fidelity"])  # judged by its budget, not assumed
    if row["ok"]:  # auto opens the same engine when it is the winner (options travel with it)
        winner = {k: row[k] for k in ("backend", "variant", "options", "label")}
        (path / TUNING_FILE).write_text(json.dumps({**report, "winner": winner}))
        generator = open_bundle_generator(Bundle.load(path), "auto")
        assert generator.choice.startswith("auto: openvino int8_ov +bf16 (")
        assert precision_hints(generator) == hints


class OvLog(logging.Handler):
    """OpenVINO's DEBUG lines: its compiles (segment, shapes) and its dynamic-shape calls."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.compiles: list[tuple[str, object]] = []
        self.dynamic_calls = 0

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "OpenVINO compiles %s for %s":
            self.compiles.append(record.args)
        elif record.msg == "OpenVINO runs %s on its dynamic-shape model":
            self.dynamic_calls += 1


@pytest.fixture
def ov_log():
    logger = logging.getLogger("ilf_deploy.openvino")
    handler, level = OvLog(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_serve_compiles_every_batch_bucket_static_in_its_warm_up_shapes(ov_bundle, ov_log):
    from fastapi.testclient import TestClient

    from ilf_deploy.serving.serve import ServeOptions, create_app

    generator = open_generator(ov_bundle, "openvino", cache=False)
    options = ServeOptions(max_batch=4, max_wait_ms=100)
    with TestClient(create_app(ov_bundle, options, generator)) as client:
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)
        assert generator.segments.static_shapes == 3  # buckets 1, 2, 4
        block_rows = sorted(shapes[0][1][0] for name, shapes in ov_log.compiles if name == "blocks_00_00")
        assert block_rows == [2, 4, 8]  # guided: [uncond; cond] rows of batches 1, 2 and 4
        assert ov_log.dynamic_calls == 0
        ov_log.compiles.clear()
        body = {"prompt": "a red circle", "seed": 50, "response_format": "b64_json"}
        served = [client.post("/v1/images/generations", json={**body, "n": n}) for n in (1, 2, 3, 4)]
    assert all(r.status_code == 200 for r in served), [r.text for r in served]
    assert ov_log.compiles == [] and ov_log.dynamic_calls == 0  # every call on a warmed static shape
    plan = generator.bundle.plan(generator.bundle.default_plan)
    for response in served:
        for seed, item in enumerate(response.json()["data"], start=50):
            alone = generator.decode(generator.generate_batch(plan, [Request("a red circle", seed=seed)]))[0]
            image = np.asarray(Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))))
            assert np.abs(image.astype(int) - alone.astype(int)).max() <= 1  # batched == alone


class ScriptedMemory(MemoryGauge):
    """A machine of `total` bytes where each warm-up generation leaves `per_size` more resident:
    `warm_up` reads `resident()` before and after each size, so every second read has grown."""

    def __init__(self, total: int, per_size: int) -> None:
        self.total_bytes, self.per_size, self.held, self.reads = total, per_size, 0, 0

    def total(self) -> int:
        return self.total_bytes

    def available(self) -> int:
        return self.total_bytes - self.held

    def resident(self) -> int:
        self.reads += 1
        if self.reads % 2 == 0:
            self.held += self.per_size
        return self.held


def test_warm_up_keeps_the_batch_sizes_memory_holds_and_serves_larger_batches_in_their_chunks(
    ov_bundle, ov_log, monkeypatch, caplog
):
    """10 GiB, 1 GiB kept free, 3.5 GiB a compiled batch size: sizes 1 and 2 fit, 4 would not (2 GiB
    left beyond the margin), so the server runs batches of at most 2, on static shapes, and says so."""
    from fastapi.testclient import TestClient

    from ilf_deploy.core.runtime import generator as generator_module
    from ilf_deploy.serving.serve import ServeOptions, create_app

    monkeypatch.setattr(generator_module, "MemoryGauge", lambda: ScriptedMemory(10 * GIB, 7 * GIB // 2))
    generator = open_generator(ov_bundle, "openvino", cache=False)
    options = ServeOptions(max_batch=4, max_wait_ms=300)
    with (
        caplog.at_level(logging.WARNING, "ilf_deploy.runtime"),
        TestClient(create_app(ov_bundle, options, generator)) as client,
    ):
        deadline = time.monotonic() + 120
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "the server never became ready"
            time.sleep(0.05)
        assert generator.segments.static_shapes == 2  # buckets 1, 2 kept; 4 not compiled
        block_rows = sorted(shapes[0][1][0] for name, shapes in ov_log.compiles if name == "blocks_00_00")
        assert block_rows == [2, 4]
        assert client.get("/v1/models").json()["data"][0]["max_batch"] == 2
        ov_log.compiles.clear()
        body = {"prompt": "a red circle", "seed": 50, "response_format": "b64_json", "n": 4}
        served = client.post("/v1/images/generations", json=body)
    assert served.status_code == 200, served.text
    assert len(served.json()["data"]) == 4
    assert ov_log.compiles == [] and ov_log.dynamic_calls == 0  # 4 images as two static batches of 2
    assert "batches of at most 2 images, not 4" in caplog.text


def test_warm_up_ignores_memory_on_an_engine_with_one_model_for_every_shape(ov_bundle):
    """ONNX Runtime does not compile per shape: every size is warmed whatever the gauge says."""
    generator = open_generator(ov_bundle, "onnxruntime")
    plan = generator.bundle.plan(generator.bundle.default_plan)
    warmed = warm_up(generator, plan, Request("a red circle"), (1, 2, 4), ScriptedMemory(10 * GIB, 3 * GIB))
    assert warmed == (1, 2, 4)


@pytest.mark.parametrize("int8_dot", [True, False])
def test_int8_ov_weights_take_half_the_range_where_the_cpu_has_no_int8_dot_products(
    int8_dot, tmp_path, monkeypatch
):
    """Without 8-bit dot products (AVX2 only) OpenVINO's int8 kernels saturate 16-bit pair sums: there
    every weight is quantized to half the 8-bit range (NNCF's overflow fix); elsewhere NNCF's default
    (a model's first convolutions only), so these MatMuls use the full range."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ilf_deploy.build.quantization import openvino as ov_quantization
    from ilf_deploy.build.quantization.openvino import quantize_segment_openvino
    from ilf_deploy.engines.backends import machine
    from ilf_deploy.engines.backends.openvino import core

    monkeypatch.setattr(machine, "cpu_has_int8_dot", lambda: int8_dot)
    rng = np.random.default_rng(0)
    names = ["/blocks.0/ff/net.0/proj/MatMul", "/blocks.0/ff/net.2/MatMul"]
    nodes = [
        helper.make_node("MatMul", ["x", "w0"], ["h"], name=names[0]),
        helper.make_node("MatMul", ["h", "w1"], ["z"], name=names[1]),
        helper.make_node("Identity", ["z"], ["y"], name="/out/Identity"),  # else OpenVINO names it "y"
    ]
    weights = [
        numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), f"w{i}") for i in (0, 1)
    ]
    graph = helper.make_graph(
        nodes,
        "ff",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 64])],
        weights,
    )
    source = tmp_path / "ff.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    samples = [{"x": rng.standard_normal((8, 64)).astype(np.float32)} for _ in range(4)]
    assert quantize_segment_openvino(source, tmp_path / "ff.xml", samples, names) == 2
    model = core().read_model(str(tmp_path / "ff.xml"))
    int8 = [op.get_data() for op in model.get_ordered_ops() if op.get_type_name() == "Constant"]
    int8 = [np.abs(data.astype(np.int32)).max() for data in int8 if data.dtype == np.int8]
    assert len(int8) == 2, int8  # both layers' weights stored as int8
    if int8_dot:
        assert max(int8) > 64, int8  # the second layer in the full range
    else:
        assert max(int8) <= 64, int8
    assert ov_quantization.overflow_fix().value == ("first_layer_only" if int8_dot else "enable")


def test_int8_ov_scales_the_cross_attention_query_per_token(tmp_path):
    """PixArt's cross-attention query reads the residual stream, whose range grows ~100x over a
    trajectory: a static per-tensor scale calibrated on the late steps leaves an early step's input a
    few int8 steps wide. `int8-ov` divides each token by its max |x| before the quantized MatMul and
    multiplies it back after (`scale_per_token`): the same product, on an input in [-1, 1]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from ilf_deploy.build.quantization.openvino import quantize_segment_openvino
    from ilf_deploy.engines.backends.openvino import core

    rng = np.random.default_rng(0)
    name = "/blocks.0/attn2/to_q/MatMul"
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w"], ["q"], name=name),
            helper.make_node("Identity", ["q"], ["y"], name="/out/Identity"),
        ],
        "query",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, 64])],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32) / 8, "w")],
    )
    source = tmp_path / "query.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(source))
    scales = (0.01, 0.1, 1.0, 1.0)  # an early step's residual stream is ~100x smaller than a late one's
    samples = [{"x": rng.standard_normal((2, 16, 64)).astype(np.float32) * s} for s in scales]
    early = samples[0]["x"]
    want = early @ numpy_helper.to_array(graph.initializer[0])
    snr = {}
    for label, per_token in (("static", ()), ("per token", (name,))):
        target = tmp_path / f"{label}.xml"
        assert quantize_segment_openvino(source, target, samples, [name], per_token) == 1
        model = core().read_model(str(target))
        types = {op.get_type_name() for op in model.get_ordered_ops()}
        assert "FakeQuantize" in types and ("Divide" in types) == bool(per_token), (label, types)
        got = core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})({"x": early})[0]
        snr[label] = 10 * np.log10(np.sum(want**2) / np.sum((got - want) ** 2))
    assert snr["per token"] >= 35 > 20 >= snr["static"], snr
