"""TensorRT on a real GPU: engine builds per precision, parity with ONNX Runtime, CUDA graphs.

Skipped without an NVIDIA GPU and TensorRT (i.e. always in this project's CI, which has neither:
NEVER RUN HERE). Run with `make gpu-check` on an H100 (or any GPU; FP8 needs compute capability
>= 8.9). Budgets: ilf_deploy.engines.compare.BUDGETS ("tensorrt", ...) (vs ONNX Runtime fp32 on CPU).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from ilf_deploy.engines.backends.tensorrt import tensorrt_available


def _gpu() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return torch.cuda.is_available() and tensorrt_available()


pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not _gpu(), reason="needs an NVIDIA GPU and TensorRT")]

PROMPTS = ["a red circle", "a blue square on green grass", "a cat"]


def _capability() -> tuple[int, int]:
    import torch

    return torch.cuda.get_device_capability()


@pytest.fixture(scope="module")
def engine_bundles(tiny_bundles, tiny_dirs, tmp_path_factory):
    """fp32 (base + int8/fp8 variants) and fp16 bundles of the tiny PixArt-α, with engines."""
    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.build.quantization.calibration import collect_calibration
    from ilf_deploy.build.quantization.quantize import quantize_bundle
    from ilf_deploy.engines.backends.tensorrt import build_engines

    root = tmp_path_factory.mktemp("trt")
    fp32 = shutil.copytree(tiny_bundles["pixart-alpha"], root / "fp32")
    collect_calibration(fp32, "ilf-4", PROMPTS, max_samples=4)
    quantize_bundle(fp32, "int8-qdq")
    build_engines(fp32)
    build_engines(fp32, "int8_qdq")
    if _capability() >= (8, 9):
        quantize_bundle(fp32, "fp8-qdq")
        build_engines(fp32, "fp8_qdq")
    fp16 = build_bundle(
        tiny_dirs["pixart-alpha"], root / "fp16", BuildOptions(plans=("ilf-4",), precision="fp16")
    )
    build_engines(fp16)
    dit = shutil.copytree(tiny_bundles["dit"], root / "dit")
    build_engines(dit)
    return {"fp32": fp32, "fp16": fp16, "dit": dit}


def test_engines_are_recorded_with_their_environment(engine_bundles):
    import tensorrt as trt
    import torch

    from ilf_deploy.core.runtime.bundle import Bundle

    bundle = Bundle.load(engine_bundles["fp32"])  # hashes of engines and timing cache verify
    record = bundle.manifest.engines["base"]
    assert record.tensorrt == trt.__version__
    assert record.gpu == torch.cuda.get_device_name()
    assert record.compute_capability == "{}.{}".format(*_capability())
    assert set(record.segments) == set(bundle.manifest.segments)
    assert (bundle.path / "engines" / "timing.cache").is_file()


@pytest.mark.parametrize(
    ("bundle", "variant"),
    [("fp32", None), ("fp16", None), ("dit", None), ("fp32", "int8_qdq"), ("fp32", "fp8_qdq")],
)
def test_tensorrt_matches_onnxruntime_per_segment_and_end_to_end(engine_bundles, bundle, variant):
    from ilf_deploy.checks.verify.engines import verify_engines
    from ilf_deploy.core.runtime.bundle import Bundle

    if variant == "fp8_qdq" and _capability() < (8, 9):
        pytest.skip("FP8 needs compute capability >= 8.9 (Ada, Hopper)")
    rows = verify_engines(Bundle.load(engine_bundles[bundle]), variant)
    for row in rows:
        print(row.to_dict())
    assert all(r.ok for r in rows), [r for r in rows if not r.ok]
    assert {r.kind for r in rows} == {"segment", "end-to-end"}


def test_cuda_graph_replay_equals_eager(engine_bundles):
    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.engines.backends.tensorrt import open_generator as open_trt_generator

    bundle = Bundle.load(engine_bundles["fp32"])
    plan, request = bundle.plan("ilf-4"), Request(prompt="a red circle", seed=4)
    eager = open_trt_generator(bundle).generate_latents(plan, request).cpu().numpy()
    graphed = open_trt_generator(bundle, cuda_graphs=True)
    first = graphed.generate_latents(plan, request).cpu().numpy()  # captures
    second = graphed.generate_latents(plan, request).cpu().numpy()  # replays
    assert graphed.segments.graph_failures == []
    assert sum(g is not None for g in graphed.segments._graphs.values()) > 0
    np.testing.assert_allclose(first, eager, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(second, first)


def test_engines_from_another_environment_are_refused(engine_bundles, tmp_path):
    from ilf_deploy.core.runtime.bundle import Bundle, rewrite_manifest
    from ilf_deploy.engines.backends.tensorrt import EngineMismatch
    from ilf_deploy.engines.backends.tensorrt import open_generator as open_trt_generator

    path = shutil.copytree(engine_bundles["dit"], tmp_path / "moved")

    def older(manifest: dict) -> None:
        manifest["engines"]["base"]["tensorrt"] = "9.0.0"

    rewrite_manifest(path, older)
    with pytest.raises(EngineMismatch, match="rebuild"):
        open_trt_generator(Bundle.load(path))


def test_bench_table(engine_bundles, capsys):
    """Prints the per-plan latency table for TensorRT (eager and CUDA graphs) and ONNX Runtime."""
    from ilf_deploy.checks.bench import bench_plans, summary
    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.engines.backends import open_generator
    from ilf_deploy.engines.backends.tensorrt import open_generator as open_trt_generator

    bundle = Bundle.load(engine_bundles["fp32"])
    plans = [bundle.plan(p) for p in bundle.plan_names]
    request = Request(prompt="a red circle")
    rows = {
        "tensorrt": summary(bench_plans(open_trt_generator(bundle), plans, request, runs=3)),
        "tensorrt+graphs": summary(
            bench_plans(open_trt_generator(bundle, cuda_graphs=True), plans, request, runs=3)
        ),
        "onnxruntime": summary(bench_plans(open_generator(bundle.path), plans, request, runs=3)),
    }
    with capsys.disabled():
        print("\nbackend            plan      ms     speedup")
        for backend, results in rows.items():
            for r in results:
                speedup = r.get("measured_speedup", 1.0)
                print(f"{backend:<18} {r['plan']:<8} {r['latency_s'] * 1000:7.1f} {speedup:6.2f}x")
        print(json.dumps({k: [r["latency_s"] for r in v] for k, v in rows.items()}))
    assert all(r["latency_s"] > 0 for v in rows.values() for r in v)
