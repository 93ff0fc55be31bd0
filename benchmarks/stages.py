"""A peer benchmark's model directory and bundle, prepared one stage per process (benchmarks/peer*.py).

The stages: the model directory, the bundle (`build`, with the model copied in for `tune`'s torch
candidates), its calibration and each quantized variant. At the real sizes each one alone needs most
of a 24 GiB machine (full-depth SD3-medium peaked at about 9 / 19 / 12 / 14 GB for model / bundle /
calibration / int8-ov), and one process doing them all kept what the earlier ones had taken and was
killed; so each runs in a child process of its own, and one whose output is there is skipped: an
interrupted prepare resumes where it stopped. Each output is complete or absent: the model writers
rename their directory into place, `build` stages the bundle, `calibrate` and `quantize` rename their
files in just before the manifest that lists them. The model directory and each bundle are reused
only while their stamps (benchmarks/reuse.py) match this code and these settings. The parent runs
none of them: in a process that had just built, calibrated and quantized, torch ran ~20x slower
(torch fp32 3.6 s/step in tune, 0.15 s in a fresh process; the cause was not isolated), which would
flatter every ratio against torch and diffusers. It prints each stage's seconds and peak RSS.

The bundle's copy of the model is replaced by hard links to the model directory's identical files
(checked against the bundle manifest's hashes), so the benchmark stores the weights once; `build`
itself always copies.

    python -m benchmarks.stages MODULE:FUNCTION PATH JSON   # a stage: FUNCTION(Path(PATH), **JSON)
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial, reduce
from pathlib import Path
from typing import Any

from benchmarks.peer import log
from benchmarks.reuse import reuse_or_clear

PEAK_FILE_ENV = "ILF_STAGE_PEAK_FILE"  # where a stage's child writes its own peak RSS (KiB)
STAGES = "benchmarks.stages"  # this module, by the name its children import it by (not __main__)
CALIBRATION_PROMPTS, CALIBRATION_SAMPLES = 2, 8  # 2 trajectories, at most 8 samples per segment
CHILD_GRACE_S = 30.0  # after a Ctrl-C, how long a stage may take to remove its staging


@dataclass(frozen=True)
class Stage:
    name: str
    function: str  # "module:function", called in a child process as function(Path(path), **kwargs)
    path: Path  # what it writes
    done: Callable[[], bool]  # its output is there (checked here, in the parent)
    kwargs: dict[str, Any] = field(default_factory=dict)  # JSON


def prepare(
    work: Path,
    write_model: str,
    model_kwargs: dict[str, Any],
    plans: Sequence[str],
    resolution: int,
    modes: Sequence[str],
    calibration_plan: str,
    rebuild: bool = False,
    bundle_name: str = "bundle",
    build_options: dict[str, Any] | None = None,
) -> tuple[Path, Path]:
    """`work/model` (by `write_model`, "module:function" called as function(out, **model_kwargs),
    which writes the directory and renames it into place) and `work/bundle` (`plans` at `resolution`
    px, fp32, with the model's files linked in) with the `modes` variants, calibrated where a mode
    needs it on CALIBRATION_PROMPTS trajectories of `calibration_plan`; each stage in a process of
    its own, skipped when its output is there and was made by this code with these settings
    (benchmarks/reuse.py; else made anew). `rebuild`: everything is made anew. `bundle_name`
    and `build_options` (BuildOptions fields, JSON): another bundle of the same model, built so."""
    from ilf_deploy.build.quantization.quantize import CALIBRATION_FREE_MODES, default_variant_name

    if rebuild:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    model, bundle = work / "model", work / bundle_name
    bundle_options = {"plans": list(plans), "resolution": resolution, **(build_options or {})}
    model_stamp = reuse_or_clear(model, {"function": write_model, **model_kwargs})  # a new model: new bundles
    reuse_or_clear(bundle, {"model": model_stamp, **bundle_options, "calibration_plan": calibration_plan})
    stages = [
        Stage("model", write_model, model, (model / "model_index.json").is_file, model_kwargs),
        Stage(
            "bundle", f"{STAGES}:build", bundle, partial(_written, bundle, "torch_model"),
            {"model": str(model), **bundle_options},
        ),
    ]  # fmt: skip
    modes = _buildable(modes)
    if any(mode not in CALIBRATION_FREE_MODES for mode in modes):
        done = partial(_written, bundle, "calibration")
        stages.append(Stage("calibrate", f"{STAGES}:calibrate", bundle, done, {"plan": calibration_plan}))
    for mode in modes:
        done = partial(_written, bundle, "variants", default_variant_name(mode))
        stages.append(Stage(f"quantize {mode}", f"{STAGES}:quantize", bundle, done, {"mode": mode}))
    run_stages(stages[:2])
    link_model_files(bundle, model)  # no child: it hashes files, no more
    run_stages(stages[2:])
    return model, bundle


def _buildable(modes: Sequence[str]) -> list[str]:
    """`modes` less int8-ov where OpenVINO is missing (said once)."""
    from ilf_deploy.engines.backends import REGISTRY

    if "int8-ov" in modes and "openvino" in REGISTRY and REGISTRY["openvino"].missing():
        log("OpenVINO is missing: no int8-ov variant")
        return [mode for mode in modes if mode != "int8-ov"]
    return list(modes)


def _manifest(bundle: Path, key: str) -> Any:
    """`key` of the bundle's manifest (None without a bundle)."""
    if not (bundle / "manifest.json").is_file():
        return None
    return json.loads((bundle / "manifest.json").read_text()).get(key)


def _written(bundle: Path, key: str, item: str | None = None) -> bool:
    """The bundle's manifest lists `key` (with `item`: `item` in `key`): what a stage writes last."""
    value = _manifest(bundle, key)
    return value is not None if item is None else item in (value or {})


def run_stages(stages: Sequence[Stage]) -> None:
    """Each stage whose output is not there, in a child process; a line for each with its seconds
    and peak RSS. A stage that fails (or leaves no output) ends the benchmark with one line."""
    for stage in stages:
        label = f"prepare: {stage.name} ({stage.path})"
        if stage.done():
            log(f"{label}: there already")
            continue
        log(f"{label}: running")
        seconds, peak_kib, code = run_child(stage)
        if code != 0:
            why = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            hint = " (out of memory?)" if code == -signal.SIGKILL else ""
            raise SystemExit(f"{label} failed after {seconds:.0f} s: {why}{hint}")
        if not stage.done():
            raise SystemExit(f"{label} ended without writing its output")
        log(f"{label}: done in {seconds:.0f} s, peak RSS {size_text(peak_kib * 1024)}")


def size_text(size: int) -> str:
    """`size` bytes in GiB (MiB below one GiB)."""
    return f"{size / 2**30:.1f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def run_child(stage: Stage) -> tuple[float, int, int]:
    """Run `stage` in a child process: (seconds, the child's peak RSS in KiB, its exit code; minus
    the signal that killed it)."""
    # The child writes its own VmHWM: the kernel's ru_maxrss of a child that was forked from this
    # process keeps this process's RSS at the fork (across exec), so a small stage reported ours.
    descriptor, name = tempfile.mkstemp(prefix="ilf-stage-peak-")
    os.close(descriptor)
    peak_file = Path(name)
    argv = [sys.executable, "-m", STAGES, stage.function, str(stage.path), json.dumps(stage.kwargs)]
    start = time.perf_counter()
    child = subprocess.Popen(argv, env={**os.environ, PEAK_FILE_ENV: str(peak_file)})
    try:
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage, not all children's
    except BaseException:  # Ctrl-C: the child had it too; let it clean up, then do not leave it running
        try:
            child.wait(timeout=CHILD_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        raise
    child.returncode = os.waitstatus_to_exitcode(status)
    text = peak_file.read_text().strip()
    peak_file.unlink()
    # killed before it could write: the kernel's figure, an upper bound (ours at the fork included)
    return time.perf_counter() - start, int(text) if text else usage.ru_maxrss, child.returncode


# -- the stages (each runs in its child process) ----------------------------------------------------


def build(bundle: Path, model: str, plans: list[str], resolution: int, **fields: Any) -> None:
    from ilf_deploy.build.export.build import BuildOptions, build_bundle

    options = BuildOptions(
        plans=tuple(plans), resolutions=[(resolution, resolution)], force=True, copy_model=True, **fields
    )
    build_bundle(Path(model), bundle, options)


def calibrate(bundle: Path, plan: str) -> None:
    from ilf_deploy.build.quantization.calibration import DEFAULT_PROMPTS, collect_calibration

    prompts = DEFAULT_PROMPTS[:CALIBRATION_PROMPTS]
    collect_calibration(bundle, plan, prompts, max_samples=CALIBRATION_SAMPLES)


def quantize(bundle: Path, mode: str) -> None:
    from ilf_deploy.build.quantization.quantize import default_variant_name, quantize_bundle

    quantize_bundle(bundle, mode, default_variant_name(mode))


# -- the model stored once --------------------------------------------------------------------------


def link_model_files(bundle: Path, model: Path) -> int:
    """Replace each file of the bundle's model copy by a hard link to the model directory's file
    where that one has the digest the bundle's manifest lists for the copy (so the bundle verifies
    as before); returns the bytes no longer stored twice. Files already linked are passed by
    (a stat), so a rerun costs nothing; each file is swapped by a rename (`atomic_file`)."""
    from ilf_deploy.core.files import atomic_file
    from ilf_deploy.core.runtime.bundle import sha256_file

    copy = _manifest(bundle, "torch_model")
    if copy is None:
        return 0
    files: dict[str, str] = _manifest(bundle, "files")
    saved = 0
    for name, digest in files.items():
        if not name.startswith(f"{copy}/"):
            continue
        ours, source = bundle / name, model / Path(name).relative_to(copy)
        if not source.is_file() or not ours.is_file() or ours.samefile(source):
            continue
        if source.stat().st_size != ours.stat().st_size or sha256_file(source) != digest:
            continue  # not the copy's bytes: the bundle keeps its own
        with atomic_file(ours, stat.S_IMODE(source.stat().st_mode)) as staged:
            staged.unlink()
            os.link(source, staged)
        saved += source.stat().st_size
    if saved:
        log(f"{bundle / copy}: {size_text(saved)} of model files linked to {model}'s, not stored twice")
    return saved


def main(argv: list[str]) -> int:
    target, path, kwargs = argv
    module, name = target.split(":")
    function = reduce(getattr, name.split("."), importlib.import_module(module))  # "Class.method" too
    function(Path(path), **json.loads(kwargs))
    if PEAK_FILE_ENV in os.environ:  # this process's own peak RSS, for run_child
        status = Path("/proc/self/status").read_text()
        peak_kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))
        Path(os.environ[PEAK_FILE_ENV]).write_text(peak_kib)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
