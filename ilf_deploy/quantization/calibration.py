"""Calibration data: every transformer segment's inputs along real step-plan trajectories.

`collect_calibration` runs a bundle plan on ONNX Runtime (fp32, the bundle's own segments) for a
list of prompts (or DiT class labels) and records, through the segment runner's `recorder`, the feeds of
every call of the embed / time / block / feedback / final segments: all steps, and both `t` and
`t_post` conditioning where the plan has a `t_post` (each sample is tagged with the timestep its
conditioning was computed for). The samples go into the bundle as `calibration/<segment>.npz`
(`np.savez_compressed`), listed in `manifest["calibration"]` and hashed in `manifest["files"]`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..backends.onnxruntime import open_generator
from ..errors import ConfigError
from ..runtime.bundle import Bundle, BundleError, rewrite_manifest
from ..runtime.generator import Request

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
SKIP = ("text_encoder", "vae_decoder", "context")  # never quantized: no calibration needed
DEFAULT_MAX_SAMPLES = 32  # per segment and conditioning kind (t, t_post): a uniform sample of the calls


class TrajectoryRecorder:
    """`OrtSegments.recorder`: keeps each segment's declared inputs, at most `max_samples` per
    segment and conditioning kind, as a seeded uniform sample over all calls (bounded memory)."""

    def __init__(self, bundle: Bundle, max_samples: int = DEFAULT_MAX_SAMPLES) -> None:
        if max_samples < 1:
            raise ConfigError(f"max samples must be >= 1, got {max_samples}")
        self.inputs = {
            name: [i["name"] for i in spec["inputs"]]
            for name, spec in bundle.manifest["segments"].items()
            if name not in SKIP
        }
        self.max_samples = max_samples
        # Kept per (segment, "t" | "t_post"): decimating one list would alias with the ILF passes.
        self.samples: dict[tuple[str, str], list[dict[str, np.ndarray]]] = {}
        self.tags: dict[tuple[str, str], list[tuple[int, float]]] = {}  # (step, timestep)
        self.calls: dict[tuple[str, str], int] = {}
        self._rng = np.random.default_rng(0)
        self.step = 0
        self.kind = "t"  # of the conditioning being computed now
        # id(conditioning array) -> (the array, kept alive so that its id is not reused; timestep; kind)
        self._tagged: dict[int, tuple[Any, float, str]] = {}

    def tag_conditioning(self, array: Any, timestep: float, kind: str) -> None:
        self._tagged[id(array)] = (array, timestep, kind)

    def new_trajectory(self) -> None:
        self.step = 0
        self._tagged.clear()

    def __call__(self, name: str, feeds: dict[str, np.ndarray]) -> None:
        if name not in self.inputs:
            return
        timestep = float(feeds["timestep"].reshape(-1)[0]) if "timestep" in feeds else float("nan")
        kind = self.kind if "timestep" in feeds else "t"
        for value in feeds.values():  # block/final feeds carry the time segment's outputs
            if id(value) in self._tagged:
                _, timestep, kind = self._tagged[id(value)]
        key = (name, kind)
        index = self.calls.get(key, 0)
        self.calls[key] = index + 1
        samples, tags = self.samples.setdefault(key, []), self.tags.setdefault(key, [])
        if index < self.max_samples:
            slot = index
        else:  # reservoir sampling: a uniform subset of all calls so far, whatever their order
            slot = int(self._rng.integers(0, index + 1))
            if slot >= self.max_samples:
                return
        sample = {k: np.array(feeds[k]) for k in self.inputs[name] if k in feeds}
        if slot == len(samples):
            samples.append(sample)
            tags.append((self.step, timestep))
        else:
            samples[slot], tags[slot] = sample, (self.step, timestep)

    def save(self, root: Path) -> dict[str, dict[str, Any]]:
        """One compressed .npz per segment: `NAME` for inputs of one shape (stacked), else `NAME.i`."""
        written = {}
        for name in self.inputs:
            keys = [k for k in ((name, "t"), (name, "t_post")) if self.samples.get(k)]
            if not keys:
                continue
            samples = [s for k in keys for s in self.samples[k]]
            tags = [(*tag, k[1] == "t_post") for k in keys for tag in self.tags[k]]
            arrays: dict[str, np.ndarray] = {
                "_step": np.array([s for s, _, _ in tags], np.int64),
                "_timestep": np.array([t for _, t, _ in tags], np.float32),
                "_t_post": np.array([p for _, _, p in tags], bool),
            }
            for key in samples[0]:
                values = [s[key] for s in samples]
                if len({v.shape for v in values}) == 1:
                    arrays[key] = np.stack(values)
                else:  # several resolutions: one array per sample
                    arrays.update({f"{key}.{i}": v for i, v in enumerate(values)})
            rel = f"{CALIBRATION_DIR}/{name}.npz"
            path = root / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".npz", dir=path.parent)
            os.close(fd)
            try:
                np.savez_compressed(tmp, **arrays)
                os.chmod(tmp, 0o644)
                os.replace(tmp, path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            calls = sum(c for (n, _), c in self.calls.items() if n == name)
            written[name] = {"file": rel, "samples": len(samples), "calls": calls}
        return written


def collect_calibration(
    bundle_path: str | Path,
    plan: str | None = None,
    prompts: Sequence[str] | None = None,
    class_labels: Sequence[int] | None = None,
    guidance_scale: float = 4.5,
    max_samples: int = DEFAULT_MAX_SAMPLES,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Record calibration samples into the bundle; returns `manifest["calibration"]`.

    The default plan is the bundle's first ILF plan (it exercises both `t` and `t_post`), else its
    first plan. Runs on the fp32 base segments whatever variants the bundle has.
    """

    bundle = Bundle.load(bundle_path)
    plan_name = plan or bundle.default_plan
    step_plan = bundle.plan(plan_name)
    if bundle.architecture == "dit":
        classes = int(bundle.model.get("num_classes", 1000))
        labels = [c % classes for c in (class_labels or DEFAULT_CLASS_LABELS)]
        requests = [
            Request(class_label=c, seed=i, guidance_scale=guidance_scale) for i, c in enumerate(labels)
        ]
    else:
        texts = list(prompts or DEFAULT_PROMPTS)
        if not texts or not all(t.strip() for t in texts):
            raise ConfigError("calibration prompts must be non-empty")
        requests = [Request(prompt=t, seed=i, guidance_scale=guidance_scale) for i, t in enumerate(texts)]

    generator = open_generator(bundle)
    segments = generator.segments
    recorder = TrajectoryRecorder(bundle, max_samples)
    time_outputs = [o["name"] for o in bundle.manifest["segments"]["time"]["outputs"]]
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

    root = Path(bundle_path)
    written = recorder.save(root)
    if not written:
        raise BundleError("the plan ran no transformer segment; nothing was recorded")
    record = {
        "plan": step_plan.name,
        "requests": len(requests),
        "guidance_scale": guidance_scale,
        "max_samples": max_samples,
        "segments": written,
    }

    def mutate(manifest: dict[str, Any]) -> None:
        old = manifest.get("calibration") or {}
        for entry in old.get("segments", {}).values():
            manifest["files"].pop(entry["file"], None)
            if entry["file"] not in {w["file"] for w in written.values()}:
                (root / entry["file"]).unlink(missing_ok=True)
        manifest["calibration"] = record
        manifest["files"].update({w["file"]: "" for w in written.values()})

    rewrite_manifest(root, mutate)
    return record


def load_calibration(bundle: Bundle, segment: str) -> list[dict[str, np.ndarray]]:
    """A segment's recorded feeds, one dict per sample (what a CalibrationDataReader yields)."""
    record = bundle.manifest.get("calibration")
    if not record or segment not in record["segments"]:
        raise BundleError(
            f"the bundle has no calibration data for {segment!r}; run `ilf-deploy calibrate {bundle.path}`"
        )
    with np.load(bundle.path / record["segments"][segment]["file"]) as data:
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
