"""Never a silent wrong answer (issue 31): non-finite latents stop the loop in one line naming the step
and the plan, plans are bounded at load, every bad `.npy` input is one line, a killed writer's staging
directory is removed by the next writer, and export-triton reads plans as Bundle.load does."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ilf_deploy.cli import app
from ilf_deploy.core.errors import ConfigError, NonFiniteError
from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.plan.model import MAX_STEPS
from ilf_deploy.core.runtime.bundle import Bundle, rewrite_manifest
from ilf_deploy.core.runtime.generator import Request

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def refused(result, fragment: str) -> str:
    text = result.output.strip()
    assert result.exit_code == 2, text
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert fragment in text, text
    return text


@pytest.fixture
def bundle(tiny_bundles) -> Path:
    return tiny_bundles["pixart-sigma"]


def plan_dict(bundle: Path, name: str = "base-4") -> dict:
    return json.loads((bundle / "plans" / f"{name}.json").read_text())


def write_plan(path: Path, plan: dict) -> Path:
    path.write_text(json.dumps(plan))
    return path


def huge_npy(path: Path, shape: tuple[int, ...]) -> Path:
    """A .npy of 64 bytes of data whose header claims `shape` (float32)."""
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (117 - len(header)) + "\n"
    path.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(64))
    return path


# -- finite or refused ---------------------------------------------------------------------------


def test_huge_latents_stop_the_loop_with_one_line_and_no_image(bundle, tmp_path):
    np.save(tmp_path / "big.npy", np.full((1, 4, 8, 8), 3e38, np.float32))
    out = tmp_path / "x.png"
    args = ["generate", bundle, "--plan", "base-4", "--prompt", "a cat", "--latents-in", tmp_path / "big.npy"]
    text = refused(invoke(*args, "-o", out), "non-finite latents after step 0 of plan 'base-4'")
    assert "(4 steps)" in text
    assert not out.exists()


def test_the_loop_names_the_step_where_latents_turned_non_finite(bundle):
    from ilf_deploy.engines.backends import open_generator

    generator = open_generator(bundle, "onnxruntime")
    plan = StepPlan.from_dict(plan_dict(bundle))
    latents = np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)
    ran = generator.generate_latents(plan, Request(prompt="a cat"), latents)
    assert np.isfinite(generator.latents_to_numpy(ran)).all()  # the check passes finite latents
    bad = plan_dict(bundle)
    bad["steps"][2]["coefficients"]["x"] = 1e4  # in bounds, but x * 1e4 ... over steps 2 and 3
    bad["steps"][3]["coefficients"]["x"] = 1e4
    bad["steps"][3]["coefficients"]["eps"] = 1e4
    bad_plan = StepPlan.from_dict(bad)
    with pytest.raises(NonFiniteError, match=r"after step \d of plan 'base-4'"):
        generator.generate_latents(bad_plan, Request(prompt="a cat"), latents * 1e30)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda p: p["steps"][0]["coefficients"].__setitem__("x", 1e308), "coefficient x 1e+308 is outside"),
        (lambda p: p["steps"][1]["coefficients"].__setitem__("eps", -2e4), "coefficient eps -20000.0"),
        (lambda p: p["steps"][0].__setitem__("timestep", 1e300), "timestep 1e+300 is outside"),
        (lambda p: p["steps"][0]["coefficients"].__setitem__("history", [0.5]), "1 history coefficients"),
        (lambda p: p["steps"][3]["coefficients"].__setitem__("history", [0.1, 0.1, 0.1]), "at most 2"),
    ],
)
def test_plans_out_of_bounds_are_refused_at_load(bundle, tmp_path, edit, message):
    plan = plan_dict(bundle)
    edit(plan)
    with pytest.raises(ConfigError, match=message.replace("+", r"\+")):
        StepPlan.from_dict(plan)
    path = write_plan(tmp_path / "coef.json", plan)
    out = tmp_path / "x.png"
    refused(invoke("generate", bundle, "--plan", path, "--prompt", "a cat", "-o", out), message)
    assert not out.exists()


def test_a_plan_of_more_steps_than_the_presets_cap_is_refused(bundle):
    plan = plan_dict(bundle)
    plan["steps"] = [dict(plan["steps"][0], index=i) for i in range(MAX_STEPS + 1)]
    plan["num_steps"] = len(plan["steps"])
    with pytest.raises(ConfigError, match=f"has {MAX_STEPS + 1} steps; a plan has at most {MAX_STEPS}"):
        StepPlan.from_dict(plan)


def with_x(bundle: Path, literal: str) -> str:
    """The bundle's base-4 plan as text, its first `x` coefficient replaced by `literal`."""
    text = (bundle / "plans" / "base-4.json").read_text()
    return re.sub(r'"x": [-0-9.e+]+', f'"x": {literal}', text, count=1)


def test_a_json_number_too_large_for_a_float_is_refused(bundle, tmp_path):
    path = tmp_path / "inf.json"
    path.write_text(with_x(bundle, "1e400"))  # json reads it as inf
    with pytest.raises(ConfigError, match="coefficient x inf is outside"):
        StepPlan.load(path)


def test_guidance_of_1e308_is_refused(bundle, tmp_path):
    out = tmp_path / "x.png"
    args = ["generate", bundle, "--plan", "base-4", "--prompt", "a cat", "--guidance-scale", "1e308"]
    refused(invoke(*args, "-o", out), "guidance_scale must be in 0..30")
    assert not out.exists()


# -- .npy inputs: one line each --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p.write_bytes(b""), "the file is empty"),
        (lambda p: huge_npy(p, (1, 4, 100000, 100000)), "its header claims (1, 4, 100000, 100000) float32"),
        (lambda p: huge_npy(p, (2**40, 2**40, 1)), "but the file holds 64"),
        (lambda p: p.write_bytes(b"not an npy file at all"), "not a .npy file"),
        (lambda p: np.save(p, np.full((1, 4, 8, 8), np.nan, np.float32)), "holds NaN or infinite values"),
        (lambda p: np.save(p, np.array(["a"], dtype=object), allow_pickle=True), "is not a number type"),
    ],
)
def test_every_npy_problem_is_one_line(bundle, tmp_path, make, message):
    path = tmp_path / "in.npy"
    make(path)
    out = tmp_path / "x.png"
    args = ["generate", bundle, "--plan", "base-4", "--prompt", "a cat", "--latents-in", path, "-o", out]
    refused(invoke(*args), message)
    assert not out.exists()


# -- no leftovers ------------------------------------------------------------------------------------


def unlisted(root: Path) -> list[str]:
    """Files in the bundle that its manifest does not list (its own two files aside)."""
    listed = set(Bundle.load(root).manifest.files) | {"manifest.json", "manifest.sha256"}
    found = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}
    empty_dirs = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir() and not any(p.iterdir())}
    return sorted((found - listed) | empty_dirs)


def test_a_killed_quantize_leaves_nothing_after_the_next_quantize(tiny_bundles, tmp_path):
    root = Path(shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "b"))
    assert unlisted(root) == []
    code = (
        "import sys, ilf_deploy.build.quantization.quantize as q\n"
        "real = q.quantize_segment\n"
        "def slow(*a, **k):\n"
        "    n = real(*a, **k); print('wrote', flush=True); import time; time.sleep(600); return n\n"
        "q.quantize_segment = slow\n"
        "q.quantize_bundle(sys.argv[1], 'int8-dynamic')\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "wrote"
        staged = [p.name for p in root.iterdir() if ".tmp-" in p.name]
        assert any(name.startswith(".onnx.tmp-") for name in staged), staged
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert any(".tmp-" in p.name for p in root.iterdir())  # what kill -9 leaves
    result = invoke("quantize", root, "--mode", "int8-dynamic")
    assert result.exit_code == 0, result.output
    assert unlisted(root) == []


@pytest.fixture
def small_disk(tmp_path):
    """A directory on a tmpfs of a given size (KiB); skips where this process cannot mount one."""
    mounts = []

    def make(kib: int) -> Path:
        where = tmp_path / f"disk{len(mounts)}"
        where.mkdir()
        result = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(where)], capture_output=True
        )
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounts.append(where)
        return where

    yield make
    for where in mounts:
        subprocess.run(["umount", str(where)], check=False)


def test_quantize_on_a_full_disk_says_so_in_one_line(tiny_bundles, small_disk):
    source = tiny_bundles["pixart-alpha"]
    size = sum(p.stat().st_size for p in source.rglob("*") if p.is_file()) // 1024
    refused_once = False
    for margin in (100, 300, 500):  # KiB more than the bundle: the variant does not fit
        root = Path(shutil.copytree(source, small_disk(size + 64 + margin) / "b"))
        before = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
        result = invoke("quantize", root, "--mode", "int8-dynamic")
        if result.exit_code == 0:
            continue
        refused(result, "quantize: no space left on the device")
        assert sorted(str(p.relative_to(root)) for p in root.rglob("*")) == before  # nothing left behind
        refused_once = True
    assert refused_once


def test_a_live_writers_staging_directory_is_kept(tiny_bundles, tmp_path):
    from ilf_deploy.core.runtime.bundle import staging

    root = Path(shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "b"))
    with staging(root, "onnx") as mine:
        (mine / "x").write_text("x")
        with staging(root, "calibration") as other:  # another writer starting meanwhile
            assert mine.is_dir() and other.is_dir()
    old = root / ".onnx.tmp-old"
    old.mkdir()
    stale = time.time() - 2 * 3600
    os.utime(old, (stale, stale))  # no lock: an older tool's, or killed before it locked
    with staging(root, "onnx"):
        assert not old.exists()


# -- export-triton reads plans as Bundle.load does ---------------------------------------------------


def test_export_triton_refuses_a_bundle_whose_plan_has_a_nan(bundle, tmp_path):
    copy = Path(shutil.copytree(bundle, tmp_path / "b"))
    path = copy / "plans" / "base-4.json"
    path.write_text(with_x(bundle, "NaN"))
    rewrite_manifest(copy, lambda m: m["files"].__setitem__("plans/base-4.json", ""))
    with pytest.raises(ConfigError):
        Bundle.load(copy).plan("base-4")
    refused(invoke("export-triton", copy, "--out", tmp_path / "repo"), "base-4")
    assert not (tmp_path / "repo").exists()
