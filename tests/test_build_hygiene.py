"""Build hygiene: what a killed build leaves beside --out is removed by the next build (but never a
running build's), and a file-system error (a full disk) is one line and leaves nothing behind."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.files import UNLOCKED_GRACE_S, staged_directory, sweep_staged
from ilf_deploy.model.tiny import make_tiny_pipeline

PLANS = ("base-2", "ilf-2")
CLI = "import sys\nfrom ilf_deploy.cli import main\nsys.argv[0] = 'ilf-deploy'\nmain()\n"


@pytest.fixture(scope="module")
def tiny_dit(tmp_path_factory) -> Path:
    """The smallest full pipeline there is: DiT (no text encoder) with 2 blocks."""
    return make_tiny_pipeline("dit", tmp_path_factory.mktemp("hygiene") / "dit", seed=7, num_layers=2)


def cli(*args) -> subprocess.Popen:
    command = [sys.executable, "-c", CLI, *map(str, args)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, what: str, timeout: float = 120.0, process: subprocess.Popen | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        if process is not None and process.poll() is not None:
            pytest.fail(f"the process ended before {what}: {process.stdout.read()}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def test_a_killed_build_leaves_nothing_after_the_next_build(tiny_dit, tmp_path):
    parent = tmp_path / "out"
    parent.mkdir()
    out = parent / "bundle"
    build = cli("build", tiny_dit, "--out", out, "--plans", ",".join(PLANS))
    try:
        # the export has begun: the temp dir is locked and the first segment's directory exists
        tmp = wait_for(
            lambda: next((p for p in parent.glob(".bundle.tmp-*") if (p / "onnx").is_dir()), None),
            "the build's temp dir",
            process=build,
        )
        assert (parent / f"{tmp.name}.lock").is_file()
        build.send_signal(signal.SIGKILL)
        build.wait(30)
    finally:
        if build.poll() is None:
            build.kill()
        build.stdout.close()
    assert build.returncode == -signal.SIGKILL
    assert tmp.is_dir() and not out.exists()  # what the kill left

    build_bundle(tiny_dit, out, BuildOptions(plans=PLANS))
    assert sorted(os.listdir(parent)) == ["bundle"]
    assert (out / "manifest.json").is_file() and not any(p.name.endswith(".lock") for p in out.rglob("*"))


def test_a_force_build_killed_between_its_renames_gives_the_previous_bundle_back(tiny_dit, tmp_path):
    """A --force build renames NAME to .NAME.old, then the new bundle to NAME: a kill in between leaves
    no NAME. The next build renames the previous bundle back (never deletes it), then replaces it
    only with --force."""
    out = tmp_path / "bundle"
    build_bundle(tiny_dit, out, BuildOptions(plans=PLANS))
    previous = (out / "manifest.json").read_bytes()
    out.rename(tmp_path / ".bundle.old")  # the state between the renames
    (tmp_path / ".bundle.tmp-killed").mkdir()  # the new bundle, whose build is dead:
    (tmp_path / ".bundle.tmp-killed.lock").write_text("pid 1\n")  # nobody holds its lock

    with pytest.raises(ConfigError, match="exists; choose another --out or pass --force"):
        build_bundle(tiny_dit, out, BuildOptions(plans=PLANS))
    assert sorted(os.listdir(tmp_path)) == ["bundle"]
    assert (out / "manifest.json").read_bytes() == previous

    (out / "stale-file").write_text("x")
    build_bundle(tiny_dit, out, BuildOptions(plans=("base-2",), force=True))
    assert sorted(os.listdir(tmp_path)) == ["bundle"] and not (out / "stale-file").exists()


def hold_workspace(out: Path) -> tuple[subprocess.Popen, Path]:
    """Another process in the middle of a build of `out`: it holds its temp dir until killed."""
    code = (
        "import sys, time\nfrom pathlib import Path\nfrom ilf_deploy.core.files import staged_directory\n"
        "with staged_directory(Path(sys.argv[1])) as tmp:\n    print(tmp, flush=True)\n    time.sleep(600)\n"
    )
    process = subprocess.Popen([sys.executable, "-c", code, str(out)], stdout=subprocess.PIPE, text=True)
    return process, Path(process.stdout.readline().strip())


def test_a_running_builds_temp_dir_is_kept(tmp_path):
    out = tmp_path / "bundle"
    process, running = hold_workspace(out)
    try:
        assert running.is_dir()
        old = tmp_path / ".bundle.old"
        old.mkdir()  # may be the running build's, in the middle of replacing the bundle
        dead = tmp_path / ".bundle.tmp-dead"
        dead.mkdir()
        (tmp_path / ".bundle.tmp-dead.lock").write_text("pid 1\n")  # nobody holds it
        unlocked_young, unlocked_old = tmp_path / ".bundle.tmp-young", tmp_path / ".bundle.tmp-stale"
        unlocked_young.mkdir()
        unlocked_old.mkdir()
        stale = time.time() - UNLOCKED_GRACE_S - 60
        os.utime(unlocked_old, (stale, stale))
        other = tmp_path / ".other.tmp-x"  # another --out's
        other.mkdir()

        assert sorted(p.name for p in sweep_staged(out)) == [".bundle.tmp-dead", ".bundle.tmp-stale"]
        assert running.is_dir() and (tmp_path / f"{running.name}.lock").is_file()
        assert old.is_dir() and unlocked_young.is_dir() and other.is_dir()
        assert not (tmp_path / ".bundle.tmp-dead.lock").exists()

        process.send_signal(signal.SIGKILL)  # now it is a killed build
        process.wait(30)
        shutil.rmtree(unlocked_young)
        assert {p.name for p in sweep_staged(out)} == {running.name}
        assert sorted(os.listdir(tmp_path)) == [".other.tmp-x", "bundle"]  # .bundle.old given back
        (tmp_path / "bundle").rename(old)
        (tmp_path / "bundle").mkdir()  # with a bundle in place, .bundle.old is a leftover
        assert {p.name for p in sweep_staged(out)} == {".bundle.old"}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stdout.close()


def test_this_process_workspace_is_kept_and_removed_after(tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(KeyboardInterrupt), staged_directory(out) as tmp:
        assert sweep_staged(out) == [] and tmp.is_dir()
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_a_full_disk_is_one_line_and_leaves_nothing(tiny_dit, tmp_path):
    full = tmp_path / "full"
    full.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small tmpfs")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a 1 MiB tmpfs here (needs root): {mounted.stderr.strip()}")
    try:
        build = cli("build", tiny_dit, "--out", full / "bundle", "--plans", ",".join(PLANS))
        output, _ = build.communicate(timeout=300)
        assert build.returncode == 2, output
        assert "Traceback" not in output, output
        assert len(output.strip().splitlines()) == 1, output
        assert "build failed: No space left on device" in output and "free space" in output, output
        assert os.listdir(full) == []
    finally:
        if subprocess.run(["umount", str(full)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(full)], capture_output=True)
