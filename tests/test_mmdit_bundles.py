"""SD3 and Flux.1 (dev, schnell) bundles: exported with torch.export, run by ONNX Runtime and
OpenVINO f32, checked against diffusers' own pipelines at two sizes (Flux: two shifts), every plan
kind against the reference runner, `verify`, and edits refused."""

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

from .conftest import MMDIT_FAMILIES, MMDIT_SIZES
from .test_mmdit import PROMPT, diffusers_latents, relative_l2

FAMILIES = MMDIT_FAMILIES
SIZES = MMDIT_SIZES
ENGINES = ("onnxruntime", "openvino")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("engine", ENGINES)
def test_bundle_engines_match_the_diffusers_pipeline(mmdit_models, mmdit_bundles, family, engine):
    model = mmdit_models[family]
    generator = open_generator(mmdit_bundles[family], engine)
    plan = Bundle.load(mmdit_bundles[family]).plan("base-4")
    for height, width in SIZES:
        request = generator.resolve(Request(prompt=PROMPT, seed=3, height=height, width=width))
        latents = generator.initial_latents(request)
        got = torch.from_numpy(generator.latents_to_numpy(generator.generate_latents(plan, request, latents)))
        with torch.no_grad():
            expected = diffusers_latents(model, latents, 4, (height, width), request.guidance_scale)
        assert relative_l2(got, expected) <= 1e-4, (height, width)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("spec", ["ilf-4", "cache-6", "base-4-adapt1-4t0.3m2"])
def test_every_plan_kind_matches_the_reference_runner(mmdit_models, mmdit_bundles, family, spec):
    bundle = Bundle.load(mmdit_bundles[family])
    plan = bundle.plan(spec)
    reference = TorchGenerator(mmdit_models[family])
    request = reference.resolve(Request(prompt=PROMPT, seed=8, height=64, width=32))
    with torch.no_grad():
        want = reference.generate_latents(plan, request).float()
    for engine in ENGINES:
        generator = open_generator(mmdit_bundles[family], engine)
        got = torch.from_numpy(generator.latents_to_numpy(generator.generate_latents(plan, request)))
        assert relative_l2(got, want) <= 1e-4, engine
        image = generator.decode(generator.generate_latents(plan, request))
        assert image.shape == (1, 64, 32, 3) and np.ptp(image) > 0


def test_bundle_format_says_what_it_holds(mmdit_bundles):
    flux = json.loads((mmdit_bundles["flux"] / "manifest.json").read_text())
    converted = "openvino" in flux["tokenizers"][0]  # where openvino-tokenizers converts them: 6
    assert flux["schema_version"] == (6 if converted else 4)
    assert flux["model"]["state"] == ["hidden", "text"] and flux["model"]["token_layout"] == "packed"
    assert flux["model"]["guidance"] == "embedded" and flux["tokenizer"] is None
    assert [t["input"] for t in flux["tokenizers"]] == ["input_ids", "input_ids_2"]
    blocks = [s for s in flux["segments"].values() if s["blocks"]]
    inside = [s for s in blocks if any(t["name"] == "text_feed" for t in s["inputs"])]
    assert inside and all({t["name"] for t in s["outputs"]} == {"hidden_out", "text_out"} for s in blocks)
    plan = json.loads((mmdit_bundles["flux"] / "plans" / "ilf-4.json").read_text())
    assert plan["version"] == 3 and sorted(plan["schedules"]) == ["16", "32"]
    sd3 = json.loads((mmdit_bundles["sd3"] / "manifest.json").read_text())
    assert len(sd3["tokenizers"]) == 3 and sd3["model"]["guidance"] == "cfg"
    schnell = json.loads((mmdit_bundles["flux-schnell"] / "plans" / "ilf-4.json").read_text())
    assert schnell["version"] == 1  # one schedule for every size


@pytest.mark.parametrize("family", FAMILIES)
def test_verify_passes_and_an_edited_bundle_is_refused(mmdit_bundles, family, tmp_path):
    """Every segment far inside the 1e-4 budget: the exporter's graphs unoptimized, their constants
    from torch (`time` was 2e-6 to 1.7e-5 with onnxscript's rewrites and numpy-folded constants; the
    worst segment now is the T5 text encoder, 1.9e-6)."""
    rows = verify_passes_and_an_edit_is_refused(mmdit_bundles[family], "feedback.onnx", tmp_path)
    worst: dict[str, float] = {}  # per segment, over sizes and random/trajectory inputs
    for row in rows:
        if row["kind"] == "segment":
            worst[row["name"]] = max(worst.get(row["name"], 0.0), row["metrics"]["rel_l2"])
    assert set(worst) >= {"time", "text_encoder", "vae_decoder", "feedback"}
    assert worst["time"] <= 5e-7 and max(worst.values()) <= 5e-6, worst


def verify_passes_and_an_edit_is_refused(bundle, segment_file: str, tmp_path) -> list[dict]:
    """`verify` passes; a byte appended to `onnx/SEGMENT_FILE` is refused by the engine and by
    `generate`, in one line (every family: SD3, Flux here, Sana in test_sana_bundles.py). Returns
    verify's rows (`--json-out`)."""
    report = tmp_path / "verify.json"
    result = CliRunner().invoke(app, ["verify", str(bundle), "--json-out", str(report)])
    assert result.exit_code == 0, result.output
    edited = shutil.copytree(bundle, tmp_path / "edited")
    with (edited / "onnx" / segment_file).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        open_generator(edited, "onnxruntime")
    result = CliRunner().invoke(
        app, ["generate", str(edited), "--prompt", "x", "-o", str(tmp_path / "x.png")]
    )
    assert result.exit_code != 0 and "sha256" in result.output and "Traceback" not in result.output
    return json.loads(report.read_text())


def test_flux_refuses_what_it_lacks(mmdit_bundles, tmp_path):
    out = str(tmp_path / "x.png")
    for extra, word in (
        (["--negative-prompt", "blue"], "negative_prompt"),
        (["--class-label", "1"], "class_label"),
        (["--height", "40", "--width", "32"], "40"),
    ):
        result = CliRunner().invoke(
            app, ["generate", str(mmdit_bundles["flux"]), "--prompt", "x", "-o", out, *extra]
        )
        assert result.exit_code != 0 and word in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(
        app,
        ["generate", str(mmdit_bundles["flux-schnell"]), "--prompt", "x", "--guidance-scale", "3", "-o", out],
    )
    assert result.exit_code != 0 and "guidance_scale" in result.output


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_a_prompt_longer_than_t5_reads_is_refused_not_truncated(mmdit_bundles, family, tmp_path):
    """The CLIP encoders read a prompt's first 77 tokens (as in diffusers); what T5 would drop is refused."""
    from ilf_deploy.core.runtime.request import bundle_token_limit

    bundle = Bundle.load(mmdit_bundles[family])
    count, limit = bundle_token_limit(bundle)
    assert count is not None and limit == max(t.max_length for t in bundle.manifest.tokenizers)
    clip = min(t.max_length for t in bundle.manifest.tokenizers)
    words = "a red circle on a blue square".split()
    fits = " ".join(words[i % len(words)] for i in range(4 * limit))
    while count(fits) > limit:  # the longest prompt T5 reads whole: past CLIP's length if T5's is longer
        fits = fits.rsplit(" ", 1)[0]
    assert count(fits) > clip or clip == limit
    out = tmp_path / "x.png"
    ok = CliRunner().invoke(
        app, ["generate", str(bundle.path), "--prompt", fits, "--plan", "base-4", "-o", str(out)]
    )
    assert ok.exit_code == 0, ok.output
    refused = CliRunner().invoke(
        app, ["generate", str(bundle.path), "--prompt", fits + " red red", "-o", str(tmp_path / "y.png")]
    )
    assert refused.exit_code == 2 and "prompt" in refused.output and "token" in refused.output, refused.output
    assert len(refused.output.strip().splitlines()) == 1


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_tensorrt_profiles_cover_every_segment(mmdit_bundles, family):
    """The TensorRT layer's optimization profiles (never run here: no GPU, no TensorRT) know every
    dimension an MMDiT bundle declares: batch, image tokens, rotary tokens = text + image tokens."""
    from ilf_deploy.engines.backends.tensorrt import input_profile

    manifest = Bundle.load(mmdit_bundles[family]).manifest
    for spec in manifest.segments.values():
        profile = input_profile(manifest, spec)
        assert set(profile) == set(spec.input_names)
    blocks = next(s for s in manifest.block_segments if s.blocks)
    low, _, high = input_profile(manifest, blocks)["hidden"]
    assert (low[1], high[1]) == (16, 32)  # 32x32 and 64x32 px: 16 and 32 image tokens


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_int8_variants_stay_within_their_budgets(mmdit_bundles, family, tmp_path):
    """int8-dynamic (ONNX Runtime) and int8-ov (OpenVINO, calibrated on plan trajectories) find the
    MMDiT linear layers (the dynamo exporter's module scopes) and pass verify-variant."""
    from ilf_deploy.build.quantization.calibration import collect_calibration
    from ilf_deploy.build.quantization.quantize import quantize_bundle, verify_variant

    path = shutil.copytree(mmdit_bundles[family], tmp_path / "bundle")
    collect_calibration(path, "ilf-4", ["a red circle", "a blue square on grass"], max_samples=4)
    for mode in ("int8-dynamic", "int8-ov"):
        entry = quantize_bundle(path, mode)
        assert sum(entry["quantized_layers"].values()) >= 10 * 4  # every block's attention and MLP
        rows = verify_variant(Bundle.load(path), mode.replace("-", "_"), plan="ilf-4")
        assert rows and all(row.ok for row in rows), [row for row in rows if not row.ok]
