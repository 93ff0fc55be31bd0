"""Calibration data: every transformer segment's inputs along real step-plan trajectories.

`collect_calibration` runs a bundle plan on ONNX Runtime (fp32, the bundle's own segments) for a
list of prompts (or DiT class labels) and records, through the segment runner's `recorder`, the feeds of
every call of the embed / time / block / feedback / final segments: all steps, and both `t` and
`t_post` conditioning where the plan has a `t_post` (each sample is tagged with the timestep its
conditioning was computed for). The samples go into the bundle as `calibration/<segment>.npz`
(`np.savez_compressed`), listed in `manifest["calibration"]` and hashed in `manifest["files"]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle, BundleError, remove_unlisted, rewrite_manifest, staging
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.engines.backends.onnxruntime import open_generator
from ilf_deploy.engines.backends.plans import resolve_bundle_plan
from ilf_deploy.engines.compare.recorder import DEFAULT_MAX_SAMPLES, TrajectoryRecorder

CALIBRATION_DIR = "calibration"
# Short, varied prompts in the PixArt style: the activations' range depends on the text conditioning.
DEFAULT_PROMPTS = (
    "a small red circle on a blue background",
    "a photograph of a cat sitting on a wooden table",
    "a watercolor painting of mountains at sunset",
    "a city street at night with neon lights, rain",
    "a bowl of fruit, studio lighting, high detail",
    "an astronaut riding a horse on the moon",
    "a close-up portrait of an old man with a beard",
    "a green field with a single tree under a cloudy sky",
)
DEFAULT_CLASS_LABELS = (1, 207, 360, 387, 974, 88, 979, 417)  # DiT (ImageNet ids, clipped to the model)


def collect_calibration(
    bundle_path: str | Path,
    plan: str | None = None,
    prompts: Sequence[str] | None = None,
    class_labels: Sequence[int] | None = None,
    guidance_scale: float | None = None,  # None: the model's default (Generator.resolve)
    max_samples: int = DEFAULT_MAX_SAMPLES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Record calibration samples into the bundle; returns `manifest["calibration"]`.

    The default plan is the bundle's first ILF plan (it exercises both `t` and `t_post`), else its
    first plan. Runs on the fp32 base segments whatever variants the bundle has.
    """

    bundle = Bundle.load(bundle_path)
    step_plan = resolve_bundle_plan(bundle, plan or bundle.default_plan)  # the one plan resolver
    requests = calibration_requests(bundle, prompts, class_labels, guidance_scale)
    generator = open_generator(bundle)
    recorder = TrajectoryRecorder(bundle, max_samples)
    _record(generator, recorder, step_plan, requests, progress)
    root = Path(bundle_path)
    with staging(root, CALIBRATION_DIR) as staged:  # renamed in just before the manifest is written
        written = recorder.save(staged, CALIBRATION_DIR)
        if not written:
            raise BundleError("the plan ran no transformer segment; nothing was recorded")
        record = {
            "plan": step_plan.name,
            "requests": len(requests),
            "guidance_scale": generator.resolve(requests[0]).guidance_scale,
            "max_samples": max_samples,
            "segments": written,
        }

        def mutate(manifest: dict[str, Any]) -> None:
            old = manifest.get("calibration") or {}
            for entry in old.get("segments", {}).values():
                manifest["files"].pop(entry["file"], None)
            manifest["calibration"] = record

        manifest = rewrite_manifest(root, mutate, staged)
    remove_unlisted(root, CALIBRATION_DIR, manifest)  # the old samples the new ones did not replace
    return record


def calibration_requests(
    bundle: Bundle,
    prompts: Sequence[str] | None,
    class_labels: Sequence[int] | None,
    guidance_scale: float | None,
) -> list[Request]:
    """One request per prompt (PixArt) or class label (DiT), seeded 0, 1, …"""
    if bundle.architecture == "dit":
        classes = bundle.model.num_classes
        labels = [c % classes for c in (class_labels or DEFAULT_CLASS_LABELS)]
        return [Request(class_label=c, seed=i, guidance_scale=guidance_scale) for i, c in enumerate(labels)]
    texts = list(prompts or DEFAULT_PROMPTS)
    if not texts or not all(t.strip() for t in texts):
        raise ConfigError("calibration prompts must be non-empty")
    return [Request(prompt=t, seed=i, guidance_scale=guidance_scale) for i, t in enumerate(texts)]


def _record(generator: Any, recorder: TrajectoryRecorder, step_plan, requests, progress) -> None:
    """Run every request's trajectory with `recorder` seeing the segment feeds, each tagged with
    its step and conditioning kind (t, or t_post on the feedback's second pass)."""
    segments = generator.segments
    time_outputs = list(generator.bundle.segment_spec("time").output_names)
    conditioning = segments.conditioning
    state = {"step": -1}

    def tagged(timestep: float, context: Any) -> Any:  # remembers which timestep each cond is for
        # runtime.loop computes cond(t) first in every step, then cond(t_post) when the step has one
        recorder.kind = "t_post" if recorder.step == state["step"] else "t"
        state["step"] = recorder.step
        cond = conditioning(timestep, context)
        for key in time_outputs:
            recorder.tag_conditioning(cond[key], timestep, recorder.kind)
        return cond

    segments.conditioning = tagged  # type: ignore[method-assign]
    segments.recorder = recorder

    def on_step(index: int) -> None:
        recorder.step = index + 1

    for number, request in enumerate(requests):
        if progress:
            progress(f"trajectory {number + 1}/{len(requests)} ({step_plan.name})")
        recorder.new_trajectory()
        state["step"] = -1
        generator.generate_latents(step_plan, request, on_step=on_step)


def load_calibration(bundle: Bundle, segment: str) -> list[dict[str, np.ndarray]]:
    """A segment's recorded feeds, one dict per sample (what a CalibrationDataReader yields)."""
    record = bundle.manifest.calibration
    if record is None or segment not in record.files:
        raise BundleError(
            f"the bundle has no calibration data for {segment!r}; run `ilf-deploy calibrate {bundle.path}`"
        )
    with np.load(bundle.path / record.files[segment]) as data:
        arrays = {k: data[k] for k in data.files if not k.startswith("_")}
        count = len(data["_step"])
    samples: list[dict[str, np.ndarray]] = [{} for _ in range(count)]
    for key, value in arrays.items():
        if "." in key:
            name, index = key.rsplit(".", 1)
            samples[int(index)][name] = value
        else:
            for i in range(count):
                samples[i][key] = value[i]
    return samples
