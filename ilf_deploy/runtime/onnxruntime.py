"""The ONNX Runtime backend: a bundle's segments as `Segments` over numpy arrays."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .bundle import Bundle, BundleError
from .chain import SegmentChain

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def default_providers() -> list[str]:
    """CUDA when this onnxruntime build has it, else the CPU execution provider."""
    available = available_providers()
    return (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if "CUDAExecutionProvider" in available
        else ["CPUExecutionProvider"]
    )


class OrtSession:
    """One segment's InferenceSession: casts inputs to the graph's dtypes, returns outputs by name."""

    def __init__(
        self, path, providers: list[str], threads: int | None, config: dict[str, str] | None = None
    ) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        # One thread pool per segment: spinning pools steal the CPU from the segment that runs next.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        for key, value in (config or {}).items():  # e.g. FP8 variants: session.disable_quant_qdq
            options.add_session_config_entry(key, value)
        try:
            self.session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types for bad graphs/providers
            raise BundleError(f"cannot load {path}: {str(exc).splitlines()[0]}") from None
        self.inputs = {i.name: _NP_DTYPES.get(i.type, np.float32) for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def __call__(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        missing = [name for name in self.inputs if name not in feeds]
        if missing:
            raise BundleError(f"segment {self.path.name} needs inputs {missing} the runtime did not give")
        cast = {name: np.ascontiguousarray(feeds[name], dtype=dtype) for name, dtype in self.inputs.items()}
        return dict(zip(self.outputs, self.session.run(self.outputs, cast), strict=True))


class OrtSegments(SegmentChain):
    """Implements runtime.loop.Segments with one ONNX Runtime session per bundle segment."""

    def __init__(
        self,
        bundle: Bundle,
        providers: list[str] | None = None,
        threads: int | None = None,
        variant: str | None = None,
    ) -> None:
        self.bundle = bundle
        self.variant = variant
        self.providers = providers or default_providers()
        self.threads = threads
        self.init_chain(bundle)
        self._sessions: dict[str, OrtSession] = {}
        self.timings: dict[str, list[float]] = defaultdict(list)  # seconds per call, by segment
        self.recorder: Callable[[str, dict[str, np.ndarray]], None] | None = None  # sees every call's feeds

    def session(self, name: str) -> OrtSession:
        if name not in self._sessions:
            path = self.bundle.segment_path(name, self.variant)
            variant = self.bundle.manifest.get("variants", {}).get(self.variant or "", {})
            config = variant.get("ort_session_config") if name in variant.get("segments", {}) else None
            self._sessions[name] = OrtSession(path, self.providers, self.threads, config)
        return self._sessions[name]

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self.session(name)
        if self.recorder is not None:
            self.recorder(name, feeds)
        start = time.perf_counter()
        out = session(feeds)
        self.timings[name].append(time.perf_counter() - start)
        return out

    # -- Segments ------------------------------------------------------------------------------
    def context(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # Inputs stay visible: the time segment reads the size conditions from them.
        return {**inputs, **self.run("context", inputs)}

    def conditioning(self, timestep: float, context: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = next(iter(context.values())).shape[0]
        feeds = {**context, "timestep": np.full((batch,), timestep, dtype=np.float32)}
        return {**context, **self.run("time", feeds)}

    def embed(self, latents: np.ndarray) -> np.ndarray:
        positions = self.bundle.positions(latents.shape[-2], latents.shape[-1])
        return self.run("embed", {"latents": latents, "pos_embed": positions})["hidden"]

    def zeros_like(self, array: np.ndarray) -> np.ndarray:
        return np.zeros_like(array)

    def final(self, hidden: np.ndarray, cond, height: int, width: int) -> np.ndarray:
        tokens = self.run("final", {**cond, "hidden": hidden})["tokens"]
        p, c = self.patch_size, self.out_channels
        x = tokens.reshape(tokens.shape[0], height // p, width // p, p, p, c)
        return x.transpose(0, 5, 1, 3, 2, 4).reshape(tokens.shape[0], c, height, width)

    def concat(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)
