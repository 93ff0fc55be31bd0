"""The C++ runtime (cpp/) on a Sana bundle (schema 5: a prompt format; a token-grid state; the text
encoder returns the mask it keeps) against the Python runtime on the same engine (OpenVINO, f32
pinned), from the same latents and the same token ids (--token-ids: the prompt's row with the
instruction, instruction_max_length long; the negative prompt's without, max_length long): every plan
kind at both sizes, and the refusals in one line. Prompts: the Gemma tokenizer converted by
openvino-tokenizers (padded to instruction_max_length; a negative prompt's ids are its first
max_length) gives the Python runtime's ids, and ilf-run --prompt its latents; a bundle without it
refuses a prompt pointing to --token-ids.

`make cpp` builds and installs the binary; these tests skip where it is absent and cannot be built,
as tests/test_cpp.py does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from tokenizers import Tokenizer

from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.engines.backends import open_generator

from .conftest import SANA_PLANS, SANA_SIZES
from .test_cpp import _binary, one_line_error, png_pixels, rel_l2, run
from .test_cpp_mmdit import edited_copy

PROMPT = "a small red circle at the top left on a blue background"
TOLERANCE = 1e-5  # relative L2 of the final latents


@pytest.fixture(scope="module")
def ilf_run() -> Path:
    return _binary()


def token_row(bundle: Path, text: str, negative: bool) -> dict[str, list[int]]:
    """One --token-ids row from the bundle's tokenizer file with the `tokenizers` library, as
    core/runtime/pipeline.py makes it (lower-cased; the instruction before a prompt, not a negative one)."""
    spec = json.loads((bundle / "manifest.json").read_text())["tokenizer"]
    text = text.lower().strip()
    length = spec["max_length"] if negative else spec["instruction_max_length"]
    if not negative:
        text = spec["instruction"] + text
    tokenizer = Tokenizer.from_file(str(bundle / spec["file"]))
    tokenizer.enable_truncation(length)
    tokenizer.enable_padding(
        length=length, pad_id=spec["pad_id"], pad_token=tokenizer.id_to_token(spec["pad_id"])
    )
    encoding = tokenizer.encode(text)
    return {"ids": encoding.ids, "mask": encoding.attention_mask}


def ids_file(bundle: Path, path: Path, negative: str | None = "") -> Path:
    """[negative; prompt] rows (or the prompt's alone), ids and attention masks."""
    rows = ([token_row(bundle, negative, True)] if negative is not None else []) + [
        token_row(bundle, PROMPT, False)
    ]
    path.write_text(
        json.dumps({"input_ids": [r["ids"] for r in rows], "attention_mask": [r["mask"] for r in rows]})
    )
    return path


def test_final_latents_and_images_match_the_python_runtime(ilf_run, sana_bundle, tmp_path):
    """Every plan kind at both sizes, guided (4.5: the negative prompt's own ids), from the same
    latents: final latents within 1e-5, the block forwards that ran and the decoded pixels equal."""
    generator = open_generator(sana_bundle, "openvino", variant="f32")
    bundle = generator.bundle
    ids = ids_file(sana_bundle, tmp_path / "ids.json")
    rng = np.random.default_rng(11)
    worst = 0.0
    for height, width in SANA_SIZES:
        request = Request(prompt=PROMPT, height=height, width=width)
        shape = (1, bundle.model.latent_channels, *generator.latent_size(request))
        latents = rng.standard_normal(shape, dtype=np.float32)
        np.save(tmp_path / "in.npy", latents)
        for plan in SANA_PLANS:
            want = generator.latents_to_numpy(generator.generate_latents(bundle.plan(plan), request, latents))
            ran = generator.last_block_forwards
            image = generator.decode(want)[0]
            name = f"{plan}-{height}x{width}"
            out, png, report = tmp_path / f"{name}.npy", tmp_path / f"{name}.png", tmp_path / f"{name}.json"
            args = ["--plan", plan, "--token-ids", ids, "--height", height, "--width", width]
            args += ["--latents-in", tmp_path / "in.npy", "--latents-out", out, "--out", png]
            run(ilf_run, sana_bundle, *args, "--json", report, "-q")
            got = np.load(out)
            assert got.shape == want.shape == shape
            error = rel_l2(got, want)
            worst = max(worst, error)
            assert error <= TOLERANCE, (plan, height, width, error)
            assert json.loads(report.read_text())["runs"][0]["block_forwards"] == ran, plan
            assert np.array_equal(png_pixels(png), image), (plan, height, width)
    print(f"sana: largest relative L2 {worst:.3g}")


def test_unguided_prompt_alone(ilf_run, sana_bundle, tmp_path):
    """--guidance-scale 1 with the prompt's row alone: no negative prompt is encoded."""
    generator = open_generator(sana_bundle, "openvino", variant="f32")
    request = Request(prompt=PROMPT, guidance_scale=1.0)
    latents = np.random.default_rng(2).standard_normal((1, 32, 8, 8), dtype=np.float32)
    np.save(tmp_path / "in.npy", latents)
    want = generator.latents_to_numpy(
        generator.generate_latents(generator.bundle.plan("ilf-4"), request, latents)
    )
    ids = ids_file(sana_bundle, tmp_path / "ids.json", negative=None)
    out = tmp_path / "out.npy"
    run(ilf_run, sana_bundle, "--plan", "ilf-4", "--token-ids", ids, "--guidance-scale", 1, "--latents-in",
        tmp_path / "in.npy", "--latents-out", out, "-q", "--out", tmp_path / "x.png")  # fmt: skip
    assert rel_l2(np.load(out), want) <= TOLERANCE


def test_rows_of_the_wrong_length_are_one_line(ilf_run, sana_bundle, tmp_path):
    manifest = json.loads((sana_bundle / "manifest.json").read_text())["tokenizer"]
    negative, prompt = token_row(sana_bundle, "", True), token_row(sana_bundle, PROMPT, False)
    swapped = tmp_path / "swapped.json"  # both the same length: the prompt's without its instruction
    swapped.write_text(json.dumps({"input_ids": [negative["ids"], negative["ids"]]}))
    result = run(ilf_run, sana_bundle, "--token-ids", swapped, "--out", tmp_path / "x.png", check=False)
    one_line_error(result, f"must be {manifest['instruction_max_length']} ids long")
    short = tmp_path / "short.json"
    short.write_text(json.dumps({"input_ids": [prompt["ids"][:10], prompt["ids"]]}))
    result = run(ilf_run, sana_bundle, "--token-ids", short, "--out", tmp_path / "x.png", check=False)
    one_line_error(result, f"must be {manifest['max_length']} ids long")


def test_the_converted_tokenizer_gives_the_python_ids(sana_bundle):
    """The manifest's `tokenizer.openvino`, run by OpenVINO with the openvino_tokenizers extension (as
    ilf-run does): an instructed prompt's ids and mask in full, a negative prompt's in its first
    max_length, equal to the Python runtime's."""
    openvino = pytest.importorskip("openvino")
    pytest.importorskip("openvino_tokenizers")  # registers the tokenizer operations with OpenVINO
    spec = json.loads((sana_bundle / "manifest.json").read_text())["tokenizer"]
    compiled = openvino.Core().compile_model(str(sana_bundle / spec["openvino"]), "CPU")
    for text in (PROMPT, "", "  Two BLUE squares,\tat the bottom-right!  ", "xyzzy über café", "red " * 600):
        for negative in (False, True):
            want = token_row(sana_bundle, text, negative)
            prompt = text.lower().strip() if negative else spec["instruction"] + text.lower().strip()
            got = compiled([np.array([prompt])])
            size = len(want["ids"])
            assert got["input_ids"][0, :size].tolist() == want["ids"], (text, negative)
            assert got["attention_mask"][0, :size].tolist() == want["mask"], (text, negative)


def test_a_prompt_gives_the_latents_of_the_python_runtime(ilf_run, sana_bundle, tmp_path):
    """ilf-run --prompt and --negative-prompt through the converted tokenizer vs the Python OpenVINO
    f32 runtime from the same latents; a prompt longer than the model reads refused in one line; a
    bundle without the converted tokenizer refuses a prompt pointing to --token-ids."""
    generator = open_generator(sana_bundle, "openvino", variant="f32")
    negative = "Blurry, LOW quality"
    request = Request(prompt=PROMPT, negative_prompt=negative)
    latents = np.random.default_rng(3).standard_normal((1, 32, 8, 8), dtype=np.float32)
    np.save(tmp_path / "in.npy", latents)
    want = generator.latents_to_numpy(
        generator.generate_latents(generator.bundle.plan("ilf-4"), request, latents)
    )
    out = tmp_path / "out.npy"
    args = ["--plan", "ilf-4", "--prompt", PROMPT, "--negative-prompt", negative, "-q"]
    run(
        ilf_run,
        sana_bundle,
        *args,
        "--latents-in",
        tmp_path / "in.npy",
        "--latents-out",
        out,
        "--out",
        tmp_path / "x.png",
    )
    assert rel_l2(np.load(out), want) <= TOLERANCE
    long = run(ilf_run, sana_bundle, "--prompt", "red " * 600, "--out", tmp_path / "y.png", check=False)
    one_line_error(long, "prompt")
    (tmp_path / "copy").mkdir()
    unconverted = edited_copy(sana_bundle, tmp_path / "copy", lambda m: m["tokenizer"].pop("openvino"))
    result = run(ilf_run, unconverted, "--prompt", PROMPT, "--out", tmp_path / "z.png", check=False)
    one_line_error(result, "this bundle has no OpenVINO tokenizer (manifest tokenizer.openvino")
