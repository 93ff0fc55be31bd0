"""TensorRT engines for a bundle (built with Polygraphy's Python API) and a `Segments` over them.

NEVER RUN IN THIS PROJECT'S CI: TensorRT is not installable on our CPU machines. What is tested on
CPU is the pure logic here (optimization profiles from the manifest, engine-record checks); the
rest is type-checked with mypy against `tensorrt-stubs` and exercised by tests/test_tensorrt_gpu.py
(`make gpu-check`) wherever an NVIDIA GPU and TensorRT exist.

Build: one engine per segment (and per precision variant), from the segment's ONNX parsed as a
*strongly typed* network: precision comes from the ONNX itself (fp16 export, Q/DQ nodes for
int8/fp8), never from builder precision flags (TensorRT 11 removed them). One optimization profile
per engine covers batch 1..2·max_batch (guidance doubles it), the bundle's image-token counts and
latent sizes, and text tokens up to the tokenizer's max length. A timing cache in `engines/` is
shared by all builds. The manifest records the TensorRT version, GPU name and compute capability;
engines built elsewhere are refused at load with a message to rebuild.

Run: `TrtSegments` keeps torch CUDA tensors end to end (segment outputs feed the next engine
without host copies), gives every execution context one shared device-memory allocation (segments
run one after another on one stream), and can replay each (segment, input shapes) call as a CUDA
graph, falling back to plain enqueue when capture fails.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle, BundleError, rewrite_manifest, staging
from ilf_deploy.core.runtime.manifest import EngineSetSpec, Manifest, SegmentSpec
from ilf_deploy.core.runtime.pipeline import BundleGenerator
from ilf_deploy.core.runtime.runner import SegmentRunner

if TYPE_CHECKING:
    import tensorrt as trt
    import torch

ENGINES_DIR = "engines"
TIMING_CACHE = f"{ENGINES_DIR}/timing.cache"
BASE = "base"  # engine set of the bundle's own segments; variants use their name
DEFAULT_OPT_LEVEL = 3  # TensorRT's default; 5 searches longest
DEFAULT_WORKSPACE_GB = 8.0
Range = tuple[int, int, int]  # (min, opt, max)
Shape = tuple[int, ...]


class EngineMismatch(BundleError):
    """Engines built by another TensorRT version or for another GPU."""


# -- pure logic (no tensorrt import; tested on CPU) ------------------------------------------------


def dim_ranges(manifest: Manifest, max_batch: int | None = None) -> dict[str, Range]:
    """(min, opt, max) of every symbolic dimension the exporter uses (build/export/onnx.py `_AXES`).

    batch: 1 (unguided, one image) .. 2·max_batch (guided full batch), tuned for the full batch.
    tokens / latent size / pixels: the bundle's resolutions, tuned for the first (the default).
    text_tokens: the runtime pads every prompt to the tokenizer's max length, so that is opt and max.
    """
    batch = 2 * int(max_batch or manifest.max_batch)
    patch, scale = manifest.model.patch_size, manifest.model.vae_scale_factor
    sizes = list(manifest.latent_sizes)
    tokens = [(h // patch) * (w // patch) for h, w in sizes]

    def span(values: list[int]) -> Range:
        return min(values), values[0], max(values)

    heights, widths = span([h for h, _ in sizes]), span([w for _, w in sizes])
    ranges = {
        "batch": (1, batch, batch),
        "tokens": span(tokens),
        "latent_height": heights,
        "latent_width": widths,
        "grid_height": span([h // patch for h, _ in sizes]),  # Sana: its state is the token grid
        "grid_width": span([w // patch for _, w in sizes]),
        "height": (heights[0] * scale, heights[1] * scale, heights[2] * scale),
        "width": (widths[0] * scale, widths[1] * scale, widths[2] * scale),
    }
    if manifest.tokenizer is not None:
        length = manifest.tokenizer.max_length
        ranges["text_tokens"] = (1, length, length)
        if manifest.tokenizer.instruction_max_length:  # Sana: negative prompts max_length, prompts longer
            longest = manifest.tokenizer.instruction_max_length
            ranges["text_tokens"] = (length, longest, longest)
    text = [t.shape[1] for s in manifest.segments.values() for t in s.inputs if t.name == "text"]
    if text and isinstance(text[0], int):  # SD3, Flux: rotary tables over text + image tokens
        length, (low, opt, high) = text[0], ranges["tokens"]
        ranges["rotary_tokens"] = (length + low, length + opt, length + high)
    return ranges


def input_profile(
    manifest: Manifest, spec: SegmentSpec, max_batch: int | None = None
) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Per input of a segment: (min, opt, max) shapes for one TensorRT optimization profile."""
    ranges = dim_ranges(manifest, max_batch)
    profile = {}
    for value in spec.inputs:
        lows, opts, highs = [], [], []
        for dim in value.shape:
            if isinstance(dim, int) and dim > 0:
                low = opt = high = dim
            elif isinstance(dim, str) and dim in ranges:
                low, opt, high = ranges[dim]
            else:
                raise BundleError(
                    f"input {value.name!r} has dimension {dim!r} that no profile rule covers; "
                    "the bundle was exported by an incompatible version"
                )
            lows.append(low)
            opts.append(opt)
            highs.append(high)
        profile[value.name] = (tuple(lows), tuple(opts), tuple(highs))
    return profile


def engine_key(variant: str | None) -> str:
    return variant or BASE


def engine_file(key: str, segment: str) -> str:
    return f"{ENGINES_DIR}/{key}/{segment}.plan"


def environment_record(trt_version: str, gpu_name: str, capability: tuple[int, int]) -> dict[str, str]:
    return {
        "tensorrt": trt_version,
        "gpu": gpu_name,
        "compute_capability": f"{capability[0]}.{capability[1]}",
    }


def check_engine_record(record: dict[str, Any], current: dict[str, str], bundle: str, key: str) -> None:
    """Refuse engines whose TensorRT version, GPU or compute capability differ from this machine's.

    TensorRT plans are not portable across TensorRT versions or GPU architectures (we build without
    hardware/version compatibility modes, which cost speed); a different GPU model of the same
    architecture may load but was tuned for another chip, so it is refused too.
    """
    for field, what in (
        ("tensorrt", "TensorRT"),
        ("compute_capability", "compute capability"),
        ("gpu", "GPU"),
    ):
        if str(record.get(field)) != str(current[field]):
            raise EngineMismatch(
                f"{bundle}: the {key!r} engines were built with {what} {record.get(field)}, this machine "
                f"has {current[field]}; rebuild them with `ilf-deploy build-engines {bundle}"
                f"{'' if key == BASE else ' --variant ' + key} --force`"
            )


def engine_set(manifest: Manifest, variant: str | None) -> EngineSetSpec:
    key = engine_key(variant)
    engines = manifest.engines.get(key)
    if not engines:
        hint = "" if variant is None else f" --variant {variant}"
        raise BundleError(
            f"the bundle has no TensorRT engines for {key!r}; run `ilf-deploy build-engines BUNDLE{hint}`"
        )
    return engines


# -- TensorRT (imported lazily) --------------------------------------------------------------------


def tensorrt_available() -> bool:
    """True when the real TensorRT bindings import (the stubs alone make a namespace package)."""
    try:
        import tensorrt as trt_module
    except ImportError:
        return False
    return hasattr(trt_module, "Builder") and hasattr(trt_module, "__version__")


def _trt() -> Any:
    if not tensorrt_available():
        raise ConfigError(
            "TensorRT is not installed; on an NVIDIA machine install the project's `tensorrt` extra "
            "(TensorRT 10/11 and Polygraphy; see docs/tensorrt.md, 'TensorRT on H100')"
        )
    import tensorrt as trt_module

    return trt_module


def current_environment() -> dict[str, str]:
    import torch

    trt_module = _trt()
    if not torch.cuda.is_available():
        raise ConfigError("TensorRT needs a CUDA GPU and a CUDA build of PyTorch; none is available")
    device = torch.cuda.current_device()
    return environment_record(
        str(trt_module.__version__),
        torch.cuda.get_device_name(device),
        torch.cuda.get_device_capability(device),
    )


def build_engines(
    bundle_path: str | Path,
    variant: str | None = None,
    segments: list[str] | None = None,
    opt_level: int = DEFAULT_OPT_LEVEL,
    workspace_gb: float = DEFAULT_WORKSPACE_GB,
    max_batch: int | None = None,
    tf32: bool = True,
    force: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Build (or rebuild) the engine set of the bundle or of a variant; returns its manifest entry."""
    _trt()  # "TensorRT is not installed" first: without it Polygraphy is no help
    bundle = Bundle.load(bundle_path)
    names = _engines_to_build(bundle, variant, segments, opt_level, force)
    environment = current_environment()
    key = engine_key(variant)
    settings = {"opt_level": opt_level, "workspace": int(workspace_gb * 2**30), "tf32": tf32}
    # Built into `staged` and renamed in only once every engine is built, just before the manifest
    # that lists them: a failed or interrupted build (minutes each) leaves the bundle as it was.
    with staging(bundle.path, ENGINES_DIR) as staged:
        if (bundle.path / TIMING_CACHE).is_file():  # the shared cache grows with each build
            (staged / TIMING_CACHE).parent.mkdir(parents=True)
            shutil.copyfile(bundle.path / TIMING_CACHE, staged / TIMING_CACHE)
        built: dict[str, Any] = {}
        for index, name in enumerate(names):
            if progress:
                progress(name, index, len(names))
            spec = bundle.segment_spec(name, variant)
            profile = input_profile(bundle.manifest, spec, max_batch)
            built[name] = _build_engine(bundle, key, spec, profile, settings, staged)
        entry = {
            **environment,
            "variant": variant,
            "builder_optimization_level": opt_level,
            "workspace_bytes": settings["workspace"],
            "max_batch": int(max_batch or bundle.manifest.max_batch),
            "tf32": tf32,
            "timing_cache": TIMING_CACHE,
            "segments": built,
        }

        def mutate(manifest: dict[str, Any]) -> None:
            engines = manifest.setdefault("engines", {})
            for old in engines.get(key, {}).get("segments", {}).values():
                manifest["files"].pop(old["file"], None)
            engines[key] = entry

        rewrite_manifest(bundle.path, mutate, staged)
    return entry


def _engines_to_build(
    bundle: Bundle, variant: str | None, segments: list[str] | None, opt_level: int, force: bool
) -> list[str]:
    """The segments to build, after every check that needs no GPU."""
    if variant is not None:
        bundle.variant_spec(variant)  # unknown variant -> error listing the variants
    if not 0 <= opt_level <= 5:
        raise ConfigError(f"builder optimization level must be 0..5, got {opt_level}")
    key = engine_key(variant)
    if key in bundle.manifest.engines and not force:
        raise ConfigError(f"the bundle already has {key!r} engines; pass --force to rebuild them")
    names = segments or list(bundle.manifest.segments)
    unknown = sorted(set(names) - set(bundle.manifest.segments))
    if unknown:
        raise ConfigError(f"unknown segment(s) {', '.join(unknown)}")
    return names


def _build_engine(
    bundle: Bundle,
    key: str,
    spec: SegmentSpec,
    shapes: dict[str, tuple[Shape, Shape, Shape]],
    settings: dict[str, Any],
    staged: Path,
) -> dict[str, Any]:
    """One segment's engine through Polygraphy (one optimization profile, the shared timing cache),
    written under `staged` as it will be in the bundle; returns its manifest entry."""
    from polygraphy.backend.trt import (  # type: ignore[import-untyped]
        CreateConfig,
        EngineFromNetwork,
        NetworkFromOnnxPath,
        Profile,
        SaveEngine,
    )

    trt_module = _trt()
    cache = staged / TIMING_CACHE
    cache.parent.mkdir(parents=True, exist_ok=True)
    profile = Profile()
    for tensor, (low, opt, high) in shapes.items():
        profile.add(tensor, min=low, opt=opt, max=high)
    config = CreateConfig(
        profiles=[profile],
        builder_optimization_level=settings["opt_level"],
        memory_pool_limits={trt_module.MemoryPoolType.WORKSPACE: settings["workspace"]},
        load_timing_cache=str(cache) if cache.is_file() else None,
        tf32=settings[
            "tf32"
        ],  # lets fp32 layers use TF32 tensor cores; not a precision flag (allowed when typed)
    )
    # TensorRT 10 asks for strongly typed networks with a flag; in 11 every network is strongly typed.
    strongly_typed = True if hasattr(trt_module.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else None
    network = NetworkFromOnnxPath(str(bundle.path / spec.file), strongly_typed=strongly_typed)
    target = staged / engine_file(key, spec.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    SaveEngine(EngineFromNetwork(network, config, save_timing_cache=str(cache)), path=str(target))()
    return {
        "file": engine_file(key, spec.name),
        "onnx": spec.file,
        "profile": {t: [list(s) for s in r] for t, r in shapes.items()},
        "build_s": round(time.perf_counter() - start, 1),
    }


def remove_engines(bundle_path: str | Path, variant: str | None = None) -> None:
    key = engine_key(variant)

    def mutate(manifest: dict[str, Any]) -> None:
        for spec in manifest.get("engines", {}).pop(key, {}).get("segments", {}).values():
            manifest["files"].pop(spec["file"], None)

    rewrite_manifest(Path(bundle_path), mutate)
    shutil.rmtree(Path(bundle_path) / ENGINES_DIR / key, ignore_errors=True)


# -- runtime ---------------------------------------------------------------------------------------


def _torch_dtype(dtype: trt.DataType) -> torch.dtype:
    import tensorrt as trt_module
    import torch

    table = {
        trt_module.DataType.FLOAT: torch.float32,
        trt_module.DataType.HALF: torch.float16,
        trt_module.DataType.BF16: torch.bfloat16,
        trt_module.DataType.INT32: torch.int32,
        trt_module.DataType.INT64: torch.int64,
        trt_module.DataType.BOOL: torch.bool,
        trt_module.DataType.INT8: torch.int8,
    }
    if dtype not in table:
        raise BundleError(f"engine I/O type {dtype} has no torch equivalent")
    return table[dtype]


class TrtEngine:
    """One engine and its execution context; I/O as torch CUDA tensors, enqueued on `stream`.

    Everything (torch ops and engines) runs on the caller's current stream, so no cross-stream
    synchronisation or tensor lifetime bookkeeping is needed; TrtGenerator makes a non-default
    stream current for a whole generation (enqueueV3 on the legacy default stream adds syncs)."""

    def __init__(self, path: Path, runtime: trt.Runtime, memory: SharedMemory) -> None:
        import tensorrt as trt_module

        engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise BundleError(f"cannot deserialize {path}; rebuild the engines")
        self.path, self.engine = path, engine
        # USER_MANAGED: the context uses the one buffer SharedMemory hands every context.
        self.context = engine.create_execution_context(
            trt_module.ExecutionContextAllocationStrategy.USER_MANAGED
        )
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt_module.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt_module.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(engine.get_tensor_dtype(n)) for n in names}
        size = (
            engine.device_memory_size_v2
            if hasattr(engine, "device_memory_size_v2")
            else engine.device_memory_size
        )
        self.memory, self.memory_size = memory, int(size)
        memory.reserve(self.memory_size)

    def __call__(self, feeds: dict[str, torch.Tensor], stream: torch.cuda.Stream) -> dict[str, torch.Tensor]:
        import torch

        ctx = self.context
        kept = []  # cast inputs must live until the enqueued work has read them
        for name in self.inputs:
            if name not in feeds:
                raise BundleError(f"engine {self.path.name} needs input {name!r} the runtime did not give")
            tensor = feeds[name].to(device="cuda", dtype=self.dtypes[name]).contiguous()
            kept.append(tensor)
            ctx.set_input_shape(name, tuple(tensor.shape))
            ctx.set_tensor_address(name, tensor.data_ptr())
        outputs = {}
        for name in self.outputs:
            dims = ctx.get_tensor_shape(name)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            outputs[name] = torch.empty(shape, dtype=self.dtypes[name], device="cuda")
            ctx.set_tensor_address(name, outputs[name].data_ptr())
        pointer, size = self.memory.pointer()
        if hasattr(ctx, "set_device_memory"):  # TensorRT >= 10.1
            ctx.set_device_memory(pointer, size)
        else:
            ctx.device_memory = pointer  # type: ignore[attr-defined]  # TensorRT 10.0, not in 10.13 stubs
        if not ctx.execute_async_v3(stream.cuda_stream):
            raise BundleError(f"TensorRT failed to run {self.path.name}")
        del kept  # safe: freed blocks are reused only by later work on this same stream
        return outputs


class SharedMemory:
    """One device allocation, as large as the largest context needs, shared by every context."""

    def __init__(self) -> None:
        self.size = 0
        self.buffer: torch.Tensor | None = None

    def reserve(self, size: int) -> None:
        if self.buffer is not None and size > self.size:
            raise BundleError("engines must all be loaded before the first call (shared memory is fixed)")
        self.size = max(self.size, size)

    def pointer(self) -> tuple[int, int]:
        import torch

        if self.buffer is None:
            self.buffer = torch.empty(max(self.size, 1), dtype=torch.uint8, device="cuda")
        return self.buffer.data_ptr(), self.size


class _Graph:
    """A captured call: static inputs are copied in, the graph replays, outputs are cloned out."""

    def __init__(
        self, graph: torch.cuda.CUDAGraph, inputs: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs

    def __call__(self, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        for name, static in self.inputs.items():
            static.copy_(feeds[name])
        self.graph.replay()
        return {name: value.clone() for name, value in self.outputs.items()}


class TrtSegments(SegmentRunner):
    """The bundle's engines (or a variant's), with torch CUDA tensors as arrays."""

    backend = "tensorrt"

    def __init__(
        self, bundle: Bundle, variant: str | None = None, cuda_graphs: bool = False, profile: bool = False
    ):
        _trt()  # a clear error when TensorRT is missing, before importing it for the types
        import tensorrt as trt_module
        import torch

        super().__init__(bundle, variant)
        self.engines_spec = engine_set(bundle.manifest, variant)
        check_engine_record(
            dict(self.engines_spec.record), current_environment(), str(bundle.path), engine_key(variant)
        )
        self.stream = torch.cuda.Stream()  # made current by `activate` for a whole generation
        self.memory = SharedMemory()
        self.logger = trt_module.Logger(trt_module.Logger.WARNING)
        self.runtime = trt_module.Runtime(self.logger)
        # Every engine now: the shared allocation must have its final size before any call or
        # capture (a captured graph keeps the pointer it was captured with).
        self._engines = {
            name: TrtEngine(self.bundle.path / spec["file"], self.runtime, self.memory)
            for name, spec in self.engines_spec.segments.items()
        }
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[Any, ...], _Graph | None] = {}  # None: capture failed, run eagerly
        self.graph_failures: list[str] = []
        self.timed = profile  # per-segment times need a sync per call: off unless asked for

    def engine(self, name: str) -> TrtEngine:
        if name not in self._engines:
            raise BundleError(f"the {engine_key(self.variant)!r} engine set has no {name!r} engine")
        return self._engines[name]

    @contextlib.contextmanager
    def activate(self) -> Iterator[TrtSegments]:
        import torch

        with torch.cuda.stream(self.stream):  # not the legacy default stream (see TrtEngine)
            yield self
        self.stream.synchronize()  # the result is then safe on any stream

    def infer_impl(self, name: str, feeds: dict[str, Any]) -> dict[str, torch.Tensor]:
        import torch

        engine = self.engine(name)
        tensors = {k: _as_cuda(v) for k, v in feeds.items() if k in engine.inputs}
        stream = torch.cuda.current_stream()
        out = self._graph_call(name, engine, tensors) if self.cuda_graphs else engine(tensors, stream)
        if self.timed:
            torch.cuda.synchronize()
        return out

    def _graph_call(
        self, name: str, engine: TrtEngine, feeds: dict[str, torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        import torch

        key = (name, *((k, tuple(v.shape), v.dtype) for k, v in sorted(feeds.items())))
        if key not in self._graphs:
            statics = {k: v.to(engine.dtypes[k]).clone() for k, v in feeds.items()}
            try:
                engine(statics, torch.cuda.current_stream())  # TRT's lazy setup must not be captured
                torch.cuda.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):  # captures on its own side stream, current inside
                    outputs = engine(statics, torch.cuda.current_stream())
                self._graphs[key] = _Graph(graph, statics, outputs)
            except (RuntimeError, BundleError) as exc:  # capture unsupported (a plugin, a sync, ...)
                self.graph_failures.append(f"{name}: {str(exc).splitlines()[0]}")
                self._graphs[key] = None
        captured = self._graphs[key]
        return captured(feeds) if captured is not None else engine(feeds, torch.cuda.current_stream())

    # -- array operations on torch CUDA tensors ----------------------------------------------------
    def array(self, value: Any) -> torch.Tensor:
        return _as_cuda(value)

    def to_numpy(self, value: Any) -> np.ndarray:
        return value.float().cpu().numpy()  # .cpu() waits for the stream

    def zeros_like(self, array: torch.Tensor) -> torch.Tensor:
        import torch

        return torch.zeros_like(array)

    def permute(self, array: torch.Tensor, axes: tuple[int, ...]) -> torch.Tensor:
        return array.permute(*axes)

    def concat(self, arrays: list[Any]) -> Any:
        import torch

        return torch.cat([_as_cuda(a) for a in arrays])


def _as_cuda(value: Any) -> torch.Tensor:
    import torch

    if isinstance(value, torch.Tensor):
        return value if value.is_cuda else value.cuda(non_blocking=True)
    return torch.from_numpy(np.ascontiguousarray(value)).cuda()


def open_generator(
    bundle: Bundle,
    variant: str | None = None,
    device: str = "cpu",
    cuda_graphs: bool = False,
    profile: bool = False,
) -> BundleGenerator:
    """The registry's entry: every segment (text encoder and VAE included when built) on TensorRT,
    on the current CUDA device (`device` is the torch backend's option; TensorRT ignores it)."""
    return BundleGenerator(bundle, TrtSegments(bundle, variant, cuda_graphs, profile))


def engine_summary(manifest: Manifest) -> list[dict[str, Any]]:
    """One row per engine set: key, TensorRT, GPU, segments (for `inspect`-like output)."""
    return [
        {
            "engines": key,
            "tensorrt": e["tensorrt"],
            "gpu": e["gpu"],
            "compute_capability": e["compute_capability"],
            "segments": len(e["segments"]),
        }
        for key, e in ((k, s.record) for k, s in manifest.engines.items())
    ]


def describe_profile(profile: dict[str, tuple[Shape, Shape, Shape]]) -> str:
    return "; ".join(f"{n}: {list(lo)}..{list(hi)} (opt {list(op)})" for n, (lo, op, hi) in profile.items())
