"""Sana bundles: Gemma-2 with SanaPipeline's prompt handling, the token-grid transformer segments
and the DC-AE decoder exported with torch.export, one bundle at two resolutions; the torch runner,
ONNX Runtime and OpenVINO f32 against diffusers' `SanaPipeline` (with classifier-free guidance:
the negative prompt is encoded without the instruction), every plan kind against the reference
runner, the manifest (schema 5), `verify`, and an edited bundle refused."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ilf_deploy.cli import app
from ilf_deploy.core.runtime.bundle import Bundle, BundleError
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.engines.backends.pytorch import TorchGenerator
from ilf_deploy.model.loading import sana_prompt_format

from .conftest import SANA_PLANS, SANA_SIZES
from .test_mmdit_bundles import verify_passes_and_an_edit_is_refused

PROMPT = "a small red circle at the top left on a blue background"
ENGINES = ("torch", "onnxruntime", "openvino")


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def generators(sana_bundle):
    return {engine: open_generator(sana_bundle, engine) for engine in ENGINES}


@pytest.mark.parametrize("engine", ENGINES)
@torch.no_grad()
def test_bundle_engines_match_the_sana_pipeline(sana_model, sana_bundle, generators, engine):
    """base-4 from the same latents at both sizes of one bundle, guided (4.5): final latents within
    1e-4 relative L2 of `SanaPipeline(..., output_type="latent")`."""
    generator = generators[engine]
    plan = Bundle.load(sana_bundle).plan("base-4")
    for height, width in SANA_SIZES:
        request = generator.resolve(Request(prompt=PROMPT, seed=3, height=height, width=width))
        assert request.guidance_scale == 4.5
        latents = generator.initial_latents(request)
        got = torch.from_numpy(generator.latents_to_numpy(generator.generate_latents(plan, request, latents)))
        expected = sana_model.text_pipeline(
            PROMPT,
            num_inference_steps=4,
            guidance_scale=4.5,
            latents=torch.from_numpy(latents),
            height=height,
            width=width,
            use_resolution_binning=False,
            output_type="latent",
        ).images
        assert got.shape == expected.shape == (1, 32, height // 32, width // 32)
        error = relative_l2(got, expected)
        print(f"sana {engine} {height}x{width}: relative L2 {error:.3g} vs SanaPipeline")
        assert error <= 1e-4, (engine, height, width)


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_text_encoder_segment_is_encode_prompt(sana_model, generators, engine):
    """The exported Gemma-2 + select-index on the bundle tokenizer's ids equals the pipeline's
    `encode_prompt` for a prompt (instructed, longer ids) and a negative prompt (plain)."""
    generator, reference = generators[engine], TorchGenerator(sana_model)
    for negative in (False, True):
        got = generator.encode_cached(PROMPT, negative=negative)
        want = reference.encode_cached(PROMPT, negative=negative)
        embeds = torch.from_numpy(generator.latents_to_numpy(got["prompt_embeds"]))
        assert embeds.shape == want["prompt_embeds"].shape == (1, 300, 32)
        assert relative_l2(embeds, want["prompt_embeds"]) <= 1e-5, negative
        mask = np.asarray(generator.segments.to_numpy(got["prompt_mask"]))
        assert mask.tolist() == want["prompt_mask"].tolist(), negative


@pytest.mark.parametrize("spec", SANA_PLANS[1:])
@torch.no_grad()
def test_every_plan_kind_matches_the_reference_runner(sana_model, sana_bundle, generators, spec):
    bundle = Bundle.load(sana_bundle)
    plan = bundle.plan(spec)
    reference = TorchGenerator(sana_model)
    height, width = SANA_SIZES[1]
    request = reference.resolve(Request(prompt=PROMPT, seed=8, height=height, width=width))
    want = reference.generate_latents(plan, request).float()
    for engine in ("onnxruntime", "openvino"):
        generator = generators[engine]
        got = torch.from_numpy(generator.latents_to_numpy(generator.generate_latents(plan, request)))
        assert relative_l2(got, want) <= 1e-4, engine
    image = generators["openvino"].decode(generators["openvino"].generate_latents(plan, request))
    assert image.shape == (1, height, width, 3) and np.ptp(image) > 0


def test_decoder_matches_the_vae(sana_model, generators):
    """The exported DC-AE decoder = AutoencoderDC.decode(latents / scaling_factor), as the pipeline."""
    latents = np.random.default_rng(0).standard_normal((1, 32, 10, 6), dtype=np.float32)
    want = TorchGenerator(sana_model).decode(latents).astype(int)
    for engine in ("onnxruntime", "openvino"):
        got = generators[engine].decode(latents).astype(int)
        assert got.shape == (1, 320, 192, 3) and np.abs(got - want).max() <= 1, engine


def test_bundle_format_says_what_it_holds(sana_bundle):
    manifest = json.loads((sana_bundle / "manifest.json").read_text())
    assert manifest["schema_version"] == 7 and manifest["architecture"] == "sana"  # 5, and `cross_kv`
    fmt = sana_prompt_format()
    tokenizer = manifest["tokenizer"]
    assert tokenizer["instruction"] == fmt.instruction and tokenizer["max_length"] == 300
    assert tokenizer["instruction_max_length"] > 300
    assert manifest["resolutions"] == [list(s) for s in SANA_SIZES]
    assert manifest["latent_sizes"] == [[8, 8], [10, 6]]
    segments = manifest["segments"]
    text = segments["text_encoder"]
    assert [t["name"] for t in text["outputs"]] == ["prompt_embeds", "prompt_mask"]
    assert text["inputs"][0]["shape"] == ["batch", "text_tokens"]  # instructed prompts are longer
    blocks = next(s for s in segments.values() if s["blocks"])
    hidden = next(t for t in blocks["inputs"] if t["name"] == "hidden")
    assert hidden["shape"] == ["batch", "grid_height", "grid_width", 16]  # one graph, every size
    assert "pos_embed" not in [t["name"] for t in segments["embed"]["inputs"]]
    assert not (sana_bundle / "positions").exists()


def test_bundle_refuses_a_size_it_was_not_built_for(generators):
    with pytest.raises(Exception, match="built for"):
        generators["onnxruntime"].generate_latents(
            Bundle.load(generators["onnxruntime"].bundle.path).plan("base-4"),
            Request(prompt=PROMPT, height=192, width=192),
        )


def test_verify_passes_and_an_edited_bundle_is_refused(sana_bundle, tmp_path):
    verify_passes_and_an_edit_is_refused(sana_bundle, "text_encoder.onnx", tmp_path)


def test_generate_cli_writes_an_image(sana_bundle, tmp_path):
    out = tmp_path / "x.png"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(sana_bundle),
            "--prompt",
            PROMPT,
            "--plan",
            "ilf-4",
            "--height",
            "320",
            "--width",
            "192",
            "-o",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    from PIL import Image

    with Image.open(out) as image:
        assert image.size == (192, 320)


def test_tensorrt_profiles_cover_every_segment(sana_bundle):
    """The TensorRT layer's optimization profiles (never run here) know every dimension a Sana bundle
    declares: batch, the token grid's height and width, the text encoder's ids (a negative prompt's
    max_length .. an instructed prompt's length)."""
    from ilf_deploy.engines.backends.tensorrt import input_profile

    manifest = Bundle.load(sana_bundle).manifest
    for spec in manifest.segments.values():
        profile = input_profile(manifest, spec)
        assert set(profile) == set(spec.input_names)
    low, opt, high = input_profile(manifest, manifest.block_segments[0])["hidden"]
    assert (low[1:3], opt[1:3], high[1:3]) == ((8, 6), (8, 8), (10, 8))  # grids 8x8 and 10x6
    low, opt, high = input_profile(manifest, manifest.segments["text_encoder"])["input_ids"]
    longest = manifest.tokenizer.instruction_max_length
    assert (low[1], opt[1], high[1]) == (300, longest, longest)


@pytest.mark.parametrize("mode", ["int8-dynamic", "int8-ov"])
def test_int8_variants_stay_within_their_budgets(sana_bundle, mode, tmp_path):
    """int8-dynamic (ONNX Runtime) and int8-ov (OpenVINO, calibrated on plan trajectories) find
    Sana's linear layers and pass verify-variant."""
    from ilf_deploy.build.quantization.calibration import collect_calibration
    from ilf_deploy.build.quantization.quantize import quantize_bundle, verify_variant

    path = shutil.copytree(sana_bundle, tmp_path / "bundle")
    if mode == "int8-ov":
        collect_calibration(path, "ilf-4", ["a red circle", "a blue square on grass"], max_samples=4)
    entry = quantize_bundle(path, mode)
    assert sum(entry["quantized_layers"].values()) >= 6 * 4  # every block's attention projections at least
    rows = verify_variant(Bundle.load(path), mode.replace("-", "_"), plan="ilf-4")
    assert rows and all(row.ok for row in rows), [row for row in rows if not row.ok]


def test_serve_answers_a_request(sana_bundle, generators):
    """`serve` on a Sana bundle: a 320x192 generation, the pixels the engine computes directly."""
    from fastapi.testclient import TestClient

    from ilf_deploy.serving.serve import ServeOptions, create_app

    from .test_serve import GEN, png, wait_ready

    generator = generators["onnxruntime"]
    with TestClient(create_app(sana_bundle, ServeOptions(max_n=1), generator)) as client:
        wait_ready(client)
        body = {
            "prompt": PROMPT,
            "seed": 5,
            "plan": "ilf-4",
            "size": "192x320",
            "response_format": "b64_json",
        }
        response = client.post(GEN, json=body)
        assert response.status_code == 200, response.text
        served = png(response.json()["data"][0]["b64_json"])
    plan = Bundle.load(sana_bundle).plan("ilf-4")
    request = Request(PROMPT, seed=5, height=320, width=192)
    direct = generator.decode(generator.generate_latents(plan, request))[0]
    assert served.shape == (320, 192, 3) and np.abs(served.astype(int) - direct.astype(int)).max() <= 1


def test_a_prompt_format_needs_schema_5(sana_bundle):
    """A manifest that says 4 but carries `tokenizer.instruction` breaks the schema (a reader of 4
    would encode prompts without the instruction), and the instruction needs its length."""
    from ilf_deploy.core.runtime.manifest import Manifest
    from ilf_deploy.core.schemas import problem

    raw = json.loads((sana_bundle / "manifest.json").read_text())
    assert problem("manifest", raw) is None
    older = {**raw, "schema_version": 4}
    assert "tokenizer" in str(problem("manifest", older))
    with pytest.raises(BundleError, match="manifest schema"):
        Manifest.parse(older)
    lengthless = json.loads(json.dumps(raw))
    del lengthless["tokenizer"]["instruction_max_length"]
    assert problem("manifest", lengthless) is not None
