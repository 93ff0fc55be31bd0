"""The ONNX Runtime backend: one InferenceSession per bundle segment, numpy arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle, BundleError
from ilf_deploy.core.runtime.pipeline import BundleGenerator
from ilf_deploy.core.runtime.runner import SegmentRunner
from ilf_deploy.engines.backends.machine import cpu_has_int8_dot

_NP_DTYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int64)": np.int64}

# ORT session config: no QDQ fusion, so Q/DQ runs emulated (ORT CPU has no FP8 QLinearMatMul).
EMULATED_QDQ_ORT_CONFIG = {"session.disable_quant_qdq": "1"}
# Without 8-bit dot products (machine.cpu_has_int8_dot: AVX2 only, e.g. an AMD EPYC the CI ran on)
# ORT's fused int8 kernels saturate 16-bit pair sums: int8-qdq segments fell to ~29 dB SNR, so there
# the variant runs emulated like FP8 (same Q/DQ numerics, which is what TensorRT computes).


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


class OrtSegments(SegmentRunner):
    """The bundle's segments (or a precision variant's) as ONNX Runtime sessions, opened lazily."""

    backend = "onnxruntime"

    def __init__(
        self,
        bundle: Bundle,
        providers: list[str] | None = None,
        threads: int | None = None,
        variant: str | None = None,
    ) -> None:
        super().__init__(bundle, variant)
        self.providers = providers or default_providers()
        self.threads = threads
        self._sessions: dict[str, OrtSession] = {}

    def session_config(self, name: str) -> dict[str, str]:
        """A variant's session config for the segments it replaced (FP8: QDQ fusion off; int8-qdq
        on a CPU without int8 dot products: the same, emulated)."""
        entry = self.bundle.manifest.variants.get(self.variant or "")
        if entry is None or name not in entry.segments:
            return {}
        config = dict(entry.ort_session_config)
        if entry.mode == "int8-qdq" and not cpu_has_int8_dot():
            config.update(EMULATED_QDQ_ORT_CONFIG)
        return config

    def session(self, name: str) -> OrtSession:
        if name not in self._sessions:
            path = self.bundle.segment_path(name, self.variant)
            self._sessions[name] = OrtSession(path, self.providers, self.threads, self.session_config(name))
        return self._sessions[name]

    def open_all(self) -> None:
        for name in self.bundle.manifest.segments:
            self.session(name)

    def infer_impl(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self.session(name)(feeds)


def open_generator(
    bundle: Bundle,
    variant: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    providers: list[str] | None = None,
) -> BundleGenerator:
    """The registry's entry: ONNX Runtime picks its own execution provider (CUDA when built in)."""
    if device != "cpu":
        raise ConfigError(f"--device {device} is for the torch backend; onnxruntime chooses its own")
    return BundleGenerator(bundle, OrtSegments(bundle, providers, threads, variant))
