"""The contract of every engine backend: a bundle's segments, run by name.

Modelled on Polygraphy's runners (polygraphy/backend/base/runner.py): `run` checks a call's feeds
against the segment's declared inputs, shows them to a recorder, times the call and hands it to the
backend's `infer_impl`; activation is a context manager. Arrays are numpy unless a backend overrides
the few array operations (TensorRT: torch CUDA tensors).

On top of `run`, this class is the denoising loop's `Segments`: conditioning, embedding, block
ranges over the bundle's block segments, the ILF inner loop (eqs. 2–3) and the final layer. A new
engine implements `infer_impl` (and, if its arrays are not numpy, the array operations).
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle, BundleError
from ilf_deploy.core.runtime.manifest import CROSS_KV_SEGMENT
from ilf_deploy.core.state import State, feed_name, output_name

Array = Any  # the backend's array type
Feeds = dict[str, Array]
Recorder = Callable[[str, Feeds], None]


class Timings(defaultdict[str, list[float]]):
    """Seconds per call, by stage name; `bench` and `serve` read them for every backend."""

    def __init__(self) -> None:
        super().__init__(list)

    @contextlib.contextmanager
    def measure(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self[name].append(time.perf_counter() - start)


class SegmentRunner(ABC):
    """A bundle's segments (optionally a precision variant's) on one engine."""

    backend = ""  # the registry name, e.g. "onnxruntime"
    timed = True  # False where a per-call time would need a device sync (TensorRT without profiling)
    compiles_per_shape = False  # True: each shape set kept static is a compiled model (OpenVINO)

    def __init__(self, bundle: Bundle, variant: str | None = None) -> None:
        if variant is not None:
            spec = bundle.variant_spec(variant)  # an unknown variant fails here, listing the known ones
            if self.backend not in spec.engines:
                raise ConfigError(
                    f"variant {variant!r} ({spec.mode}) runs on --backend {' or '.join(spec.engines)}, "
                    f"not {self.backend}"
                )
        self.bundle, self.variant = bundle, variant
        model = bundle.model
        self.latent_channels = model.latent_channels
        self.num_blocks = model.num_blocks
        self.patch_size = model.patch_size
        self.out_channels = model.out_channels
        self.token_layout = model.token_layout
        self.state_names, self.state_init = model.state, model.state_init
        self.uses_positions = "pos_embed" in bundle.manifest.segment("embed").input_names
        self.loop = bundle.loop
        # (start, end, name, takes feed) for every block segment, in order
        self.block_segments = [
            (*spec.blocks, spec.name, spec.takes_feed)
            for spec in bundle.manifest.block_segments
            if spec.blocks
        ]
        self.timings = Timings()
        self.recorder: Recorder | None = None  # sees every call's feeds (verify, calibration)
        self._input_names: dict[str, list[str]] = {}
        self._positions: dict[tuple[int, int], Array] = {}

    # -- what a backend implements ------------------------------------------------------------
    @abstractmethod
    def infer_impl(self, name: str, feeds: Feeds) -> Feeds:
        """Run segment `name` on exactly its declared inputs; outputs by name."""

    # Array operations: numpy by default (ONNX Runtime, OpenVINO); TensorRT overrides them for torch.
    def array(self, value: Any) -> Array:
        """A numpy array (or an array of this backend) as this backend's array."""
        return np.asarray(value)

    def open_all(self) -> None:  # noqa: B027 (a no-op unless an engine opens segments lazily)
        """Open every segment now, not on its first call (engines that open lazily override this)."""

    def keep_static_shapes(self, count: int) -> None:  # noqa: B027 (a no-op unless an engine compiles per shape)
        """Keep up to `count` input-shape sets a segment compiled for their static shapes (OpenVINO
        overrides this); engines with one model for every shape (ONNX Runtime, TensorRT's profiles)
        ignore it."""

    def to_numpy(self, value: Array) -> np.ndarray:
        """This backend's array on the host, as numpy."""
        return np.asarray(value)

    def concat(self, arrays: list[Array]) -> Array:
        return np.concatenate(arrays)

    def zeros_like(self, array: Array) -> Array:
        return np.zeros_like(array)

    def permute(self, array: Array, axes: tuple[int, ...]) -> Array:
        return array.transpose(axes)

    @contextlib.contextmanager
    def activate(self) -> Iterator[SegmentRunner]:
        """The scope of one generation (TensorRT: its CUDA stream, synchronised at the end)."""
        yield self

    # -- the contract's common part -----------------------------------------------------------
    def input_names(self, name: str) -> list[str]:
        if name not in self._input_names:
            self._input_names[name] = list(self.bundle.segment_spec(name, self.variant).input_names)
        return self._input_names[name]

    def run(self, name: str, feeds: Feeds) -> Feeds:
        """Segment `name` on the feeds it declares (others, e.g. the rest of a conditioning dict,
        are ignored); a missing input is an error that names it."""
        names = self.input_names(name)
        missing = [n for n in names if n not in feeds]
        if missing:
            raise BundleError(f"segment {name} needs inputs {missing} the runtime did not give")
        if self.recorder is not None:  # all of them: a reference may take inputs the graph dropped
            self.recorder(name, feeds)
        selected = {n: feeds[n] for n in names}
        if not self.timed:
            return self.infer_impl(name, selected)
        with self.timings.measure(name):
            return self.infer_impl(name, selected)

    # -- runtime.loop.Segments ----------------------------------------------------------------
    def context(self, inputs: Feeds) -> Feeds:
        # The inputs the time segment reads (size conditions, a pooled prompt, Flux's guidance) stay
        # visible; no other: every entry left has the batch as its first axis, or one row for all
        # (Flux's rotary tables), which is what the adaptive cache's row picking relies on (cache.py).
        passed = {name: inputs[name] for name in self.input_names("time") if name in inputs}
        context = {**passed, **self.run("context", inputs)}
        if CROSS_KV_SEGMENT in self.bundle.manifest.segments:  # every block's caption K/V, once
            context.update(self.run(CROSS_KV_SEGMENT, context))
        return context

    def conditioning(self, timestep: float, context: Feeds) -> Feeds:
        batch = max(value.shape[0] for value in context.values() if len(value.shape))
        feeds = {**context, "timestep": self.array(np.full((batch,), timestep, dtype=np.float32))}
        return {**context, **self.run("time", feeds)}

    def embed(self, latents: Array, cond: Feeds) -> State:
        """The state before block 0: the embed segment's image tokens, and any state tensor that
        starts as a conditioning entry (an MMDiT's text stream: `model.state_init`)."""
        feeds = {"latents": latents}
        if self.uses_positions:
            size = (int(latents.shape[-2]), int(latents.shape[-1]))
            if size not in self._positions:
                self._positions[size] = self.array(self.bundle.positions(*size))
            feeds["pos_embed"] = self._positions[size]
        state = {"hidden": self.run("embed", feeds)["hidden"]}
        return {
            name: state["hidden"] if name == "hidden" else cond[self.state_init[name]]
            for name in self.state_names
        }

    def blocks(self, start: int, end: int, state: State, cond: Feeds, feed: State | None = None) -> State:
        """Blocks start..end through the segments that cover them; inside the loop, `feed` (one
        tensor per state tensor) is added before every block (eqs. 2–3) and zero on the first pass."""
        position = start
        for first, last, name, feedable in self.block_segments:
            if first < start or last > end:
                continue
            if first != position:
                break
            feeds = {**cond, **state}
            if feedable:
                for key in self.state_names:
                    feeds[feed_name(key)] = feed[key] if feed is not None else self.zeros_like(state[key])
            out = self.run(name, feeds)
            state = {key: out[output_name(key)] for key in self.state_names}
            position = last + 1
        if position != end + 1:
            raise ConfigError(f"the bundle has no segments covering blocks {start}-{end} exactly")
        return state

    def inner_loop(self, state: State, cond: Feeds, cond_post: Feeds) -> State:
        start, end = self.loop  # type: ignore[misc]  # check_plan guarantees a loop
        out = self.run("feedback", {**cond, **self.blocks(start, end, state, cond)})
        f_feed = {key: out[feed_name(key)] for key in self.state_names}
        return self.blocks(start, end, state, cond_post, feed=f_feed)

    def final(self, state: State, cond: Feeds, height: int, width: int) -> Array:
        tokens = self.run("final", {**cond, "hidden": state["hidden"]})["tokens"]
        if self.token_layout == "packed":  # Flux: (C, 2, 2) per token, as FluxPipeline._unpack_latents
            c = self.out_channels // 4
            x = tokens.reshape(tokens.shape[0], height // 2, width // 2, c, 2, 2)
            return self.permute(x, (0, 3, 1, 4, 2, 5)).reshape(tokens.shape[0], c, height, width)
        p, c = self.patch_size, self.out_channels
        x = tokens.reshape(tokens.shape[0], height // p, width // p, p, p, c)
        return self.permute(x, (0, 5, 1, 3, 2, 4)).reshape(tokens.shape[0], c, height, width)
