"""Bad input to every command: one line, exit 2, no traceback, and nothing written (an audit of the
CLI found each of these ending in a traceback, writing one output before refusing the next, or
taking a bad value for a default)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ilf_deploy.cli import app
from ilf_deploy.core.runtime.bundle import Bundle, rewrite_manifest

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, fragment: str, code: int = 2) -> None:
    text = result.output.strip()
    assert result.exit_code == code, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert fragment in text, text


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture
def bundle(tiny_bundles):
    return tiny_bundles["pixart-alpha"]


@pytest.fixture
def place(tmp_path):
    """A directory with a file and a subdirectory in it."""
    (tmp_path / "a-file").write_text("not a directory\n")
    (tmp_path / "a-dir").mkdir()
    return tmp_path


def resealed(bundle: Path, to: Path, edit) -> Path:
    """A copy of `bundle` with `edit(copy)` applied to a file and the manifest's hashes redone, as a
    buggy or malicious tool would leave it: every hash check passes."""
    copy = Path(shutil.copytree(bundle, to))
    name = edit(copy)
    rewrite_manifest(copy, lambda manifest: manifest["files"].__setitem__(name, ""))
    return copy


OUTPUTS = [
    (["generate", "{bundle}", "-p", "base-4", "--prompt", "x", "-o", "{place}/a-dir"], "is a directory"),
    (["generate", "{bundle}", "-p", "base-4", "--prompt", "x", "-o", "{place}/x.txt"], "must end in"),
    (["generate", "{bundle}", "--prompt", "x", "--latents-out", "{place}/lat"], "must end in .npy"),
    (
        ["generate", "{bundle}", "--prompt", "x", "--latents-out", "{place}/l.npy", "-o", "{place}/no/a.png"],
        "does not exist",
    ),
    (["plan", "-o", "{place}/no/p.json"], "does not exist"),
    (["plan", "-o", "{place}/a-dir"], "is a directory"),
    (["verify", "{bundle}", "--json-out", "{place}/no/v.json"], "does not exist"),
    (["verify-variant", "{bundle}", "--variant", "x", "--json-out", "{place}/a-dir"], "is a directory"),
    (["bench", "{bundle}", "--json-out", "{place}/b.json", "--plot", "{place}/no/b.png"], "does not exist"),
    (["bench", "{bundle}", "--plot", "{place}/b.txt"], "must end in"),
    (["export-triton", "{bundle}", "-o", "{place}/a-file"], "is a file"),
    (
        ["export-triton", "{bundle}", "--copy-bundle", "-o", "{place}/repo", "--k8s", "{place}/a-file"],
        "is a file",
    ),
    (["export-kuberay", "{bundle}", "-o", "{place}/a-file/k"], "is a file"),
    (["batch", "{bundle}", "--prompts", "{place}/a-file", "-o", "{place}/a-file"], "is a file"),
    (["make-tiny", "dit", "{place}/a-file/m"], "is a file"),
    (["eval", "{bundle}", "--json-out", "{place}/no/e.json"], "does not exist"),
]


@pytest.mark.parametrize("args, message", OUTPUTS, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_output_path_is_refused_before_any_work(bundle, place, args, message):
    before = listing(place)
    refused(invoke(*(a.format(bundle=bundle, place=place) for a in args)), message)
    assert listing(place) == before  # nothing written: not the first of two outputs either


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere: permissions are not enforced")
def test_a_read_only_directory_is_refused_before_any_work(bundle, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        refused(invoke("generate", bundle, "--prompt", "x", "-o", locked / "a.png"), "permission denied")
        refused(invoke("export-kuberay", bundle, "-o", locked / "k"), "permission denied")
    finally:
        locked.chmod(0o755)


VALUES = [
    (["generate", "{bundle}", "--prompt", "x", "--height", "0"], "--height: height must be in 1..4096"),
    (["plan", "--blocks", "0"], "--blocks must be >= 1"),
    (["plan", "--cache", "2:3", "--refresh-every", "0"], "--refresh-every must be >= 1"),
    (["plan", "--baseline-steps", "0"], "--baseline-steps must be >= 1"),
    (["plan", "--block-caching", "nan"], "finite number >= 0"),
    (["bench", "{bundle}", "--plans", "base-4,base-4"], "names base-4 more than once"),
    (
        ["export-triton", "{bundle}", "-o", "{place}/r", "--replicas", "5", "--max-replicas", "2"],
        "--max-replicas",
    ),
    (["export-kuberay", "{bundle}", "-o", "{place}/k", "--name", "Bad_Name"], "DNS-1035"),
    (["export-kuberay", "{bundle}", "-o", "{place}/k", "--claim", "Bad Name!"], "--claim 'Bad Name!'"),
    (["export-kuberay", "{bundle}", "-o", "{place}/k", "--image", ""], "--image ''"),
    (["export-kuberay", "{bundle}", "-o", "{place}/k", "--backend", "nosuch"], "unknown backend 'nosuch'"),
    (["make-tiny", "dit", "{place}/m", "--layers", "100000"], "layers must be in 1..64"),
]


@pytest.mark.parametrize("args, message", VALUES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_bad_value_is_refused_not_taken_for_a_default(bundle, place, args, message):
    before = listing(place)
    refused(invoke(*(a.format(bundle=bundle, place=place) for a in args)), message)
    assert listing(place) == before


def test_a_huge_resolution_is_refused_before_the_export(tiny_dirs, tmp_path):
    refused(invoke("build", tiny_dirs["dit"], "-o", tmp_path / "b", "--width", "100000"), "at most 4096")
    assert listing(tmp_path) == []


def test_non_finite_inputs_are_refused(bundle, tmp_path):
    np.save(tmp_path / "nan.npy", np.full((1, 4, 8, 8), np.nan, np.float32))
    refused(
        invoke("generate", bundle, "--prompt", "x", "--latents-in", tmp_path / "nan.npy"), "NaN or infinite"
    )
    plan = json.loads(invoke("plan", "--steps", "4", "--blocks", "2", "--json").output)
    plan["steps"][0]["timestep"] = float("nan")
    (tmp_path / "nan-plan.json").write_text(json.dumps(plan))  # json writes the NaN token
    refused(
        invoke("generate", bundle, "--prompt", "x", "-p", tmp_path / "nan-plan.json"), "not a JSON number"
    )


def test_a_malformed_tokenizer_or_onnx_file_is_one_line(bundle, tmp_path):
    def bad_tokenizer(copy: Path) -> str:
        name = Bundle.load(copy).manifest.tokenizer.file
        (copy / name).write_text('{"x": 1}')
        return name

    tokens = resealed(bundle, tmp_path / "tokens", bad_tokenizer)
    refused(
        invoke("generate", tokens, "--prompt", "x", "-o", tmp_path / "a.png"), "cannot load the tokenizer"
    )
    assert not (tmp_path / "a.png").exists()

    def truncated_block(copy: Path) -> str:
        spec = Bundle.load(copy).segment_spec(Bundle.load(copy).manifest.reduced_precision_segments[0])
        (copy / spec.file).write_bytes((copy / spec.file).read_bytes()[:100])
        return spec.file

    onnx = resealed(bundle, tmp_path / "onnx", truncated_block)
    refused(invoke("quantize", onnx, "--mode", "int8-dynamic"), "cannot read")
    assert not Bundle.load(onnx).variants  # the manifest did not change


def test_calibrate_refuses_binary_prompts(bundle, tmp_path):
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)) * 4)
    copy = shutil.copytree(bundle, tmp_path / "b")
    refused(invoke("calibrate", copy, "--prompts", tmp_path / "binary.txt"), "is not UTF-8 text")


def test_a_variant_is_readable_by_others(bundle, tmp_path):
    copy = shutil.copytree(bundle, tmp_path / "b")
    assert invoke("quantize", copy, "--mode", "int8-dynamic").exit_code == 0
    folder = Path(copy) / "onnx" / "int8_dynamic"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755  # mkdtemp's 0700 locked other users out


def test_build_force_over_a_file_leaves_no_backup(tiny_dirs, tmp_path):
    (tmp_path / "afile").write_text("hi\n")
    result = invoke("build", tiny_dirs["dit"], "-o", tmp_path / "afile", "--plans", "base-2", "--force")
    assert result.exit_code == 0, result.output
    assert listing(tmp_path) != [] and not (tmp_path / ".afile.old").exists()
    assert (tmp_path / "afile" / "manifest.json").is_file()


def test_batch_refuses_a_directory_of_something_else_and_fails_when_nothing_is_made(bundle, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a red circle", "plan": "base-4"}\n')
    other = tmp_path / "model"
    other.mkdir()
    (other / "model_index.json").write_text("{}")
    refused(invoke("batch", bundle, "--prompts", prompts, "-o", other), "is not a batch directory")
    assert listing(other) == ["model_index.json"]

    (tmp_path / "refused.jsonl").write_text('{"prompt": 3}\n{"seed": -1}\n')
    result = invoke("batch", bundle, "--prompts", tmp_path / "refused.jsonl", "-o", tmp_path / "out")
    assert result.exit_code == 1 and "0 images, 2 refused" in result.output, result.output


def test_sigterm_removes_what_the_command_was_writing(tiny_dirs, tmp_path):
    """SIGTERM is raised as Ctrl-C is: `build`'s temporary bundle goes, and the exit status says so."""
    code = "import sys\nfrom ilf_deploy.cli import main\nsys.argv[0] = 'ilf-deploy'\nmain()\n"
    out = tmp_path / "bundle"
    command = [sys.executable, "-c", code, "build", str(tiny_dirs["pixart-alpha"]), "-o", str(out)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not any((p / "onnx").is_dir() for p in tmp_path.glob(".bundle.tmp-*")):
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=60)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM and "terminated" in output, output
    assert "Traceback" not in output and listing(tmp_path) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "x", "--seed", "abc"], "Invalid value for '--seed'"),
        (["generate"], "Missing argument 'model'"),
        (["nosuch"], "No such command 'nosuch'"),
        (["plan", "--bogus"], "No such option: --bogus"),
    ],
)
def test_a_malformed_command_line_is_one_line_too(args, message):
    """click's own usage errors (through `main`, as the installed command runs) were a boxed usage
    message of five lines."""
    code = "import sys\nfrom ilf_deploy.cli import main\nsys.argv[0] = 'ilf-deploy'\nmain()\n"
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120)
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 2 and len(lines) == 1 and message in lines[0], lines
    assert lines[0].startswith("error: ") and "--help" in lines[0]


def test_an_unreachable_ray_address_is_one_line_at_once(bundle, tmp_path):
    """Ray retried it for over a minute, printing warnings, after making the output directory."""
    (tmp_path / "p.jsonl").write_text('{"prompt": "x"}\n')
    started = time.monotonic()
    result = invoke(
        "batch",
        bundle,
        "--prompts",
        tmp_path / "p.jsonl",
        "-o",
        tmp_path / "o",
        "--ray-address",
        "127.0.0.1:1",
    )
    refused(result, "--ray-address 127.0.0.1:1: nothing answers there")
    assert time.monotonic() - started < 30 and not (tmp_path / "o").exists()
