"""The C++ runtime (cpp/, issue 20): `ilf-run` and the C/C++ API against the Python runtime on the same
engine (OpenVINO, f32 pinned), from the same latents: tiny PixArt-α (with resolution conditions),
PixArt-Σ and DiT bundles at two resolutions, every plan kind (base, ILF, Δ-cache, Δ-DiT, Block
Caching); the embedded default model end to end from --prompt; the reader's refusals in one line.

`make cpp` builds and installs the binary (`make setup` does where a C++ compiler and cmake exist);
these tests skip only where it is absent because this machine cannot build it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from PIL import Image

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.core.plan import block_caching_plan, delta_dit_plan
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.engines.backends import open_generator

ROOT = Path(__file__).resolve().parents[1]
PREFIX = Path(sys.executable).parent.parent  # `make cpp` installs into the venv
ILF_RUN = Path(os.environ.get("ILF_RUN", PREFIX / "bin" / "ilf-run"))
UNIT_TESTS = ROOT / "cpp" / "build" / "ilf-tests"
PROMPT = "A small red circle at the top left"
TOLERANCE = 1e-5  # relative L2 of the final latents (measured: 0, bit-identical)

# Two sizes each, neither the model's own; the α model conditions on the resolution (PixArt 1024-style).
SIZES = {
    "pixart-alpha-1024": [(96, 96), (96, 64)],
    "pixart-sigma": [(48, 48), (48, 32)],
    "dit": [(32, 32), (48, 48)],
}
PLANS = ("base-4", "ilf-4", "cache-6", "delta-dit-6", "blockcache-4")


def _binary() -> Path:
    if ILF_RUN.is_file():
        return ILF_RUN
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("the C++ runtime is not built: this machine has no C++ compiler or cmake (make cpp)")
    pytest.fail(f"{ILF_RUN} is missing: run `make cpp` (this machine has a C++ compiler and cmake)")


@pytest.fixture(scope="module")
def ilf_run() -> Path:
    return _binary()


def run(binary: Path, *args, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([str(binary), *map(str, args)], capture_output=True, text=True, timeout=300)
    if check and result.returncode != 0:
        raise AssertionError(f"ilf-run {' '.join(map(str, args))}: {result.returncode}\n{result.stderr}")
    return result


def rel_l2(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12))


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.mode == "RGB"
        return np.asarray(image)


def _extra_plans(model, folder: Path) -> list[str]:
    """Δ-DiT and Block-Caching plans (Python builders, no presets) as plan files for the build. Their
    block ranges are chosen to need no segment boundary beyond ilf-4's and cache-6's."""
    config = model.scheduler_config
    delta = delta_dit_plan(6, 6, num_cached=1, refresh_every=2, scheduler_config=config, name="delta-dit-6")
    changes = np.array([[0.0] * 6] + [[0.2, 0.2, 0.06, 0.06, 0.06, 0.3]] * 3)  # blocks 2-4 refresh on step 3
    block = block_caching_plan(changes, 0.15, scheduler_config=config, name="blockcache-4")
    paths = []
    for plan in (delta, block):
        path = folder / f"{plan.name}.json"
        plan.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="module")
def bundles(tiny_dirs, tiny_models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cpp")
    out = {}
    for name, sizes in SIZES.items():
        plans = ("base-4", "ilf-4", "cache-6", *_extra_plans(tiny_models[name], root))
        options = BuildOptions(plans=plans, resolutions=sizes, copy_model=False)
        out[name] = build_bundle(tiny_dirs[name], root / name, options)
    return out


@pytest.fixture(scope="module")
def sigma_copy(bundles, tmp_path_factory):
    """A fresh copy of the PixArt-Σ bundle, for tests that edit one."""

    def copy() -> Path:
        return Path(shutil.copytree(bundles["pixart-sigma"], tmp_path_factory.mktemp("edit") / "bundle"))

    return copy


# -- parity with the Python runtime ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(SIZES))
def test_the_extra_plans_exercise_every_op_kind(bundles, name):
    bundle = Bundle.load(bundles[name])
    assert [tuple(r) for r in bundle.manifest.resolutions] == SIZES[name]  # two sizes, as built
    assert ("cross_kv" in bundle.manifest.segments) == (name != "dit")  # PixArt's caption K/V, once
    kinds = {p: {op.kind for s in bundle.plan(p).steps for op in s.ops} for p in PLANS}
    assert kinds["base-4"] == {"blocks"}
    assert kinds["ilf-4"] >= {"ilf", "blocks"}
    assert kinds["cache-6"] >= {"cache_refresh", "cache_reuse"}
    assert kinds["delta-dit-6"] >= {"cache_refresh", "cache_reuse"}
    assert kinds["blockcache-4"] == {"blocks", "cache_refresh", "cache_reuse"}
    keys = {op.key for s in bundle.plan("delta-dit-6").steps for op in s.ops if op.key}
    assert keys == {"deep", "shallow"}  # the stage switch refreshes the other range


@pytest.mark.parametrize("name", list(SIZES))
def test_final_latents_and_images_match_the_python_runtime(ilf_run, bundles, name, tmp_path):
    """Every plan at both sizes: ilf-run vs the Python OpenVINO f32 runtime from the same latents.
    PixArt: --prompt (the bundle's OpenVINO tokenizer) at the first size, --token-ids (the Python
    tokenizer's ids, [negative; prompt]) at the second; DiT: --class-label."""
    generator = open_generator(bundles[name], "openvino", variant="f32")
    bundle, dit = generator.bundle, name == "dit"
    rng = np.random.default_rng(11)
    for index, (height, width) in enumerate(SIZES[name]):
        negative = "blurry" if index == 0 else ""
        request = Request(prompt=PROMPT, negative_prompt=negative, height=height, width=width)
        args = ["--height", height, "--width", width]
        if dit:
            request = Request(class_label=3, height=height, width=width)
            args += ["--class-label", 3]
        elif index == 0:
            args += ["--prompt", PROMPT, "--negative-prompt", negative]
        else:
            tokens = generator.tokenizer
            ids = [tokens.encode(text.lower().strip()).ids for text in (negative, PROMPT)]
            np.save(tmp_path / "ids.npy", np.array(ids, dtype=np.int64))
            args += ["--token-ids", tmp_path / "ids.npy"]
        shape = (1, bundle.model.latent_channels, *generator.latent_size(request))
        latents = rng.standard_normal(shape, dtype=np.float32)
        np.save(tmp_path / "in.npy", latents)
        for plan in PLANS:
            want = generator.latents_to_numpy(generator.generate_latents(bundle.plan(plan), request, latents))
            image = generator.decode(want)[0]
            out, png = tmp_path / f"{plan}-{height}x{width}.npy", tmp_path / f"{plan}-{height}x{width}.png"
            run(
                ilf_run,
                bundle.path,
                "--plan",
                plan,
                *args,
                "--latents-in",
                tmp_path / "in.npy",
                "--latents-out",
                out,
                "--out",
                png,
                "-q",
            )
            got = np.load(out)
            assert got.shape == want.shape == shape
            assert rel_l2(got, want) <= TOLERANCE, (name, plan, height, width)
            assert np.array_equal(png_pixels(png), image), (name, plan, height, width)


def test_the_generate_cli_and_ilf_run_agree(ilf_run, bundles, tmp_path):
    """`ilf-deploy generate --backend openvino --variant f32` itself, from the same latents."""
    from typer.testing import CliRunner

    from ilf_deploy.cli import app

    bundle = bundles["pixart-sigma"]
    np.save(tmp_path / "in.npy", np.random.default_rng(3).standard_normal((1, 4, 12, 8), dtype=np.float32))
    common = ["--plan", "ilf-4", "--prompt", PROMPT, "--height", "48", "--width", "32", "--latents-in"]
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(bundle),
            "--backend",
            "openvino",
            "--variant",
            "f32",
            *common,
            str(tmp_path / "in.npy"),
            "--latents-out",
            str(tmp_path / "py.npy"),
            "--out",
            str(tmp_path / "py.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    run(
        ilf_run,
        bundle,
        *common,
        tmp_path / "in.npy",
        "--latents-out",
        tmp_path / "cpp.npy",
        "--out",
        tmp_path / "cpp.png",
    )
    assert rel_l2(np.load(tmp_path / "cpp.npy"), np.load(tmp_path / "py.npy")) <= TOLERANCE
    assert np.array_equal(png_pixels(tmp_path / "cpp.png"), png_pixels(tmp_path / "py.png"))


def test_bf16_matches_the_python_backends_bf16(ilf_run, bundles, tmp_path):
    """Same precision rule as the Python backend: bf16 for the blocks and the feedback, f32 elsewhere."""
    from ilf_deploy.engines.backends.openvino import cpu_has_bf16

    bundle = bundles["pixart-sigma"]
    args = [
        "--plan",
        "ilf-4",
        "--prompt",
        PROMPT,
        "--latents-in",
        tmp_path / "in.npy",
        "--latents-out",
        tmp_path / "y.npy",
    ]
    np.save(tmp_path / "in.npy", np.random.default_rng(4).standard_normal((1, 4, 12, 12), dtype=np.float32))
    if not cpu_has_bf16():
        result = run(ilf_run, bundle, *args, "--precision", "bf16", check=False)
        assert result.returncode == 2 and "needs AVX512_BF16 or AMX" in result.stderr
        return
    generator = open_generator(bundle, "openvino", variant="bf16")
    request = Request(prompt=PROMPT)
    want = generator.latents_to_numpy(
        generator.generate_latents(generator.bundle.plan("ilf-4"), request, np.load(tmp_path / "in.npy"))
    )
    run(ilf_run, bundle, *args, "--precision", "bf16", "-q")
    assert rel_l2(np.load(tmp_path / "y.npy"), want) <= TOLERANCE


def test_an_int8_ov_variant_matches_and_an_ort_only_variant_is_refused(ilf_run, sigma_copy, tmp_path):
    """--variant: an int8-ov variant (NNCF IR) as the Python backend runs it; int8-dynamic (ORT's own
    operators) refused in one line, as the Python backend refuses it."""
    pytest.importorskip("nncf")
    from ilf_deploy.build.quantization.calibration import collect_calibration
    from ilf_deploy.build.quantization.quantize import quantize_bundle

    bundle = sigma_copy()
    collect_calibration(bundle, "ilf-4", ["a red circle", "a blue square on grass"], max_samples=4)
    quantize_bundle(bundle, "int8-ov")
    quantize_bundle(bundle, "int8-dynamic")
    np.save(tmp_path / "in.npy", np.random.default_rng(6).standard_normal((1, 4, 12, 12), dtype=np.float32))
    generator = open_generator(bundle, "openvino", variant="int8_ov")
    want = generator.latents_to_numpy(
        generator.generate_latents(
            generator.bundle.plan("ilf-4"), Request(prompt=PROMPT), np.load(tmp_path / "in.npy")
        )
    )
    args = [
        "--plan",
        "ilf-4",
        "--prompt",
        PROMPT,
        "--latents-in",
        tmp_path / "in.npy",
        "--latents-out",
        tmp_path / "y.npy",
    ]
    result = run(ilf_run, bundle, *args, "--variant", "int8_ov")
    assert rel_l2(np.load(tmp_path / "y.npy"), want) <= TOLERANCE and "variant int8_ov" in result.stdout
    one_line_error(  # --force: y.npy exists (above), and this refusal is the variant's
        run(ilf_run, bundle, *args, "--variant", "int8_dynamic", "--force", check=False),
        "variant 'int8_dynamic' (int8-dynamic) runs on --backend onnxruntime, not openvino",
    )


def test_default_model_end_to_end_from_a_prompt(ilf_run, tmp_path):
    """The embedded default model: `ilf-deploy build default` (one plan), then ilf-run --prompt."""
    bundle = build_bundle("default", tmp_path / "bundle", BuildOptions(plans=("ilf-10",), copy_model=False))
    assert Bundle.load(bundle).manifest.tokenizer.openvino == "tokenizer/openvino_tokenizer.xml"
    generator = open_generator(bundle, "openvino", variant="f32")
    prompt = "a small red circle on a blue background"
    shape = (1, 4, *generator.latent_size(Request(prompt)))
    latents = np.random.default_rng(0).standard_normal(shape, dtype=np.float32)
    np.save(tmp_path / "in.npy", latents)
    want = generator.latents_to_numpy(
        generator.generate_latents(generator.bundle.plan("ilf-10"), Request(prompt), latents)
    )
    run(
        ilf_run,
        bundle,
        "--prompt",
        prompt,
        "--latents-in",
        tmp_path / "in.npy",
        "--latents-out",
        tmp_path / "y.npy",
        "--out",
        tmp_path / "y.png",
        "--json",
        tmp_path / "t.json",
    )
    assert rel_l2(np.load(tmp_path / "y.npy"), want) <= TOLERANCE
    assert np.array_equal(png_pixels(tmp_path / "y.png"), generator.decode(want)[0])
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["plan"] == "ilf-10" and report["engine"] == "openvino CPU f32"  # the first ILF plan
    assert len(report["runs"][0]["step_s"]) == 10 and report["runs"][0]["segments"]["feedback"]["calls"] == 4
    # from the runtime's own noise (not numpy's stream): an image of the bundle's size
    result = run(ilf_run, bundle, "--prompt", prompt, "--seed", 5, "--out", tmp_path / "seeded.png")
    size = Bundle.load(bundle).manifest.resolutions[0]
    assert png_pixels(tmp_path / "seeded.png").shape == (*size, 3) and "96 block forwards" in result.stdout


def test_the_converted_tokenizers_reproduce_the_tokenizers_library(bundles, tmp_path):
    """openvino-tokenizers' conversion (built into the bundle) vs `tokenizers` as the Python runtime
    sets it up: ids, padding to max_length and the attention mask (the default model's tokenizer is
    checked by the end-to-end test above)."""
    import openvino as ov
    import openvino_tokenizers  # noqa: F401  (registers the extension)

    prompts = [
        "a red circle",
        "",
        "  Two BIG blue squares, left; a star!  ",
        "unknown words xyzzy",
        "red " * 500,
    ]
    for name in ("pixart-alpha-1024", "pixart-sigma"):
        bundle = Bundle.load(bundles[name])
        spec = bundle.manifest.tokenizer
        compiled = ov.Core().compile_model(str(bundle.path / spec.openvino), "CPU")
        reference = open_generator(bundle.path, "openvino").tokenizer
        for prompt in prompts:
            text = prompt.lower().strip()
            got, want = compiled([np.array([text])]), reference.encode(text)
            assert got["input_ids"].tolist() == [want.ids] and len(want.ids) == spec.max_length
            assert got["attention_mask"].tolist() == [want.attention_mask]


# -- the reader's and the CLI's refusals: one line, exit 2 -------------------------------------------


def one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0], lines[0]
    assert result.stdout == ""


def test_an_edited_segment_is_refused(ilf_run, sigma_copy):
    bundle = sigma_copy()
    path = bundle / "onnx" / "final.onnx"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    one_line_error(
        run(ilf_run, bundle, "--prompt", "x", check=False),
        "onnx/final.onnx does not match its sha256 in the manifest (edited or corrupted)",
    )


def test_an_edited_manifest_is_refused(ilf_run, sigma_copy):
    bundle = sigma_copy()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["max_batch"] = 4
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))
    one_line_error(
        run(ilf_run, bundle, "--prompt", "x", check=False),
        "manifest.json does not match the bundle's digest in manifest.sha256 (edited or corrupted)",
    )


def test_an_unknown_schema_version_is_refused(ilf_run, sigma_copy):
    bundle = sigma_copy()
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["schema_version"] = 3
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    (bundle / "manifest.json").write_bytes(data)
    (bundle / "manifest.sha256").write_text(f"sha256:{hashlib.sha256(data).hexdigest()}\n")
    one_line_error(
        run(ilf_run, bundle, "--prompt", "x", check=False),
        "bundle schema version 3 is not supported (this tool reads 2 and 4 and 5 and 6 and 7)",
    )


def test_a_missing_file_is_refused(ilf_run, sigma_copy):
    bundle = sigma_copy()
    (bundle / "positions" / "12x8.npy").unlink()
    one_line_error(
        run(ilf_run, bundle, "--prompt", "x", check=False),
        "positions/12x8.npy is missing; the bundle is incomplete, rebuild it",
    )


BAD_ARGUMENTS = [
    ([], "missing BUNDLE"),
    (["{sigma}", "--prompt", "x", "--frobnicate"], "unknown option --frobnicate"),
    (["{sigma}", "--prompt", "x", "--seed", "abc"], "--seed must be an integer, got 'abc'"),
    (["{sigma}", "--prompt", "x", "--seed"], "--seed needs a value"),
    (
        ["{sigma}", "--prompt", "x", "--class-label", "1"],
        "give one of --prompt, --token-ids and --class-label",
    ),
    (["{sigma}"], "PixArt models need --prompt (or --token-ids)"),
    (["{dit}", "--prompt", "a cat"], "DiT models take --class-label, not a prompt"),
    (["{dit}", "--class-label", "1000"], "--class-label: class_label must be in 0..999, got 1000"),
    (
        ["{dit}", "--class-label", "1", "--height", "40", "--width", "40"],
        "the bundle was built for 32x32, 48x48, not 40x40",
    ),
    (
        ["{dit}", "--class-label", "1", "--height", "48", "--width", "32"],
        "the bundle was built for 32x32, 48x48, not 48x32",
    ),
    (
        ["{sigma}", "--prompt", "x", "--plan", "ilf-99"],
        "plan 'ilf-99' is not in this bundle (it has: base-4, ilf-4",
    ),
    (
        ["{sigma}", "--prompt", "x", "--digest", "sha256:nope"],
        "--digest must look like sha256:<64 lowercase hex digits>",
    ),
    (["{sigma}", "--prompt", "x", "--digest", "sha256:" + "0" * 64], "not the pinned --digest sha256:0000"),
    (["{sigma}", "--prompt", "x", "--precision", "fp8"], "--precision must be f32 or bf16, got 'fp8'"),
    (["{sigma}", "--prompt", "x", "--variant", "int4"], "the bundle has no variant 'int4' (it has: none)"),
    (["{sigma}", "--prompt", "x", "--device", "TPU"], "--device TPU is not an OpenVINO device"),
    (
        ["{sigma}", "--prompt", "x", "--latents-in", "{tmp}/wrong.npy"],
        "latents must have shape (1, 4, 12, 12), got (1, 4, 8, 8)",
    ),
    (
        ["{sigma}", "--prompt", "x", "--latents-in", "{tmp}/none.npy"],
        "cannot read {tmp}/none.npy: no such file",
    ),
    (
        ["{sigma}", "--prompt", "x", "--out", "{tmp}/no/such/dir/x.png"],
        "--out {tmp}/no/such/dir/x.png: directory {tmp}/no/such/dir does not exist",
    ),
    (["{nothing}", "--prompt", "x"], "is not a bundle (no manifest.json); build one with `ilf-deploy build`"),
]


@pytest.mark.parametrize(("argv", "fragment"), BAD_ARGUMENTS)
def test_bad_arguments_are_one_line_and_exit_2(ilf_run, bundles, tmp_path, argv, fragment):
    np.save(tmp_path / "wrong.npy", np.zeros((1, 4, 8, 8), np.float32))
    names = {
        "sigma": bundles["pixart-sigma"],
        "dit": bundles["dit"],
        "tmp": tmp_path,
        "nothing": tmp_path / "nothing",
    }
    argv = [a.format(**names) for a in argv]
    one_line_error(run(ilf_run, *argv, check=False), fragment.format(**names))


def test_token_ids_in_every_accepted_form(ilf_run, bundles, tmp_path):
    """--token-ids: (L,) / (1, L) with guidance off, (2, L) with it, JSON with an explicit mask; all give
    the latents of --prompt (the mask of a .npy is 1 up to the trailing padding)."""
    bundle = bundles["pixart-sigma"]
    reference = open_generator(bundle, "openvino").tokenizer
    ids = np.array(reference.encode(PROMPT.lower()).ids, dtype=np.int64)
    empty = reference.encode("")
    np.save(tmp_path / "in.npy", np.random.default_rng(8).standard_normal((1, 4, 12, 12), dtype=np.float32))
    common = ["--plan", "base-4", "--latents-in", tmp_path / "in.npy", "-q"]

    def latents(*args) -> np.ndarray:
        run(ilf_run, bundle, *common, *args, "--latents-out", tmp_path / "out.npy", "--force")
        return np.load(tmp_path / "out.npy")

    unguided = latents("--prompt", PROMPT, "--guidance-scale", 1)
    for form in (ids, ids[None]):
        np.save(tmp_path / "ids.npy", form)
        assert np.array_equal(latents("--token-ids", tmp_path / "ids.npy", "--guidance-scale", 1), unguided)
    guided = latents("--prompt", PROMPT)
    np.save(tmp_path / "ids.npy", np.stack([np.array(empty.ids), ids]))
    assert np.array_equal(latents("--token-ids", tmp_path / "ids.npy"), guided)
    document = {
        "input_ids": [empty.ids, ids.tolist()],
        "attention_mask": [empty.attention_mask, [1] * 5 + [0] * 295],
    }
    (tmp_path / "ids.json").write_text(json.dumps(document))
    masked = latents("--token-ids", tmp_path / "ids.json")  # another mask: another result
    assert not np.array_equal(masked, guided)
    one_line_error(
        run(ilf_run, bundle, *common, "--token-ids", tmp_path / "in.npy", check=False),
        "token ids must be integers",
    )


def test_one_row_of_ids_with_guidance_needs_a_tokenizer(ilf_run, sigma_copy, tmp_path):
    """Without the OpenVINO tokenizer, guidance needs the negative prompt's ids in --token-ids."""
    bundle = sigma_copy()
    manifest = json.loads((bundle / "manifest.json").read_text())
    del manifest["tokenizer"]["openvino"]
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    (bundle / "manifest.json").write_bytes(data)
    (bundle / "manifest.sha256").write_text(f"sha256:{hashlib.sha256(data).hexdigest()}\n")
    np.save(tmp_path / "ids.npy", np.array([[5, 6, 1] + [0] * 297], dtype=np.int64))
    one_line_error(
        run(ilf_run, bundle, "--token-ids", tmp_path / "ids.npy", check=False),
        "guidance needs the negative prompt's ids too: give --token-ids 2 rows [negative; prompt]",
    )
    one_line_error(
        run(ilf_run, bundle, "--prompt", "x", check=False), "this bundle has no OpenVINO tokenizer"
    )
    run(
        ilf_run,
        bundle,
        "--token-ids",
        tmp_path / "ids.npy",
        "--guidance-scale",
        1,
        "--out",
        tmp_path / "x.png",
    )


# -- the --force rule (docs/cli-guide.md "Outputs and --force") --------------------------------------


def test_an_output_that_exists_is_refused_without_force(ilf_run, bundles, tmp_path):
    """--out, --latents-out, --json and the default image.png: an existing file is refused before any
    work, in one line (generate's words, exit 2), and left as it was; --force replaces it whole."""
    from typer.testing import CliRunner

    from ilf_deploy.cli import app

    bundle = Path(
        shutil.copytree(bundles["dit"], tmp_path / "dit", ignore=shutil.ignore_patterns("openvino_cache"))
    )
    args = [bundle, "--class-label", 1, "--plan", "cache-6", "-q"]
    old = b"an earlier output"
    for flag, name, fresh in (
        ("--out", "x.png", []),
        ("--latents-out", "x.npy", []),
        ("--json", "t.json", ["--latents-out", tmp_path / "fresh.npy"]),  # the only output that exists
    ):
        path = tmp_path / name
        path.write_bytes(old)
        one_line_error(
            run(ilf_run, *args, *fresh, flag, path, check=False),
            f"{flag} {path} exists; pass --force to replace it",
        )
        assert path.read_bytes() == old and not (tmp_path / "fresh.npy").exists(), flag
    assert not (bundle / "openvino_cache").exists()  # refused before the engine compiled anything
    (tmp_path / "image.png").write_bytes(old)  # the default --out, where neither output is given
    default = subprocess.run([str(ilf_run), *map(str, args)], capture_output=True, text=True, cwd=tmp_path)
    one_line_error(default, "--out image.png exists; pass --force to replace it")
    assert (tmp_path / "image.png").read_bytes() == old
    python = CliRunner().invoke(
        app, ["generate", str(bundle), "--class-label", "1", "--out", str(tmp_path / "x.png")]
    )
    cpp = run(ilf_run, bundle, "--class-label", 1, "--out", tmp_path / "x.png", check=False).stderr
    assert python.exit_code == 2 and " ".join(cpp.split()) in " ".join(python.output.split()), (
        cpp,
        python.output,
    )

    run(ilf_run, *args, "--latents-out", tmp_path / "want.npy", "--out", tmp_path / "want.png")
    run(ilf_run, *args, "--latents-out", tmp_path / "x.npy", "--out", tmp_path / "x.png", "--json",
        tmp_path / "t.json", "--force")  # fmt: skip
    assert np.array_equal(np.load(tmp_path / "x.npy"), np.load(tmp_path / "want.npy"))
    assert np.array_equal(png_pixels(tmp_path / "x.png"), png_pixels(tmp_path / "want.png"))
    assert json.loads((tmp_path / "t.json").read_text())["plan"] == "cache-6"
    assert not [p.name for p in tmp_path.glob(".*")]  # written beside the output and renamed: no leftovers
    assert "--force" in run(ilf_run, "--help").stdout


# -- the compiled-model cache, timings, the unit tests, the C API and find_package(ilf) ---------------


def test_compiled_models_are_cached_outside_the_hashed_files(ilf_run, sigma_copy, tmp_path):
    bundle = sigma_copy()
    shutil.rmtree(bundle / "openvino_cache", ignore_errors=True)
    run(ilf_run, bundle, "--prompt", PROMPT, "--plan", "base-4", "--latents-out", tmp_path / "a.npy")
    blobs = sorted((bundle / "openvino_cache").glob("cpp-*.blob"))
    assert {b.name.split(".")[0] for b in blobs} >= {
        "cpp-text_encoder",
        "cpp-time",
        "cpp-blocks_00_00",
        "cpp-final",
    }
    assert not any(name.startswith("openvino_cache") for name in Bundle.load(bundle).manifest.files)
    blobs[0].write_bytes(b"not a blob")  # a broken blob is compiled again and replaced
    run(ilf_run, bundle, "--prompt", PROMPT, "--plan", "base-4", "--latents-out", tmp_path / "b.npy")
    assert blobs[0].read_bytes() != b"not a blob"
    run(
        ilf_run,
        bundle,
        "--prompt",
        PROMPT,
        "--plan",
        "base-4",
        "--latents-out",
        tmp_path / "c.npy",
        "--no-cache",
    )
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))
    assert np.array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "c.npy"))


def unreshapeable(bundle: Path, segment: str) -> None:
    """Make `segment`'s graph one that OpenVINO cannot reshape to static shapes but that runs as before
    on its dynamic ones, and rehash it in the manifest: its first output goes through an If whose other
    branch reshapes it to (P, -1), P a prime larger than any of its sizes. Static shape inference
    checks both branches and refuses that one (P divides no size); on dynamic shapes it cannot tell,
    and the branch never runs (its condition, max(output) > inf, is false)."""
    import onnx
    from onnx import TensorProto, helper

    from ilf_deploy.core.runtime.bundle import rewrite_manifest

    rel = Bundle.load(bundle).manifest.segments[segment].file
    model = onnx.load(str(bundle / rel))
    graph = model.graph
    output = graph.output[0]
    assert output.type.tensor_type.elem_type == TensorProto.FLOAT, (segment, output)
    inner = output.name + "_before_if"
    for node in graph.node:
        node.output[:] = [inner if name == output.name else name for name in node.output]
        node.input[:] = [inner if name == output.name else name for name in node.input]

    def constant(name: str, value) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=helper.make_tensor(name, *value))

    reshaped = helper.make_graph(
        [
            constant("p_shape", (TensorProto.INT64, [2], [1_000_003, -1])),
            helper.make_node("Reshape", [inner, "p_shape"], ["by_p"]),
            helper.make_node("Shape", [inner], ["own_shape"]),
            helper.make_node("Reshape", ["by_p", "own_shape"], ["then_out"]),
        ],
        "reshaped",
        [],
        [helper.make_tensor_value_info("then_out", TensorProto.FLOAT, None)],
    )
    unchanged = helper.make_graph(
        [helper.make_node("Identity", [inner], ["else_out"])],
        "unchanged",
        [],
        [helper.make_tensor_value_info("else_out", TensorProto.FLOAT, None)],
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMax", [inner], ["largest"], keepdims=0),
            constant("infinity", (TensorProto.FLOAT, [], [float("inf")])),
            helper.make_node("Greater", ["largest", "infinity"], ["never"]),
            helper.make_node("If", ["never"], [output.name], then_branch=reshaped, else_branch=unchanged),
        ]
    )
    onnx.save(model, str(bundle / rel))
    rewrite_manifest(bundle, lambda manifest: manifest["files"].update({rel: ""}))  # rehashed there


def test_a_segment_that_cannot_reshape_runs_on_its_dynamic_shapes(ilf_run, sigma_copy, tmp_path, caplog):
    """openvino.cpp's fallback: a graph that does not reshape to its call shapes is compiled with its
    dynamic shapes, with one line on stderr per segment, and gives the latents it gives reshaped, as
    the Python backend (which falls back alike) does."""
    original, edited = sigma_copy(), sigma_copy()
    for segment in ("embed", "final"):
        unreshapeable(edited, segment)
    np.save(tmp_path / "in.npy", np.random.default_rng(12).standard_normal((1, 4, 12, 12), dtype=np.float32))
    args = ["--plan", "ilf-4", "--prompt", PROMPT, "--latents-in", tmp_path / "in.npy", "--no-cache", "-q"]
    static = run(ilf_run, original, *args, "--latents-out", tmp_path / "static.npy")
    assert "cannot reshape" not in static.stderr, static.stderr
    fallback = run(ilf_run, edited, *args, "--latents-out", tmp_path / "dynamic.npy")
    lines = [line for line in fallback.stderr.splitlines() if "cannot reshape" in line]
    assert sorted(line.split()[4] for line in lines) == ["embed", "final"], fallback.stderr  # once each
    for line in lines:
        assert line.startswith("ilf: OpenVINO cannot reshape ") and line.endswith("): dynamic shapes"), line
    got = np.load(tmp_path / "dynamic.npy")
    assert rel_l2(got, np.load(tmp_path / "static.npy")) <= TOLERANCE
    with caplog.at_level("WARNING", logger="ilf_deploy.openvino"):
        generator = open_generator(edited, "openvino", variant="f32")
        want = generator.latents_to_numpy(
            generator.generate_latents(
                generator.bundle.plan("ilf-4"), Request(prompt=PROMPT), np.load(tmp_path / "in.npy")
            )
        )
    assert sum("cannot reshape" in r.getMessage() for r in caplog.records) == 2, caplog.text
    assert rel_l2(got, want) <= TOLERANCE


def test_timings_json(ilf_run, bundles, tmp_path):
    run(
        ilf_run,
        bundles["dit"],
        "--class-label",
        1,
        "--plan",
        "cache-6",
        "--runs",
        2,
        "--json",
        tmp_path / "t.json",
        "--latents-out",
        tmp_path / "x.npy",
    )
    report = json.loads((tmp_path / "t.json").read_text())
    assert report["digest"] == Bundle.load(bundles["dit"]).digest and report["steps"] == 6
    assert len(report["runs"]) == 2 and all(len(r["step_s"]) == 6 for r in report["runs"])
    run_ = report["runs"][1]
    assert set(run_["inference"]) <= set(run_["segments"]) and run_["segments"]["time"]["calls"] == 6
    assert "vae_decoder" not in run_["segments"]  # only latents asked for
    assert isinstance(report["cpu_flags"], list) and report["cpu"]


def test_the_unit_tests_of_the_reader():
    if not UNIT_TESTS.is_file():
        _binary()
        pytest.skip(f"{UNIT_TESTS} is not built here (ilf-run came from elsewhere)")
    result = subprocess.run([str(UNIT_TESTS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    # SHA-256 (OpenSSL's) of every length across the block boundaries, and a large one, against hashlib
    lines = subprocess.run(
        [str(UNIT_TESTS), "--sha-lengths"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert len(lines) == 2 * 302
    for n, digest in zip(lines[::2], lines[1::2]):
        assert digest == hashlib.sha256(bytes(i % 251 for i in range(int(n)))).hexdigest(), n


def test_float16_conversions_are_numpys(tmp_path):
    """float32 -> float16 (ties to even, subnormals, overflow to inf, nan) and back, as numpy's astype."""
    if not UNIT_TESTS.is_file():
        _binary()
        pytest.skip(f"{UNIT_TESTS} is not built here (ilf-run came from elsewhere)")
    rng = np.random.default_rng(2)
    specials = np.array(
        [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 65519.99, 6e-8, 3e-8, 2.98e-8, 1e-45]
    )
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    values = np.concatenate(
        [specials.astype(np.float32), bits, rng.standard_normal(50_000).astype(np.float32) * 1e-5]
    )
    np.save(tmp_path / "in.npy", values)
    subprocess.run([str(UNIT_TESTS), "--to-half", tmp_path / "in.npy", tmp_path / "out.npy"], check=True)
    half = np.load(tmp_path / "out.npy.f16.npy")
    with np.errstate(over="ignore"):
        want = values.astype(np.float16)
    assert half.dtype == np.float16 and np.array_equal(
        half.view(np.uint16)[~np.isnan(want)], want.view(np.uint16)[~np.isnan(want)]
    )
    assert np.array_equal(np.isnan(half), np.isnan(want))
    back = np.load(tmp_path / "out.npy")
    assert np.array_equal(back[0], want.astype(np.float32), equal_nan=True)
    assert np.array_equal(back[1], want.astype(np.float32), equal_nan=True)


def test_an_fp16_bundle_computes_between_segments_as_numpy_does(ilf_run, tiny_dirs, tmp_path):
    """--precision fp16 bundles: segments exchange float16, and the loop's arithmetic on it rounds as
    numpy's float16 does (the Python runtime keeps the engine's float16 arrays)."""
    options = BuildOptions(plans=("ilf-4", "cache-6"), precision="fp16", copy_model=False)
    bundle = build_bundle(tiny_dirs["pixart-sigma"], tmp_path / "fp16", options)
    generator = open_generator(bundle, "openvino", variant="f32")
    np.save(tmp_path / "in.npy", np.random.default_rng(9).standard_normal((1, 4, 8, 8), dtype=np.float32))
    for plan in ("ilf-4", "cache-6"):
        want = generator.latents_to_numpy(
            generator.generate_latents(
                generator.bundle.plan(plan), Request(prompt=PROMPT), np.load(tmp_path / "in.npy")
            )
        )
        run(
            ilf_run,
            bundle,
            "--plan",
            plan,
            "--prompt",
            PROMPT,
            "--latents-in",
            tmp_path / "in.npy",
            "--latents-out",
            tmp_path / f"{plan}.npy",
            "--out",
            tmp_path / f"{plan}.png",
            "-q",
        )
        assert rel_l2(np.load(tmp_path / f"{plan}.npy"), want) <= TOLERANCE, plan
        assert np.array_equal(png_pixels(tmp_path / f"{plan}.png"), generator.decode(want)[0]), plan


def test_the_c_and_cpp_examples_build_with_find_package(ilf_run, bundles, tmp_path):
    """A project of one's own: find_package(ilf) against the install, the README's two examples."""
    if not (PREFIX / "lib" / "cmake" / "ilf" / "ilfConfig.cmake").is_file():
        pytest.skip(f"no ilf CMake package under {PREFIX} (ilf-run came from elsewhere)")
    generator = (
        ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={PREFIX / 'bin' / 'ninja'}"]
        if (PREFIX / "bin" / "ninja").is_file()
        else []
    )
    build = tmp_path / "build"
    configure = [
        "cmake",
        "-S",
        ROOT / "cpp" / "examples",
        "-B",
        build,
        *generator,
        f"-DCMAKE_PREFIX_PATH={PREFIX}",
    ]
    subprocess.run(configure, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", build], check=True, capture_output=True)
    bundle = bundles["pixart-sigma"]
    for example in ("embed-cpp", "embed-c"):
        result = subprocess.run(
            [build / example, bundle, PROMPT, tmp_path / f"{example}.png", "cache-6"],
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
    run(ilf_run, bundle, "--prompt", PROMPT, "--seed", 7, "--plan", "cache-6", "--out", tmp_path / "cli.png")
    cli = png_pixels(tmp_path / "cli.png")
    assert np.array_equal(png_pixels(tmp_path / "embed-cpp.png"), cli)
    assert np.array_equal(png_pixels(tmp_path / "embed-c.png"), cli)
    broken = subprocess.run(
        [build / "embed-c", tmp_path, "x", tmp_path / "x.png"], capture_output=True, text=True
    )
    assert broken.returncode == 2 and "is not a bundle" in broken.stderr
    # an engine of one's own behind ilf::Engine (this one counts the calls of the OpenVINO engine it wraps)
    counted = subprocess.run(
        [build / "custom-engine", bundle, PROMPT, "ilf-4"], capture_output=True, text=True
    )
    assert counted.returncode == 0, counted.stderr
    assert counted.stdout.startswith("counting openvino CPU f32, ilf-4 (40 block forwards):")
    calls = {k: int(v) for k, v in (item.split("=") for item in counted.stdout.split(":")[-1].split())}
    # ilf-4 has feedback on all 4 steps, so `time` runs at t and at t_post; two prompts (guidance)
    # `cross_kv`: every block's caption K/V once per generation
    want = {"text_encoder": 2, "context": 1, "cross_kv": 1, "time": 8, "embed": 4, "feedback": 4, "final": 4}
    assert {k: calls[k] for k in want} == want
