"""The CLI: plan tables and JSON, generate, make-tiny, and one-line errors (exit 2) on bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ilf_deploy.cli import app

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def assert_one_line_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text
    assert len(text.splitlines()) == 1, text
    assert fragment in text


def test_plan_table_and_json():
    result = invoke("plan", "--steps", "10", "--loop", "8:19", "--feedback", "first2,last2")
    assert result.exit_code == 0, result.output
    assert "332 block forwards" in result.output and "1.69x" in result.output
    result = invoke("plan", "--steps", "10", "--loop", "8:19", "--feedback", "first2,last2", "--json")
    data = json.loads(result.output)
    assert data["block_forwards"] == 332 and len(data["steps"]) == 10
    result = invoke("plan", "--steps", "20", "--cache", "5:22", "--refresh-every", "3", "--json")
    assert json.loads(result.output)["block_forwards"] == 326
    assert json.loads(invoke("plan", "--steps", "12", "--json").output)["block_forwards"] == 336


def test_plan_from_model_reads_depth_and_loop(tiny_dirs, tmp_path):
    out = tmp_path / "plan.json"
    result = invoke("plan", "--model", tiny_dirs["dit"], "--steps", "6", "--feedback", "all", "--out", out)
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["num_blocks"] == 6 and data["scheduler"] == "DDIMScheduler"
    assert data["block_forwards"] == 6 * (6 + 2 * (data["loop"][1] - data["loop"][0] + 1) + 1) - 6 * (
        data["loop"][1] - data["loop"][0] + 1
    )


def test_plan_follows_the_default_models_feedback():
    from ilf_deploy.model.loading import load_model

    feedback = load_model("default").feedback.config
    data = json.loads(
        invoke("plan", "--model", "default", "--steps", "10", "--feedback", "first2", "--json").output
    )
    assert tuple(data["loop"]) == feedback.loop and data["settings"]["t_post"] == feedback.t_post
    forced = invoke(
        "plan", "--model", "default", "--steps", "10", "--feedback", "first2", "--t-post", "none", "--json"
    )
    assert json.loads(forced.output)["steps"][0]["t_post"] == 999


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (("plan", "--steps", "10", "--loop", "20:30"), "out of range"),
        (("plan", "--steps", "10", "--loop", "9:8"), "starts after"),
        (("plan", "--steps", "10", "--loop", "8-19"), "not of the form"),
        (("plan", "--steps", "3", "--loop", "8:19", "--feedback", "first2,last2"), "only 3"),
        (("plan", "--steps", "10", "--loop", "8:19", "--t-post", "sideways"), "t_post"),
        (("plan", "--steps", "10", "--cache", "4:9", "--loop", "8:19"), "overlaps the ILF loop 8:19 in part"),
        (("plan", "--steps", "0"), "steps"),
        (("plan", "--model", "/nonexistent/model"), "does not exist"),
        (("make-tiny", "sdxl", "/tmp/never-written"), "unknown tiny architecture"),
        (("generate", "/nonexistent/model", "--prompt", "x"), "does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(args, fragment):
    assert_one_line_error(invoke(*args), fragment)


def test_generate_errors(tiny_dirs, tmp_path):
    assert_one_line_error(invoke("generate", tiny_dirs["dit"], "--plan", "base-2"), "--class-label")
    assert_one_line_error(invoke("generate", tiny_dirs["pixart-alpha"], "--plan", "base-2"), "--prompt")
    assert_one_line_error(
        invoke("generate", tiny_dirs["pixart-alpha"], "--plan", "fast-2", "--prompt", "x"), "unknown plan"
    )
    bad = tmp_path / "bad.npy"
    np.save(bad, np.zeros((1, 4, 3, 3), dtype=np.float32))
    result = invoke(
        "generate", tiny_dirs["pixart-alpha"], "--plan", "base-2", "--prompt", "x", "--latents-in", bad
    )
    assert_one_line_error(result, "latents must have shape")
    result = invoke("generate", tiny_dirs["dit"], "--class-label", "1", "--out", tmp_path / "no" / "x.png")
    assert_one_line_error(result, "does not exist")
    result = invoke("generate", tiny_dirs["dit"], "--class-label", "1", "--device", "tpu")
    assert_one_line_error(result, "unknown device")


def test_generate_device_is_for_the_torch_backend(tiny_bundles):
    args = ("generate", tiny_bundles["dit"], "--plan", "base-4", "--class-label", "1", "--device", "cuda")
    assert_one_line_error(invoke(*args), "for the torch backend")


def test_generate_round_trip_with_latents(tiny_dirs, tmp_path):
    first, image = tmp_path / "a.npy", tmp_path / "a.png"
    args = (
        "generate",
        tiny_dirs["pixart-sigma"],
        "--plan",
        "ilf-4",
        "--prompt",
        "a red circle",
        "--seed",
        "4",
    )
    result = invoke(*args, "--latents-out", first, "--out", image)
    assert result.exit_code == 0, result.output
    assert Image.open(image).size == (32, 32)
    latents = np.load(first)
    assert latents.shape == (1, 4, 8, 8) and np.isfinite(latents).all()
    # The same seed gives the same latents; starting from given latents is honoured.
    again = tmp_path / "b.npy"
    assert invoke(*args, "--latents-out", again).exit_code == 0
    np.testing.assert_array_equal(np.load(again), latents)
    start = tmp_path / "start.npy"
    np.save(start, np.zeros((1, 4, 8, 8), dtype=np.float32))
    third = tmp_path / "c.npy"
    assert invoke(*args, "--latents-in", start, "--latents-out", third).exit_code == 0
    assert not np.array_equal(np.load(third), latents)


def test_make_tiny_and_help(tmp_path):
    result = invoke("make-tiny", "dit", tmp_path / "dit", "--layers", "4", "--loop", "1:2")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "dit" / "feedback" / "ilf_config.json").read_text())
    assert (config["loop_start"], config["loop_end"], config["num_blocks"]) == (1, 2, 4)
    assert_one_line_error(invoke("make-tiny", "dit", tmp_path / "dit"), "exists; pass --force")
    assert_one_line_error(
        invoke("make-tiny", "dit", tmp_path / "x", "--layers", "4", "--loop", "1:9"), "out of range"
    )
    assert not (tmp_path / "x").exists()
    for command in ("plan", "generate", "make-tiny"):
        result = invoke(command, "--help")
        assert result.exit_code == 0 and "Usage" in result.output


def test_bundle_commands(tiny_dirs, tmp_path):
    bundle = tmp_path / "bundle"
    result = invoke("build", tiny_dirs["dit"], "--out", bundle, "--plans", "base-4,ilf-4")
    assert result.exit_code == 0, result.output
    result = invoke("inspect", bundle)
    assert result.exit_code == 0 and "blocks_" in result.output and "ilf-4" in result.output
    assert json.loads(invoke("inspect", bundle, "--json").output)["architecture"] == "dit"
    report = tmp_path / "verify.json"
    result = invoke("verify", bundle, "--json-out", report)
    assert result.exit_code == 0, result.output
    assert all(check["ok"] for check in json.loads(report.read_text()))
    bench_json, chart = tmp_path / "bench.json", tmp_path / "bench.png"
    result = invoke("bench", bundle, "--runs", "1", "--json-out", bench_json, "--plot", chart)
    assert result.exit_code == 0, result.output
    rows = {row["plan"]: row for row in json.loads(bench_json.read_text())["plans"]}
    assert rows["ilf-4"]["block_forwards"] > rows["base-4"]["block_forwards"]  # every step has feedback
    assert rows["ilf-4"]["predicted_speedup"] == pytest.approx(
        rows["base-4"]["block_forwards"] / rows["ilf-4"]["block_forwards"]
    )
    assert "blocks_" in " ".join(rows["ilf-4"]["stages"]) and Image.open(chart).size[0] > 0
    image = tmp_path / "x.png"
    result = invoke("generate", bundle, "--plan", "ilf-4", "--class-label", "2", "--out", image)
    assert result.exit_code == 0, result.output
    assert Image.open(image).size == (32, 32)
    torch_args = ("generate", bundle, "--plan", "ilf-4", "--class-label", "2", "--backend", "torch")
    result = invoke(*torch_args, "--out", image, "--force")  # the same file again: replaced
    assert result.exit_code == 0, result.output


def test_bundle_command_errors(tiny_dirs, tmp_path):
    bundle = tmp_path / "bundle"
    assert invoke("build", tiny_dirs["dit"], "--out", bundle, "--plans", "base-2").exit_code == 0
    assert_one_line_error(invoke("build", tiny_dirs["dit"], "--out", bundle), "--force")
    assert_one_line_error(
        invoke("build", tiny_dirs["dit"], "--out", tmp_path / "x", "--precision", "int2"), "precision"
    )
    assert_one_line_error(
        invoke("build", tiny_dirs["dit"], "--out", tmp_path / "x", "--resolutions", "big"), "HxW"
    )
    assert_one_line_error(invoke("inspect", tmp_path), "not a bundle")
    assert_one_line_error(
        invoke("generate", bundle, "--plan", "ilf-4", "--class-label", "1"), "not in this bundle"
    )
    assert_one_line_error(
        invoke("generate", bundle, "--plan", "base-2", "--class-label", "1", "--backend", "tensorrt"),
        "TensorRT",  # a known backend; without TensorRT (CI) it says so in one line
    )
    assert_one_line_error(
        invoke("generate", bundle, "--plan", "base-2", "--class-label", "1", "--backend", "bogus"),
        "unknown backend",
    )
    assert_one_line_error(
        invoke("generate", tiny_dirs["dit"], "--class-label", "1", "--backend", "onnxruntime"), "not a bundle"
    )
    assert_one_line_error(invoke("bench", bundle, "--runs", "0"), "--runs")
    (bundle / "plans" / "base-2.json").write_text("{}")
    assert_one_line_error(invoke("verify", bundle), "sha256")


def test_the_cli_starts_without_the_optional_extras(tmp_path):
    """onnx/onnxruntime and fastapi/uvicorn are extras: commands that need them say what to install
    in one line (exit 2, nothing written); the others work."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "for name in ('fastapi', 'uvicorn', 'onnx', 'onnxruntime'):\n"
        "    sys.modules[name] = None  # as if not installed: importing them raises ImportError\n"
        "from ilf_deploy.cli import main\n"
        "main()\n"
    )

    def cli(*args):
        return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)

    plan = cli("plan", "--steps", "4")
    assert plan.returncode == 0 and "Traceback" not in plan.stderr, plan.stderr
    assert "749" in plan.stdout, plan.stdout  # the second timestep of 4 DPM-Solver steps
    for args, extra in (
        (("serve", tmp_path), "pip install 'ilf-deploy[serve]'"),
        (("build", "default", "--out", tmp_path / "bundle"), "pip install 'ilf-deploy[export]'"),
    ):
        result = cli(*args)
        text = (result.stdout + result.stderr).strip()
        assert result.returncode == 2 and "Traceback" not in text, text
        assert extra in text and len(text.splitlines()) == 1, text
    assert not (tmp_path / "bundle").exists()
