"""One backend contract: the registry, request defaults decided once, verify at every resolution,
`verify --model` on a bundle without its model (issue: "One backend contract")."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.checks.bench import bench_plans
from ilf_deploy.checks.verify.bundle import verify_bundle
from ilf_deploy.cli import app
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle, BundleError
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.engines import backends
from ilf_deploy.engines.backends import Backend, backend_names, open_generator, register
from ilf_deploy.engines.compare import ShapeMismatch, metrics
from ilf_deploy.model.tiny import make_tiny_pipeline

SIZES = [(48, 48), (48, 32)]
SIZES_1024 = [(96, 96), (96, 64)]  # the 1024-style tiny model patches 2x2 latents: multiples of 32
PROMPT = Request(prompt="a small red circle at the top left", seed=3)


def relative_l2(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.fixture(scope="module")
def sized_bundles(tiny_dirs, tmp_path_factory):
    """Bundles built at two sizes, neither the model's own (32x32): with and without size conditions,
    and one without its torch model."""
    root = tmp_path_factory.mktemp("sized")
    options = BuildOptions(plans=("base-4", "ilf-4"), resolutions=SIZES)
    return {
        "pixart-alpha": build_bundle(tiny_dirs["pixart-alpha"], root / "alpha", options),
        "pixart-alpha-1024": build_bundle(
            tiny_dirs["pixart-alpha-1024"],
            root / "alpha1024",
            BuildOptions(plans=("base-4", "ilf-4"), resolutions=SIZES_1024),
        ),
        "no-model": build_bundle(
            tiny_dirs["pixart-alpha"],
            root / "nomodel",
            BuildOptions(plans=("base-4", "ilf-4"), resolutions=SIZES, copy_model=False),
        ),
    }


@pytest.mark.parametrize("name", ["pixart-alpha", "pixart-alpha-1024"])
def test_verify_passes_at_every_bundled_resolution(sized_bundles, name):
    bundle = Bundle.load(sized_bundles[name])
    checks = verify_bundle(bundle)
    assert all(c.ok for c in checks), [c for c in checks if not c.ok]
    sizes = {f"{h}x{w}" for h, w in bundle.manifest.resolutions}
    assert len(sizes) == 2
    end_to_end = {(c.name, c.size) for c in checks if c.kind == "end-to-end"}
    assert end_to_end == {(plan, size) for plan in ("base-4", "ilf-4") for size in sizes}
    for kind in ("segment (random)", "segment (trajectory)"):
        assert {c.size for c in checks if c.label == kind} == sizes


def test_default_size_is_the_bundles_on_every_backend(sized_bundles):
    ort = open_generator(sized_bundles["pixart-alpha"])
    torch_gen = open_generator(sized_bundles["pixart-alpha"], backend="torch")
    plan = ort.bundle.plan("ilf-4")
    got = ort.latents_to_numpy(ort.generate_latents(plan, PROMPT))
    want = torch_gen.latents_to_numpy(torch_gen.generate_latents(plan, PROMPT))
    factor = ort.facts.vae_scale_factor
    # 48x48 px: the bundle's first size, not the model's own 32x32
    assert got.shape == want.shape == (1, 4, 48 // factor, 48 // factor)
    assert relative_l2(got, want) <= 1e-4
    resolved = torch_gen.resolve(PROMPT)
    assert (resolved.height, resolved.width, resolved.guidance_scale) == (48, 48, 4.5)
    assert ort.resolve(PROMPT) == resolved


def test_cli_generate_without_size_agrees_across_backends(sized_bundles, tmp_path):
    runner = CliRunner()
    latents = {}
    for backend in ("onnxruntime", "torch"):
        out = tmp_path / f"{backend}.npy"
        result = runner.invoke(
            app,
            [
                "generate",
                str(sized_bundles["pixart-alpha"]),
                "--plan",
                "base-4",
                "--prompt",
                "a blue square",
                "--backend",
                backend,
                "--latents-out",
                str(out),
            ],
        )
        assert result.exit_code == 0, result.output
        latents[backend] = np.load(out)
    factor = Bundle.load(sized_bundles["pixart-alpha"]).model.vae_scale_factor
    assert latents["torch"].shape == latents["onnxruntime"].shape == (1, 4, 48 // factor, 48 // factor)
    assert relative_l2(latents["onnxruntime"], latents["torch"]) <= 1e-4


def test_guidance_default_is_decided_per_architecture(tiny_bundles):
    assert open_generator(tiny_bundles["dit"]).resolve(Request(class_label=1)).guidance_scale == 4.0
    assert open_generator(tiny_bundles["pixart-sigma"]).resolve(Request()).guidance_scale == 4.5
    assert open_generator(tiny_bundles["dit"]).resolve(Request(guidance_scale=1.0)).guidance_scale == 1.0


def test_a_size_outside_the_bundle_is_refused_on_every_backend(sized_bundles):
    plan = Bundle.load(sized_bundles["pixart-alpha"]).plan("base-4")
    for backend in ("onnxruntime", "torch"):
        generator = open_generator(sized_bundles["pixart-alpha"], backend=backend)
        with pytest.raises(ConfigError, match="built for 48x48, 48x32, not 32x32"):
            generator.generate_latents(plan, Request(prompt="x", height=32, width=32))


def test_verify_model_checks_a_bundle_built_without_its_model(sized_bundles, tiny_dirs):
    bundle = Bundle.load(sized_bundles["no-model"])
    with pytest.raises(BundleError, match="--model"):
        verify_bundle(bundle)
    checks = verify_bundle(bundle, model=str(tiny_dirs["pixart-alpha"]))
    assert checks and all(c.ok for c in checks)


def test_verify_model_refuses_another_model_in_one_line(sized_bundles, tmp_path):
    other = make_tiny_pipeline("pixart-alpha", tmp_path / "other", seed=1, num_layers=4)
    result = CliRunner().invoke(app, ["verify", str(sized_bundles["no-model"]), "--model", str(other)])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "not the model this bundle was built from" in lines[0], result.output


def test_a_shape_mismatch_is_an_error_naming_both_shapes():
    with pytest.raises(ShapeMismatch, match=r"\(1, 4, 6, 4\).*\(1, 4, 6, 6\)"):
        metrics(np.zeros((1, 4, 6, 4)), np.zeros((1, 4, 6, 6)), "end-to-end base-4")


def test_registry_names_and_unknown_backend(tiny_bundles):
    assert {"onnxruntime", "torch", "tensorrt"} <= set(backend_names())
    with pytest.raises(ConfigError, match="unknown backend 'nope'; choose from onnxruntime"):
        open_generator(tiny_bundles["dit"], backend="nope")
    with pytest.raises(ConfigError, match="runs on a bundle engine"):
        open_generator(tiny_bundles["dit"], backend="torch", variant="int8_dynamic")
    with pytest.raises(ConfigError, match="is for the torch backend"):
        open_generator(tiny_bundles["dit"], backend="onnxruntime", device="cuda")


@pytest.fixture
def counting_backend():
    from tests import fake_backend

    register(Backend("counting", "tests.fake_backend", "ORT with a call counter (tests)"))
    fake_backend.CALLS.clear()
    yield fake_backend.CALLS
    backends.REGISTRY.pop("counting")


def test_a_registered_backend_is_picked_up_by_the_library_and_the_cli(
    counting_backend, tiny_bundles, tmp_path
):
    generator = open_generator(tiny_bundles["pixart-alpha"], backend="counting")
    assert generator.backend == "counting"
    plan = generator.bundle.plan("ilf-4")
    ours = generator.generate_latents(plan, PROMPT)
    reference = open_generator(tiny_bundles["pixart-alpha"]).generate_latents(plan, PROMPT)
    np.testing.assert_array_equal(ours, reference)
    assert counting_backend["feedback"] == len(plan.feedback_steps)
    counting_backend.clear()
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(tiny_bundles["pixart-alpha"]),
            "--backend",
            "counting",
            "--prompt",
            "a cat",
            "--plan",
            "base-4",
            "--out",
            str(tmp_path / "x.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert counting_backend["vae_decoder"] == 1 and counting_backend["text_encoder"] >= 1


@pytest.mark.parametrize("backend", ["onnxruntime", "torch"])
def test_every_backend_reports_stage_times(tiny_bundles, backend):
    generator = open_generator(tiny_bundles["pixart-alpha"], backend=backend)
    plan = Bundle.load(tiny_bundles["pixart-alpha"]).plan("ilf-4")
    [result] = bench_plans(generator, [plan], PROMPT, runs=1, warmup=0)
    assert result.stages["text_encoder"][0] >= 1 and result.stages["vae_decoder"][0] == 1
    assert result.stages["embed"][0] == plan.num_steps
    assert all(seconds >= 0 for _, seconds in result.stages.values())


def test_a_missing_segment_input_is_named(tiny_bundles):
    generator = open_generator(tiny_bundles["dit"])
    with pytest.raises(BundleError, match=r"segment embed needs inputs \['pos_embed'\]"):
        generator.segments.run("embed", {"latents": np.zeros((1, 4, 4, 4), np.float32)})


def test_backends_command_lists_the_registry():
    import json

    result = CliRunner().invoke(app, ["backends", "--json"])
    assert result.exit_code == 0, result.output
    rows = {row["name"]: row for row in json.loads(result.output)}
    assert list(rows) == backend_names()
    assert rows["onnxruntime"]["installed"] is True
    assert rows["onnxruntime"]["install"] == "pip install 'ilf-deploy[onnx]'"
    from ilf_deploy.engines.backends.tensorrt import tensorrt_available

    assert rows["tensorrt"]["installed"] is tensorrt_available()  # the stubs alone do not count


def test_the_compiled_torch_engine_matches_eager(tiny_bundles, tmp_path):
    """`torch.compile` (Inductor) on every block and the feedback block: the same latents as eager
    torch, its generated code cached in the bundle (a later process compiles from the cache)."""
    import shutil

    import torch

    from ilf_deploy.engines.backends.pytorch import COMPILE_CACHE_DIR

    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "bundle")
    plan, request = Bundle.load(path).plan("ilf-4"), Request(prompt="a red circle", seed=3)
    eager = open_generator(path, "torch")
    compiled = open_generator(path, "torch", compile=True)
    with torch.inference_mode():
        want = eager.latents_to_numpy(eager.generate_latents(plan, request))
        got = compiled.latents_to_numpy(compiled.generate_latents(plan, request))
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4
    blocks = compiled.model.adapter.blocks
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks)  # really compiled
    assert (path / COMPILE_CACHE_DIR).is_dir() and any((path / COMPILE_CACHE_DIR).iterdir())
    Bundle.load(path)  # the cache is not a manifest file: the bundle still verifies
