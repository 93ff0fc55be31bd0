"""The one feed recorder: what segments a generator's `SegmentRunner.recorder` sees, kept per segment.

`calibrate` records every transformer segment's declared inputs along real trajectories (a bounded,
seeded uniform sample per segment and conditioning kind, tagged with its step and timestep); the
comparator records a reference run's feeds to replay them on a candidate (`verify-variant`,
`verify-engines`, `tune`), and `verify` an engine's, to replay them on PyTorch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ilf_deploy.core.errors import check_at_least
from ilf_deploy.core.files import atomic_file
from ilf_deploy.core.runtime.bundle import Bundle

SKIP = ("text_encoder", "vae_decoder", "context")  # never quantized: no calibration needed
DEFAULT_MAX_SAMPLES = 32  # per segment and conditioning kind (t, t_post): a uniform sample of the calls


class TrajectoryRecorder:
    """`SegmentRunner.recorder`: keeps each segment's declared inputs (`all_feeds`: every feed the
    runtime gave, for a reference that takes inputs a graph dropped), at most `max_samples` per
    segment and conditioning kind, as a seeded uniform sample over all calls (bounded memory).
    `segments`: those to record (default: all but SKIP's); `to_numpy`: the runner's arrays to numpy."""

    def __init__(
        self,
        bundle: Bundle,
        max_samples: int = DEFAULT_MAX_SAMPLES,
        segments: Iterable[str] | None = None,
        all_feeds: bool = False,
        to_numpy: Callable[[Any], np.ndarray] = np.asarray,
    ) -> None:
        check_at_least("max samples", max_samples)
        wanted = set(segments) if segments is not None else set(bundle.manifest.segments) - set(SKIP)
        self.inputs = {
            name: list(spec.input_names) for name, spec in bundle.manifest.segments.items() if name in wanted
        }
        self.max_samples, self.all_feeds, self.to_numpy = max_samples, all_feeds, to_numpy
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

    def feeds(self, segment: str) -> list[dict[str, np.ndarray]]:
        """Every sample kept for `segment` (`t`'s, then `t_post`'s)."""
        return [s for kind in ("t", "t_post") for s in self.samples.get((segment, kind), [])]

    def __call__(self, name: str, feeds: dict[str, Any]) -> None:
        if name not in self.inputs:
            return
        timestep = float(self.to_numpy(feeds["timestep"]).reshape(-1)[0]) if "timestep" in feeds else np.nan
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
        keys = feeds if self.all_feeds else [k for k in self.inputs[name] if k in feeds]
        sample = {k: np.array(self.to_numpy(feeds[k])) for k in keys}
        if slot == len(samples):
            samples.append(sample)
            tags.append((self.step, timestep))
        else:
            samples[slot], tags[slot] = sample, (self.step, timestep)

    def save(self, root: Path, folder: str) -> dict[str, dict[str, Any]]:
        """One compressed .npz per segment in `root/folder`: `NAME` for inputs of one shape
        (stacked), else `NAME.i`."""
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
            rel = f"{folder}/{name}.npz"
            _save_npz(root / rel, arrays)
            calls = sum(c for (n, _), c in self.calls.items() if n == name)
            written[name] = {"file": rel, "samples": len(samples), "calls": calls}
        return written


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez_compressed`, atomically (files.atomic_file), mode 0644."""
    with atomic_file(path) as tmp, tmp.open("wb") as f:  # a file object: numpy adds no ".npz"
        np.savez_compressed(f, **arrays)
