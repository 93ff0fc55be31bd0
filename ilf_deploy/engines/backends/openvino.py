"""The OpenVINO backend: the bundle's ONNX segments (or an OpenVINO int8 variant's IR) compiled by
OpenVINO, numpy arrays in and out.

Precisions: `f32`; `bf16` (`INFERENCE_PRECISION_HINT=bf16` for the block and feedback segments,
f32 for the rest: bf16 matmuls where the CPU has AVX512_BF16 or AMX, refused elsewhere, where
OpenVINO would emulate them); a bf16 variant (`ilf-deploy quantize --mode bf16`: the segments that
stay within the bf16 budget on their own, recorded in the manifest) runs bf16 on exactly those
segments and f32 on the rest; int8 through a precision
variant (`ilf-deploy quantize --mode int8-ov`: NNCF post-training quantization of the block and
feedback linear layers, an IR this backend runs). `--variant bf16` (or `f32`) picks the precision;
any other `--variant` is a bundle variant OpenVINO can read (int8-ov, int8-qdq's Q/DQ ONNX).

Devices: `cpu`/`CPU` here; `GPU`, `NPU`, `AUTO`... are passed to OpenVINO unchanged (Intel iGPU/NPU
machines; never run in this project).

Shapes: each segment is compiled for the input shapes it is called with (the ONNX graphs are
exported with dynamic batch and token dimensions), up to `static_shapes` shape sets a segment
(`STATIC_SHAPES` = 2 by default: a run's batch and resolution, and one more); more run on the
dynamic-shape model (compiled once, on first need), so memory stays bounded. With static shapes the
CPU plugin folds the shape-derived attention scale into the Q/K GEMMs and fuses each adaLN
modulation / gate / residual chain with the next quantize into one snippet: an int8-ov PixArt-XL-2
block at 256 px, batch 2, ran 1.10-1.20x faster (interleaved A/B on the AMX Xeon,
benchmarks/README.md, "`int8_profile`"). Each shape set is its own compiled model (~80 MB more per
XL int8 block), hence the cap. A server sets it to its number of micro-batch buckets
(`keep_static_shapes`, part of the engine contract; core/batching.py) and its warm-up compiles each
bucket at the default plan and size, so those batches never compile during a request (seconds on a
real-size bundle); other sizes, unguided batches and an adaptive plan's partial batches of a
non-bucket size run on the dynamic model.

Compiled models are cached in the bundle, in `openvino_cache/`, so a second start skips
compilation. The cache is written with `export_model` and `runtime.bundle.write_atomic` rather than
OpenVINO's own `CACHE_DIR`, which writes its blobs in place: a crash must never leave half a blob
that the next start reads. Blobs are keyed on the segment's sha256 (from the manifest), the device,
the compile config, OpenVINO's version and this machine's fingerprint; they are not manifest files
(machine-specific, so not hashed): deleting `openvino_cache/` only costs a recompile, and a
read-only bundle simply is not cached.

A blob is imported only if it verifiably is the one compiled for this key: beside `X.blob`,
`X.blob.sha256` (written atomically after the blob) holds one line, `ilf-ov-cache-1 KEY BLOB`:
the cache key's full sha256 and the blob's own sha256, both 64 lowercase hex digits. A blob
renamed or swapped with another segment's (same I/O, so OpenVINO would run it), a sidecar
missing, stale or from another key is logged and recompiled, never run. This guards against
mix-ups and stale files, not against a writer who recomputes both hashes (the cache is outside
the manifest; a pinned `--digest` pins the manifest's files only). The C++ runtime checks its own
`cpp-*.blob` files the same way (docs/bundles.md ("The bundle format")).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import threading
from pathlib import Path
from typing import Any

import numpy as np

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle, BundleError, write_atomic
from ilf_deploy.core.runtime.pipeline import BundleGenerator
from ilf_deploy.core.runtime.runner import SegmentRunner
from ilf_deploy.engines.backends.machine import cpu_has_bf16, fingerprint

Shapes = tuple[tuple[str, tuple[int, ...]], ...]  # (input name, shape) in the segment's input order

PRECISIONS = ("f32", "bf16")  # INFERENCE_PRECISION_HINT values, also accepted as --variant names
CACHE_DIR = "openvino_cache"
SIDECAR_SUFFIX = ".sha256"  # X.blob -> X.blob.sha256
SIDECAR_TAG = "ilf-ov-cache-1"
# Static-shape compiles per segment by default (a run sees one set: its batch and resolution; one
# more); beyond them, the dynamic-shape model: new shapes never recompile, memory stays bounded. A
# server raises it to its batch buckets' count (`OvSegments.keep_static_shapes`).
STATIC_SHAPES = 2
log = logging.getLogger("ilf_deploy.openvino")
# Variant modes OpenVINO cannot read: com.microsoft ops (int8-dynamic), FP8 Q/DQ.
_DEVICE_FAMILIES = ("CPU", "GPU", "NPU", "AUTO", "HETERO", "MULTI", "BATCH")


@functools.cache
def core() -> Any:
    import openvino as ov

    return ov.Core()


def ov_device(device: str) -> str:
    """`cpu` -> `CPU`; OpenVINO's device names (GPU, GPU.1, NPU, AUTO:GPU,CPU...) pass through."""
    name = device.upper()
    family = name.split(":")[0].split(".")[0]
    if family not in _DEVICE_FAMILIES:
        raise ConfigError(
            f"--device {device} is not an OpenVINO device; use cpu, GPU, GPU.N, NPU or AUTO "
            "(GPU/NPU were never tested by this project)"
        )
    if family in ("CPU", "GPU", "NPU") and not any(d.startswith(family) for d in core().available_devices):
        raise ConfigError(
            f"OpenVINO sees no {family} here (it has: {', '.join(core().available_devices) or 'none'})"
        )
    return name


def _sidecar(blob: Path) -> Path:
    return blob.with_name(blob.name + SIDECAR_SUFFIX)


def write_cached_blob(blob: Path, data: bytes) -> None:
    """The blob, then its sidecar (each renamed into place): a crash between them leaves a blob
    whose sidecar is missing or names other bytes, which the next start recompiles."""
    key = blob.name.rsplit(".", 2)[-2]  # NAME.KEY.blob
    write_atomic(blob, data)
    line = f"{SIDECAR_TAG} {key} {hashlib.sha256(data).hexdigest()}\n"
    write_atomic(_sidecar(blob), line.encode("ascii"))


def read_cached_blob(blob: Path) -> bytes | None:
    """The blob's bytes if its sidecar vouches for them (this key, these bytes); else None, logged."""
    if not blob.is_file():
        return None
    key = blob.name.rsplit(".", 2)[-2]
    try:
        fields = _sidecar(blob).read_text("ascii").split()
        data = blob.read_bytes()
    except (OSError, UnicodeDecodeError) as exc:
        log.warning("OpenVINO cache %s unreadable (%s): recompiling", blob.name, exc)
        return None
    if fields != [SIDECAR_TAG, key, hashlib.sha256(data).hexdigest()]:
        log.warning("OpenVINO cache %s does not match its sidecar digest: recompiling", blob.name)
        return None
    return data


class OvSegments(SegmentRunner):
    """The bundle's segments (or a variant's) compiled by OpenVINO on first use."""

    backend = "openvino"
    compiles_per_shape = True

    def __init__(
        self,
        bundle: Bundle,
        variant: str | None = None,
        device: str = "CPU",
        precision: str = "f32",
        threads: int | None = None,
        cache: bool = True,
        static_shapes: int = STATIC_SHAPES,
    ) -> None:
        super().__init__(bundle, variant)
        policy = bundle.variant_spec(variant) if variant is not None else None
        if policy is not None and policy.mode == "bf16":  # a bf16 variant: bf16 on its segments only
            precision, self.reduced = "bf16", tuple(policy.segments)
        else:
            self.reduced = bundle.manifest.reduced_precision_segments
        self.device, self.precision, self.cache = device, precision, cache
        self.config: dict[str, str] = {"INFERENCE_PRECISION_HINT": precision, "PERFORMANCE_HINT": "LATENCY"}
        if threads:
            self.config["INFERENCE_NUM_THREADS"] = str(threads)
        self.static_shapes = static_shapes  # 0: every call on the dynamic-shape model
        self._compiled: dict[tuple[str, Shapes | None], Any] = {}
        self._ports: dict[tuple[str, Shapes | None], Any] = {}
        self._machine = fingerprint() if cache else None
        self._local = threading.local()  # an infer request is not thread-safe: one per thread
        self._lock = threading.Lock()

    def config_for(self, name: str) -> dict[str, str]:
        """The compile config of segment `name`: the requested precision for the segments where nearly
        all FLOPs are (`Manifest.reduced_precision_segments`), f32 for the rest (the timestep's
        sinusoidal embedding of t ≤ 999 loses its phase in bf16: relative L2 0.23 on its own). A bf16
        variant (`quantize --mode bf16`) names its bf16 segments itself: bf16 there, f32 elsewhere."""
        if name in self.reduced:
            return self.config
        return {**self.config, "INFERENCE_PRECISION_HINT": "f32"}

    def cache_path(self, name: str, shapes: Shapes | None = None) -> Path:
        """Where segment `name`'s compiled blob (for `shapes`, None: dynamic) lives: keyed on
        everything that changes it."""
        import openvino as ov

        rel = str(self.bundle.segment_path(name, self.variant).relative_to(self.bundle.path))
        stem = rel.rsplit(".", 1)[0]
        files = self.bundle.manifest.files
        digests = {
            f: d for f, d in files.items() if f == rel or f.startswith(rel + ".") or f == stem + ".bin"
        }
        key = json.dumps(
            [digests, self.device, self.config_for(name), ov.__version__, self._machine]
            + ([] if shapes is None else [[list(item) for item in shapes]]),
            sort_keys=True,
            default=str,
        )
        return self.bundle.path / CACHE_DIR / f"{name}.{hashlib.sha256(key.encode()).hexdigest()}.blob"

    def compiled(self, name: str, shapes: Shapes | None = None) -> Any:
        """Segment `name` compiled for input `shapes` (None: dynamic shapes)."""
        with self._lock:
            if (name, shapes) not in self._compiled:
                self._compiled[name, shapes] = self._compile(name, shapes)
            return self._compiled[name, shapes]

    def open_all(self) -> None:
        """Compile the segments not run yet (dynamic shapes: theirs are not known until called)."""
        for name in self.bundle.manifest.segments:
            if not any(segment == name for segment, _ in self._compiled):
                self.compiled(name)

    def keep_static_shapes(self, count: int) -> None:
        """Up to `count` shape sets a segment compiled static (a server: one per batch bucket, each
        a compiled model of its own: ~80 MB per XL int8 block); shape sets compiled already stay."""
        self.static_shapes = count

    def shapes_for(self, name: str, feeds: dict[str, np.ndarray]) -> Shapes | None:
        """The static shapes to run `feeds` with: theirs, unless the segment already has
        `static_shapes` other shape sets compiled (then None: the dynamic model)."""
        inputs = self.bundle.segment_spec(name, self.variant).input_names
        shapes = tuple((key, tuple(int(d) for d in np.shape(feeds[key]))) for key in inputs)
        with self._lock:
            seen = sum(1 for segment, static in self._compiled if segment == name and static is not None)
            known = (name, shapes) in self._compiled
        return shapes if known or seen < self.static_shapes else None

    def read_model(self, name: str, shapes: Shapes | None = None) -> Any:
        """Segment `name`'s graph as OpenVINO reads it, reshaped to `shapes` when given."""
        import openvino as ov

        path = str(self.bundle.segment_path(name, self.variant))
        model = core().read_model(path)
        if shapes is not None:
            wanted = dict(shapes)
            static = {
                port: ov.PartialShape(list(wanted[key]))
                for port in model.inputs
                for key in wanted
                if key in port.get_names()
            }
            try:
                model.reshape(static)
            except Exception as exc:  # a graph that does not reshape runs with its dynamic shapes
                log.warning("OpenVINO cannot reshape %s to %s (%s): dynamic shapes", name, shapes, exc)
                model = core().read_model(path)
        return model

    def _compile(self, name: str, shapes: Shapes | None) -> Any:
        path = self.bundle.segment_path(name, self.variant)
        blob = self.cache_path(name, shapes) if self.cache else None
        data = read_cached_blob(blob) if blob is not None else None
        log.debug("OpenVINO compiles %s for %s", name, shapes or "dynamic shapes")
        if data is not None:
            with contextlib.suppress(Exception):  # unreadable by this OpenVINO: compile again, replace it
                return core().import_model(data, self.device, self.config_for(name))
        try:
            compiled = core().compile_model(self.read_model(name, shapes), self.device, self.config_for(name))
        except Exception as exc:  # OpenVINO raises RuntimeError subclasses for graphs and devices
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BundleError(f"OpenVINO cannot compile {path} for {self.device}: {message}") from None
        if blob is not None:
            # a read-only bundle, or a device without export: run uncached
            with contextlib.suppress(Exception):
                write_cached_blob(blob, compiled.export_model().getvalue())
        return compiled

    def _request(self, name: str, shapes: Shapes | None = None) -> Any:
        requests = self._local.__dict__.setdefault("requests", {})
        if (name, shapes) not in requests:
            requests[name, shapes] = self.compiled(name, shapes).create_infer_request()
        return requests[name, shapes]

    def ports(
        self, name: str, shapes: Shapes | None = None
    ) -> tuple[Any, list[tuple[str, Any, np.dtype]], list[tuple[str, Any]]]:
        """The compiled segment, its inputs (name, port, dtype) and outputs (name, port), named as the
        manifest declares them (a compiled port can carry several tensor names)."""
        if (name, shapes) not in self._ports:
            compiled = self.compiled(name, shapes)
            spec = self.bundle.segment_spec(name, self.variant)
            declared = [*spec.input_names, *spec.output_names]

            def named(port: Any) -> str:
                names = port.get_names()
                return next((n for n in declared if n in names), port.get_any_name())

            inputs = [(named(p), p, p.get_element_type().to_dtype()) for p in compiled.inputs]
            self._ports[name, shapes] = (compiled, inputs, [(named(p), p) for p in compiled.outputs])
        return self._ports[name, shapes]

    def infer_impl(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        shapes = self.shapes_for(name, feeds)
        if shapes is None:
            log.debug("OpenVINO runs %s on its dynamic-shape model", name)
        _, inputs, outputs = self.ports(name, shapes)
        cast = {port: np.ascontiguousarray(feeds[key], dtype=dtype) for key, port, dtype in inputs}
        result = self._request(name, shapes).infer(cast)  # outputs are copies (share_outputs=False)
        return {key: result[port] for key, port in outputs}


def open_generator(
    bundle: Bundle,
    variant: str | None = None,
    device: str = "cpu",
    threads: int | None = None,
    precision: str | None = None,
    cache: bool = True,
) -> BundleGenerator:
    """The registry's entry. `variant` may name a precision (`bf16`, `f32`) or a bundle variant (a bf16
    one: the bf16 hint on exactly the segments it names)."""
    if variant in PRECISIONS and variant not in bundle.variants:
        if precision not in (None, variant):
            raise ConfigError(f"variant {variant!r} and precision {precision!r} disagree")
        precision, variant = variant, None
    if variant is not None and bundle.variant_spec(variant).mode == "bf16":
        if precision not in (None, "bf16"):
            raise ConfigError(f"variant {variant!r} runs in bf16, not precision {precision!r}")
        precision = "bf16"
    precision = precision or "f32"
    if precision not in PRECISIONS:
        raise ConfigError(f"OpenVINO precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    name = ov_device(device)
    if precision == "bf16" and name.startswith("CPU") and not cpu_has_bf16():
        raise ConfigError(
            "bf16 on the OpenVINO CPU needs AVX512_BF16 or AMX (this CPU has neither): "
            "use f32 or an int8 variant"
        )
    generator = BundleGenerator(bundle, OvSegments(bundle, variant, name, precision, threads, cache))
    generator.variant = variant or (precision if precision != "f32" else None)
    return generator
