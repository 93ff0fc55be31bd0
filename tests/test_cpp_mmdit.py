"""The C++ runtime (cpp/) on the two-stream MMDiT bundles (schema 4): tiny SD3, Flux.1-dev and
Flux.1-schnell against the Python runtime on the same engine (OpenVINO, f32 pinned), from the same
latents and the same token ids: every plan kind of the bundle (base, ILF, Δ-cache, ILF with a keyed
cached range, adaptive) at both sizes (Flux-dev: two schedules of a version 3 plan), a batch whose
images decide the adaptive cache differently (`ilf-tests --batch`), the C API through ctypes, and
the refusals in one line (a size or schedule the bundle lacks, an edited bundle, guidance the model
has not, a prompt without token ids). Prompts: the tokenizers converted by openvino-tokenizers (schema 6)
give the Python runtime's ids, and ilf-run --prompt its latents; a bundle without them (schema 4), or
with some missing, refuses a prompt pointing to --token-ids.

`make cpp` builds and installs the binary; these tests skip where it is absent and cannot be built,
as tests/test_cpp.py does.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("openvino")

from PIL import Image
from tokenizers import Tokenizer

from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.core.runtime.manifest import schema_version_for
from ilf_deploy.engines.backends import open_generator

from .conftest import MMDIT_FAMILIES, MMDIT_PLANS, MMDIT_SIZES
from .test_cpp import UNIT_TESTS, _binary, one_line_error, rel_l2, run

FAMILIES = MMDIT_FAMILIES
SIZES = MMDIT_SIZES
# base, ILF, Δ-cache, ILF whose steps refresh one keyed range over a cache op and the inner loop
# (plan version 2), and adaptive reuse of blocks 1-4 (cache_adaptive, version 2); Flux-dev's are
# version 3 (one schedule per size).
PLANS = MMDIT_PLANS
BATCH_PLAN = "base-6-adapt1-4t0.025m3"  # a threshold where the images of a batch decide differently
PROMPT = "A small red circle at the top left"
TOLERANCE = 1e-5  # relative L2 of the final latents (measured: 0, bit-identical)
LIBRARY = Path(sys.executable).parent.parent / "lib" / "libilf.so"  # `make cpp` installs into the venv


@pytest.fixture(scope="module")
def ilf_run() -> Path:
    return _binary()


@pytest.fixture(scope="module")
def bundles(mmdit_bundles) -> dict[str, Path]:
    return mmdit_bundles  # conftest.py: built once for the Python and the C++ tests


def token_ids(bundle: Path, text: str) -> dict[str, list[int]]:
    """Each tokenizer's ids by its text_encoder input, from the bundle's tokenizer files with the
    `tokenizers` library, padded and truncated to max_length as core/runtime/pipeline.py does (no
    lower-casing)."""
    manifest = json.loads((bundle / "manifest.json").read_text())
    ids = {}
    for spec in manifest["tokenizers"]:
        tokenizer = Tokenizer.from_file(str(bundle / spec["file"]))
        tokenizer.enable_truncation(spec["max_length"])
        pad = tokenizer.id_to_token(spec["pad_id"])
        tokenizer.enable_padding(length=spec["max_length"], pad_id=spec["pad_id"], pad_token=pad)
        ids[spec["input"]] = tokenizer.encode(text).ids
    return ids


def ids_file(bundle: Path, path: Path, prompt: str = PROMPT, negative: str | None = "") -> Path:
    """--token-ids: one row per input, or [negative; prompt] where the model guides classifier-free."""
    rows = token_ids(bundle, prompt)
    if negative is not None and Bundle.load(bundle, verify_hashes=False).model.guidance == "cfg":
        rows = {
            name: [ids, row] for (name, ids), row in zip(token_ids(bundle, negative).items(), rows.values())
        }
    path.write_text(json.dumps(rows))
    return path


def png_pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def edited_copy(bundle: Path, folder: Path, edit) -> Path:
    """A copy of `bundle` whose manifest `edit` changed, its digest rewritten (so only the edit is wrong)."""
    copy = Path(shutil.copytree(bundle, folder / "edited", ignore=shutil.ignore_patterns("openvino_cache")))
    manifest = json.loads((copy / "manifest.json").read_text())
    edit(manifest)
    data = (json.dumps(manifest, indent=2) + "\n").encode()
    (copy / "manifest.json").write_bytes(data)
    (copy / "manifest.sha256").write_text(f"sha256:{hashlib.sha256(data).hexdigest()}\n")
    return copy


def without_converted_tokenizers(bundle: Path, folder: Path, inputs: tuple[str, ...] | None = None) -> Path:
    """A copy whose tokenizers feeding `inputs` (None: all) lose their OpenVINO conversion (the
    manifest then schema 4 where none is left, as `ilf-deploy build` writes it without one)."""

    def edit(manifest: dict) -> None:
        for spec in manifest["tokenizers"]:
            if inputs is None or spec["input"] in inputs:
                spec.pop("openvino", None)
        manifest["schema_version"] = schema_version_for(manifest)

    folder.mkdir()
    return edited_copy(bundle, folder, edit)


# -- what the bundles hold --------------------------------------------------------------------------


def test_the_bundles_hold_every_plan_kind(bundles):
    for name in FAMILIES:
        bundle = Bundle.load(bundles[name])
        assert bundle.manifest.model.state == ("hidden", "text")
        kinds = {p: {op.kind for s in bundle.plan(p).steps for op in s.ops} for p in PLANS}
        assert kinds["base-4"] == {"blocks"}
        assert kinds["ilf-4"] >= {"ilf", "blocks"}
        assert kinds["cache-6"] >= {"cache_refresh", "cache_reuse"}
        keyed = bundle.plan("ilf-4-adapt1-4t0.3m2")
        assert any(op.kind == "ilf" and op.stores for s in keyed.steps for op in s.ops)  # a keyed inner loop
        assert "cache_adaptive" in kinds["base-4-adapt1-4t0.3m2"]
        versions = {json.loads((bundles[name] / "plans" / f"{p}.json").read_text())["version"] for p in PLANS}
        assert versions == ({3} if name == "flux" else {1, 2}), name  # Flux-dev: a schedule per size, all


# Prompts the converted tokenizers must tokenise as `tokenizers` does: cases, punctuation and
# whitespace CLIP's normalizer cleans up, words none of them knows, and one longer than every max_length
# (truncated keeping CLIP's end-of-text and T5's </s>).
TOKENIZER_PROMPTS = (
    PROMPT,
    "",
    "  Two BLUE squares,\tat the bottom-right!  ",
    "xyzzy über café",
    "red " * 600,
)


def test_the_converted_tokenizers_give_the_python_ids(bundles):
    """Each family's every tokenizer has its OpenVINO conversion (schema 6), and OpenVINO running it
    (with the openvino_tokenizers extension, as ilf-run does) gives the Python runtime's ids."""
    openvino = pytest.importorskip("openvino")
    pytest.importorskip("openvino_tokenizers")  # registers the tokenizer operations with OpenVINO
    core = openvino.Core()
    for name in FAMILIES:
        manifest = json.loads((bundles[name] / "manifest.json").read_text())
        assert manifest["schema_version"] == 6, name
        for spec in manifest["tokenizers"]:
            assert spec["openvino"] == spec["file"].replace("tokenizer.json", "openvino_tokenizer.xml"), name
            compiled = core.compile_model(str(bundles[name] / spec["openvino"]), "CPU")
            for text in TOKENIZER_PROMPTS:
                got = compiled([np.array([text])])["input_ids"].tolist()
                assert got == [token_ids(bundles[name], text)[spec["input"]]], (name, spec["input"], text)


# -- parity with the Python runtime -----------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_final_latents_and_images_match_the_python_runtime(ilf_run, bundles, family, tmp_path):
    """Every plan at both sizes: ilf-run vs the Python OpenVINO f32 runtime from the same latents and
    token ids; the block forwards that ran (an adaptive plan decides them) and the decoded pixels too."""
    path = bundles[family]
    generator = open_generator(path, "openvino", variant="f32")
    bundle = generator.bundle
    ids = ids_file(path, tmp_path / "ids.json")
    rng = np.random.default_rng(11)
    worst = 0.0
    for height, width in SIZES:
        request = Request(prompt=PROMPT, height=height, width=width)
        shape = (1, bundle.model.latent_channels, *generator.latent_size(request))
        latents = rng.standard_normal(shape, dtype=np.float32)
        np.save(tmp_path / "in.npy", latents)
        for plan in PLANS:
            want = generator.latents_to_numpy(generator.generate_latents(bundle.plan(plan), request, latents))
            ran = generator.last_block_forwards
            image = generator.decode(want)[0]
            name = f"{plan}-{height}x{width}"
            out, png, report = tmp_path / f"{name}.npy", tmp_path / f"{name}.png", tmp_path / f"{name}.json"
            args = ["--plan", plan, "--token-ids", ids, "--height", height, "--width", width]
            args += [
                "--latents-in",
                tmp_path / "in.npy",
                "--latents-out",
                out,
                "--out",
                png,
                "--json",
                report,
                "-q",
            ]
            run(ilf_run, path, *args)
            got = np.load(out)
            assert got.shape == want.shape == shape
            error = rel_l2(got, want)
            worst = max(worst, error)
            assert error <= TOLERANCE, (family, plan, height, width, error)
            assert json.loads(report.read_text())["runs"][0]["block_forwards"] == ran, (family, plan)
            assert np.array_equal(png_pixels(png), image), (family, plan, height, width)
    print(f"{family}: largest relative L2 {worst:.3g}")


@pytest.mark.parametrize("family", FAMILIES)
def test_a_prompt_gives_the_latents_of_the_python_runtime(ilf_run, bundles, family, tmp_path):
    """ilf-run --prompt (and SD3's --negative-prompt, classifier-free) through the converted tokenizers
    vs the Python OpenVINO f32 runtime tokenising with `tokenizers`, from the same latents."""
    path = bundles[family]
    generator = open_generator(path, "openvino", variant="f32")
    bundle = generator.bundle
    height, width = SIZES[0]
    negatives = ("", "Blue squares, blurry") if family.startswith("sd3") else ("",)
    for index, negative in enumerate(negatives):
        request = Request(prompt=PROMPT, negative_prompt=negative, height=height, width=width)
        shape = (1, bundle.model.latent_channels, *generator.latent_size(request))
        latents = np.random.default_rng(5 + index).standard_normal(shape, dtype=np.float32)
        np.save(tmp_path / "in.npy", latents)
        want = generator.latents_to_numpy(generator.generate_latents(bundle.plan("ilf-4"), request, latents))
        args = ["--plan", "ilf-4", "--prompt", PROMPT, "--height", height, "--width", width]
        if negative:
            args += ["--negative-prompt", negative]
        run(
            ilf_run,
            path,
            *args,
            "--latents-in",
            tmp_path / "in.npy",
            "--latents-out",
            tmp_path / f"out{index}.npy",
            "-q",
        )
        error = rel_l2(np.load(tmp_path / f"out{index}.npy"), want)
        assert error <= TOLERANCE, (family, negative, error)
    one_line_error(  # longer than T5 reads: refused, as the request contract refuses it in Python
        run(ilf_run, path, "--prompt", "red " * 600, check=False), "prompt"
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_a_batch_matches_generate_batch(bundles, mmdit_models, family, tmp_path):
    """Generator::generate_batch (ilf-tests --batch): two images with their own prompt, latents and
    guidance scale, an adaptive plan at a threshold where they decide differently (the cache runs the
    blocks on one image's rows), vs the Python runtime's generate_batch."""
    if not UNIT_TESTS.is_file():
        _binary()
        pytest.skip(f"{UNIT_TESTS} is not built here (ilf-run came from elsewhere)")
    path = bundles[family]
    plan = mmdit_models[family].resolve_plan(BATCH_PLAN, SIZES)
    plan.save(tmp_path / "plan.json")
    generator = open_generator(path, "openvino", variant="f32")
    scales = (None, None) if family == "flux-schnell" else (None, 2.0)
    requests = [
        Request(prompt=text, guidance_scale=scale, height=64, width=32)
        for text, scale in zip((PROMPT, "a blue square"), scales)
    ]
    rng = np.random.default_rng(5)
    latents = [rng.standard_normal((1, 16, 16, 8), dtype=np.float32) for _ in requests]
    want = generator.latents_to_numpy(generator.generate_batch(plan, requests, latents))
    spec = {"bundle": str(path), "plan": str(tmp_path / "plan.json"), "height": 64, "width": 32}
    spec["out"], spec["requests"] = str(tmp_path / "out.npy"), []
    for index, (request, array) in enumerate(zip(requests, latents)):
        np.save(tmp_path / f"in{index}.npy", array)
        entry = {"latents": str(tmp_path / f"in{index}.npy"), "tokens": token_ids(path, request.prompt)}
        if request.guidance_scale is not None:
            entry["guidance_scale"] = request.guidance_scale
        if family.startswith("sd3"):  # classifier-free: the negative prompt's ids too
            entry["negative_tokens"] = token_ids(path, "")
        spec["requests"].append(entry)
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    result = subprocess.run(
        [str(UNIT_TESTS), "--batch", str(tmp_path / "spec.json")], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == generator.last_block_forwards
    got = np.load(tmp_path / "out.npy")
    assert got.shape == want.shape == (2, 16, 16, 8)
    assert rel_l2(got, want) <= TOLERANCE
    if family != "flux-schnell":  # the case this test is for: the images' adaptive decisions differ
        assert len(set(generator.last_block_forwards)) == 2, generator.last_block_forwards


# -- the C API ------------------------------------------------------------------------------------


class TokenInput(ctypes.Structure):  # ilf_token_ids: every struct of ilf.h starts with struct_size
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("input", ctypes.c_char_p),
        ("ids", ctypes.POINTER(ctypes.c_int64)),
        ("num_tokens", ctypes.c_size_t),
    ]


class CRequest(ctypes.Structure):  # ilf_request, include/ilf/ilf.h
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("prompt", ctypes.c_char_p),
        ("negative_prompt", ctypes.c_char_p),
        ("class_label", ctypes.c_int64),
        ("guidance_scale", ctypes.c_double),
        ("seed", ctypes.c_uint64),
        ("height", ctypes.c_int),
        ("width", ctypes.c_int),
        ("token_ids", ctypes.POINTER(ctypes.c_int64)),
        ("attention_mask", ctypes.POINTER(ctypes.c_int64)),
        ("num_tokens", ctypes.c_size_t),
        ("token_inputs", ctypes.POINTER(TokenInput)),
        ("num_token_inputs", ctypes.c_size_t),
        ("negative_token_inputs", ctypes.POINTER(TokenInput)),
        ("num_negative_token_inputs", ctypes.c_size_t),
    ]


class CLatents(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("data", ctypes.POINTER(ctypes.c_float)),
        ("shape", ctypes.c_int64 * 4),
    ]


class CImage(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("rgb", ctypes.POINTER(ctypes.c_uint8)),
        ("height", ctypes.c_int),
        ("width", ctypes.c_int),
    ]


class CImages(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("images", ctypes.POINTER(CImage)),
        ("count", ctypes.c_size_t),
    ]


def test_the_c_api_runs_flux(ilf_run, bundles, tmp_path):
    """ilf_generate with one ilf_token_ids per tokenizer gives ilf-run's latents; a negative prompt's
    ids are refused (ILF_ERROR_CONFIG, one line)."""
    if not LIBRARY.is_file():
        _binary()
        pytest.skip(f"{LIBRARY} is not installed here (ilf-run came from elsewhere)")
    lib = ctypes.CDLL(str(LIBRARY))
    lib.ilf_bundle_open.restype = ctypes.c_void_p
    lib.ilf_bundle_open.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    lib.ilf_bundle_num_tokenizers.restype = ctypes.c_size_t
    lib.ilf_bundle_num_tokenizers.argtypes = [ctypes.c_void_p]
    lib.ilf_bundle_tokenizer_input.restype = ctypes.c_char_p
    lib.ilf_bundle_tokenizer_input.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ilf_bundle_tokenizer_max_length.restype = ctypes.c_int64
    lib.ilf_bundle_tokenizer_max_length.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    lib.ilf_bundle_free.argtypes = [ctypes.c_void_p]
    lib.ilf_generator_open.restype = ctypes.c_void_p
    lib.ilf_generator_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    lib.ilf_generator_free.argtypes = [ctypes.c_void_p]
    lib.ilf_request_init_sized.argtypes = [ctypes.POINTER(CRequest), ctypes.c_size_t]
    lib.ilf_decode.argtypes = [ctypes.c_void_p, ctypes.POINTER(CLatents), ctypes.POINTER(CImages)]
    lib.ilf_images_free.argtypes = [ctypes.POINTER(CImages)]
    lib.ilf_generate.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.POINTER(CRequest),
        ctypes.POINTER(ctypes.c_float),
        ctypes.c_size_t,
        ctypes.POINTER(CLatents),
    ]
    lib.ilf_latents_free.argtypes = [ctypes.POINTER(CLatents)]
    lib.ilf_last_error.restype = ctypes.c_char_p

    path = bundles["flux"]
    handle = lib.ilf_bundle_open(str(path).encode(), None)
    assert handle, lib.ilf_last_error()
    count = lib.ilf_bundle_num_tokenizers(handle)
    inputs = [lib.ilf_bundle_tokenizer_input(handle, i).decode() for i in range(count)]
    lengths = [lib.ilf_bundle_tokenizer_max_length(handle, i) for i in range(count)]
    ids = token_ids(path, PROMPT)
    assert inputs == list(ids) and lengths == [len(v) for v in ids.values()]
    generator = lib.ilf_generator_open(handle, None)
    lib.ilf_bundle_free(handle)
    assert generator, lib.ilf_last_error()
    try:
        arrays = {name: np.ascontiguousarray(v, dtype=np.int64) for name, v in ids.items()}
        entries = (TokenInput * count)(
            *[
                TokenInput(
                    ctypes.sizeof(TokenInput),
                    name.encode(),
                    a.ctypes.data_as(ctypes.POINTER(ctypes.c_int64)),
                    a.size,
                )
                for name, a in arrays.items()
            ]
        )
        request = CRequest()
        lib.ilf_request_init_sized(ctypes.byref(request), ctypes.sizeof(CRequest))
        request.height, request.width = 64, 32
        request.token_inputs, request.num_token_inputs = entries, count
        latents = np.random.default_rng(4).standard_normal((1, 16, 16, 8), dtype=np.float32)
        out = CLatents(ctypes.sizeof(CLatents))
        pointer = latents.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        status = lib.ilf_generate(
            generator, b"ilf-4", ctypes.byref(request), pointer, latents.size, ctypes.byref(out)
        )
        assert status == 0, lib.ilf_last_error()
        got = np.ctypeslib.as_array(out.data, shape=tuple(out.shape)).copy()
        # ilf_decode: every image of the latents, after checking their shape against the bundle
        images = CImages(ctypes.sizeof(CImages))
        assert lib.ilf_decode(generator, ctypes.byref(out), ctypes.byref(images)) == 0, lib.ilf_last_error()
        assert images.count == 1 and (images.images[0].height, images.images[0].width) == (64, 32)
        lib.ilf_images_free(ctypes.byref(images))
        assert not images.images and images.count == 0
        out.shape[1] = 4  # not Flux's 16 latent channels
        assert lib.ilf_decode(generator, ctypes.byref(out), ctypes.byref(images)) == 2  # ILF_ERROR_CONFIG
        message = lib.ilf_last_error().decode()
        assert message.startswith("latents of shape (1, 4, 16, 8) do not fit this bundle: (B, 16, h, w)")
        lib.ilf_latents_free(ctypes.byref(out))

        request.negative_token_inputs, request.num_negative_token_inputs = entries, count
        status = lib.ilf_generate(
            generator, b"ilf-4", ctypes.byref(request), pointer, latents.size, ctypes.byref(out)
        )
        assert status == 2  # ILF_ERROR_CONFIG
        message = lib.ilf_last_error().decode()
        assert "negative_prompt does not apply to flux models" in message and "\n" not in message
    finally:
        lib.ilf_generator_free(generator)
    np.save(tmp_path / "in.npy", latents)
    ids_path = ids_file(path, tmp_path / "ids.json")
    args = ["--plan", "ilf-4", "--token-ids", ids_path, "--height", 64, "--width", 32]
    run(
        ilf_run, path, *args, "--latents-in", tmp_path / "in.npy", "--latents-out", tmp_path / "out.npy", "-q"
    )
    assert np.array_equal(got, np.load(tmp_path / "out.npy"))


# -- refusals, in one line ----------------------------------------------------------------------------


def test_a_size_or_schedule_the_bundle_lacks_is_refused(ilf_run, bundles, tmp_path):
    path = bundles["flux"]
    ids = ids_file(path, tmp_path / "ids.json")
    one_line_error(
        run(ilf_run, path, "--token-ids", ids, "--height", 48, "--width", 32, check=False),
        "the bundle was built for 32x32, 64x32, not 48x32; rebuild with --resolutions",
    )
    plan = json.loads((path / "plans" / "ilf-4.json").read_text())
    assert plan["version"] == 3
    del plan["schedules"]["32"]  # a plan made for 32x32 only
    (tmp_path / "only16.json").write_text(json.dumps(plan))
    common = ["--token-ids", ids, "--plan", tmp_path / "only16.json", "--width", 32]
    one_line_error(
        run(ilf_run, path, *common, "--height", 64, check=False),
        "plan 'ilf-4' was made for images of 16 tokens, not 32 (its schedule depends on the image size)",
    )
    run(ilf_run, path, *common, "--height", 32, "--latents-out", tmp_path / "ok.npy", "-q")
    plan["schedules"]["16"] = plan["schedules"]["16"][:-1]
    (tmp_path / "short.json").write_text(json.dumps(plan))
    one_line_error(
        run(ilf_run, path, "--token-ids", ids, "--plan", tmp_path / "short.json", check=False),
        "plan 'ilf-4': the schedule for 16 image tokens has 3 steps, the plan 4",
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_an_edited_bundle_is_refused(ilf_run, bundles, family, tmp_path):
    path = bundles[family]
    ids = ids_file(path, tmp_path / "ids.json")
    copy = Path(shutil.copytree(path, tmp_path / "copy", ignore=shutil.ignore_patterns("openvino_cache")))
    with (copy / "onnx" / "feedback.onnx").open("ab") as f:
        f.write(b"\0")
    one_line_error(
        run(ilf_run, copy, "--token-ids", ids, check=False),
        "onnx/feedback.onnx does not match its sha256 in the manifest (edited or corrupted)",
    )
    (copy / "manifest.json").write_text((copy / "manifest.json").read_text().replace('"text"', '"txt"'))
    one_line_error(
        run(ilf_run, copy, "--token-ids", ids, check=False),
        "manifest.json does not match the bundle's digest in manifest.sha256 (edited or corrupted)",
    )


def test_a_schema_4_manifest_is_checked_as_such(ilf_run, bundles, tmp_path):
    """Its fields only in schema 4 (a reader of 2 would run the model wrongly), typed, and an unknown
    version refused in the Python reader's words. The published schema decides the structure (checked
    by valijson in C++: its words for the rule, the same place as Python's)."""
    path = bundles["flux"]
    ids = ids_file(path, tmp_path / "ids.json")

    def refused(edit, fragment: str) -> None:
        folder = tmp_path / f"edit{len(list(tmp_path.glob('edit*')))}"
        folder.mkdir()
        one_line_error(
            run(ilf_run, edited_copy(path, folder, edit), "--token-ids", ids, check=False), fragment
        )

    refused(
        lambda m: m.update(schema_version=2),
        "does not follow the manifest schema at (top level): Target should not validate against schema "
        "specified in 'not' constraint",
    )
    refused(
        lambda m: m.update(schema_version=3),
        "bundle schema version 3 is not supported (this tool reads 2 and 4 and 5 and 6 and 7)",
    )
    refused(
        lambda m: m["model"].update(guidance="cfg2"),
        "at model/guidance: Failed to match against any enum values (got 'cfg2')",
    )
    refused(
        lambda m: m["model"].update(state=["Hidden"]),
        "at model/state/0: Failed to match regex specified by 'pattern' constraint (got 'Hidden')",
    )
    refused(  # converted tokenizers are schema 6's
        lambda m: m.update(schema_version=4),
        "at tokenizers/0: Target should not validate against schema specified in 'not' constraint",
    )
    refused(
        lambda m: m["tokenizers"][0].update(extra=1),
        "at tokenizers/0: Object contains a property that could not be validated using 'properties' or "
        "'additionalProperties' constraints: 'extra'",
    )
    refused(
        lambda m: m["tokenizers"][1].update(file="tokenizer_9/t.json"),
        "names tokenizer_9/t.json but does not list",
    )


def test_what_the_model_does_not_take_is_refused(ilf_run, bundles, tmp_path):
    """The request contract's words (core/runtime/request.py), as `ilf-deploy generate` says them."""
    flux, schnell = bundles["flux"], bundles["flux-schnell"]
    flux_ids = ids_file(flux, tmp_path / "flux.json")
    schnell_ids = ids_file(schnell, tmp_path / "schnell.json")
    one_line_error(
        run(ilf_run, schnell, "--token-ids", schnell_ids, "--guidance-scale", 3, check=False),
        "--guidance-scale: guidance_scale does not apply to flux models without guidance (schnell)",
    )
    run(
        ilf_run,
        schnell,
        "--token-ids",
        schnell_ids,
        "--guidance-scale",
        1,
        "--latents-out",
        tmp_path / "1.npy",
        "-q",
    )
    one_line_error(
        run(ilf_run, flux, "--token-ids", flux_ids, "--negative-prompt", "blue", check=False),
        "--negative-prompt: negative_prompt does not apply to flux models "
        "(their guidance is embedded, not classifier-free)",
    )
    one_line_error(
        run(ilf_run, schnell, "--token-ids", schnell_ids, "--negative-prompt", "blue", check=False),
        "--negative-prompt: negative_prompt does not apply to flux models without guidance (schnell)",
    )
    rows = {name: [ids, ids] for name, ids in token_ids(flux, PROMPT).items()}
    (tmp_path / "two.json").write_text(json.dumps(rows))
    one_line_error(
        run(ilf_run, flux, "--token-ids", tmp_path / "two.json", check=False),
        "--token-ids: 2 rows [negative; prompt], but negative_prompt does not apply to flux models",
    )
    one_line_error(
        run(ilf_run, flux, "--class-label", 1, check=False), "flux models take --prompt or --token-ids"
    )


def test_token_ids_are_required_and_checked(ilf_run, bundles, tmp_path):
    """No converted tokenizers (or not every one): a prompt says to pass --token-ids; ids by input,
    each of its length."""
    sd3, flux = bundles["sd3"], bundles["flux"]
    none = without_converted_tokenizers(sd3, tmp_path / "none")
    assert json.loads((none / "manifest.json").read_text())["schema_version"] == 4
    one_line_error(
        run(ilf_run, none, "--prompt", PROMPT, check=False),
        "this bundle has no OpenVINO tokenizer (its text encoder reads 3 tokenizers' ids: input_ids, "
        "input_ids_2, input_ids_3); pass --token-ids FILE",
    )
    one_line_error(
        run(
            ilf_run,
            without_converted_tokenizers(sd3, tmp_path / "t5", ("input_ids_3",)),
            "--prompt",
            PROMPT,
            check=False,
        ),
        "this bundle has no OpenVINO tokenizer for input_ids_3 (its text encoder reads 3 tokenizers' ids: "
        "input_ids, input_ids_2, input_ids_3); pass --token-ids FILE",
    )
    one_line_error(run(ilf_run, sd3, check=False), "sd3 models need --prompt (or --token-ids)")
    prompt = token_ids(sd3, PROMPT)
    (tmp_path / "one.json").write_text(json.dumps(prompt))
    one_line_error(  # classifier-free guidance needs the negative prompt's ids
        run(ilf_run, sd3, "--token-ids", tmp_path / "one.json", check=False),
        "guidance needs the negative prompt's ids too: give --token-ids 2 rows [negative; prompt]",
    )
    run(
        ilf_run,
        sd3,
        "--token-ids",
        tmp_path / "one.json",
        "--guidance-scale",
        1,
        "--latents-out",
        tmp_path / "x.npy",
        "-q",
    )
    np.save(tmp_path / "ids.npy", np.array([prompt["input_ids"]], dtype=np.int64))
    one_line_error(
        run(ilf_run, sd3, "--token-ids", tmp_path / "ids.npy", check=False),
        "this bundle's text encoder reads several tokenizers' ids: give a .json "
        '{"input_ids": [...], "input_ids_2": [...], "input_ids_3": [...]}',
    )
    flux_ids = token_ids(flux, PROMPT)
    for change, fragment in (
        (lambda d: d.pop("input_ids_2"), "no ids for input_ids_2"),
        (lambda d: d.update(input_ids_9=[1]), "'input_ids_9' is not an input of this bundle's text encoder"),
        (lambda d: d.update(input_ids=d["input_ids"][:5]), "token ids for input_ids must be 77 long"),
        (lambda d: d.update(input_ids=["a"]), "input_ids: ids must be integers"),
    ):
        document = dict(flux_ids)
        change(document)
        (tmp_path / "bad.json").write_text(json.dumps(document))
        one_line_error(run(ilf_run, flux, "--token-ids", tmp_path / "bad.json", check=False), fragment)
