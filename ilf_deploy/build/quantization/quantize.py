"""INT8 / FP8 precision variants of a bundle's transformer blocks, and their fidelity report.

Modes (all quantize only the attention and feed-forward MatMul/Gemm with constant weights inside
block and feedback segments; patch embedding, timestep/adaLN embedding, caption projection and the
final norm/projection stay in the bundle's precision, as PixArt/DiT INT8/FP8 deployments do):

- `int8-dynamic`: ONNX Runtime dynamic quantization (per-channel int8 weights, activations
  quantized per call, u8), after ORT's FastGelu/LayerNorm fusions. The fast path on ORT CPU; no
  calibration needed. ORT-only graph (com.microsoft ops): not for TensorRT.
- `int8-qdq`: static Q/DQ with *symmetric* int8 activations (zero points 0, as TensorRT requires)
  and per-channel symmetric int8 weights (DequantizeLinear `axis` = output channels), calibrated on
  the bundle's recorded trajectories (`ilf-deploy calibrate`). The TensorRT INT8 path; it also runs
  on ORT CPU (slowly: ORT CPU gains little from symmetric static Q/DQ).
- `fp8-qdq`: static Q/DQ with FP8 E4M3 activations and per-channel weights (opset 19), for H100
  TensorRT. ORT CPU cannot fuse FP8 Q/DQ into a quantized MatMul, so the variant records an ORT
  session option that disables QDQ fusion: on CPU it then runs *emulated* (Q→DQ→fp32 MatMul),
  which checks the numerics but is not faster. Its speed on an H100 was never measured here.
- `int8-ov`: NNCF post-training quantization for OpenVINO (build/quantization/openvino.py): the same
  layers as the static modes, calibrated on the same trajectories, written as OpenVINO IR
  (`.xml` + `.bin`); the variant records `"engine": "openvino"` and runs only there.
- `bf16`: no new files: a precision policy (build/quantization/bf16.py): the block and feedback segments
  that stay within the bf16 budget on their own, run by OpenVINO with its bf16 hint; the rest f32.

Variant files go to `onnx/<variant>/<segment>.onnx`; `manifest["variants"][variant]` says which
segments they replace, and `manifest["files"]` is re-hashed.
"""

from __future__ import annotations

import contextlib
import errno
import io
import logging
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from ilf_deploy.build.quantization.calibration import load_calibration
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import (
    Bundle,
    BundleError,
    remove_unlisted,
    rewrite_manifest,
    staging,
    tool_versions,
)
from ilf_deploy.core.runtime.generator import Generator, Request
from ilf_deploy.core.runtime.manifest import VARIANT_ENGINES
from ilf_deploy.engines.backends import open_bundle_generator
from ilf_deploy.engines.backends.auto import FALLBACK_BACKEND
from ilf_deploy.engines.backends.machine import cpu_has_int8_dot
from ilf_deploy.engines.backends.onnxruntime import EMULATED_QDQ_ORT_CONFIG, open_generator
from ilf_deploy.engines.compare import (
    Budget,
    Check,
    budget,
    compare_to_reference,
    reference_generator,
    run_reference,
)

MODES = ("int8-dynamic", "int8-qdq", "fp8-qdq", "int8-ov", "bf16")
CALIBRATION_FREE_MODES = ("int8-dynamic", "bf16")  # the others need the bundle's calibration samples
CALIBRATION_METHODS = ("minmax", "percentile", "entropy")
# Linear layers of attention (attn1 self, attn2 cross; MMDiT attn with its context projections),
# feed-forward (ff; MMDiT ff_context) and Flux's single-stream MLP (proj_mlp, proj_out), by module
# scope: `/blocks.3/attn1/to_q/MatMul` (TorchScript's node name). adaLN (`norm1.linear`, `norm1.emb`)
# is left alone, as are the attention BMMs (no constant weight) except by `int8-ov` (`attention_bmms`).
LINEAR_NODE = re.compile(r"/(attn\d*|ff|ff_context|proj_mlp|proj_out)/")
ATTENTION_NODE = re.compile(r"/attn\d*/")
# Static modes also keep PixArt's cross-attention query in float: it reads the un-normalised residual
# stream, whose range grows ~100x over a trajectory (measured on the tiny model), so one static
# per-tensor scale cannot span it (1 dB SNR). Dynamic quantization scales per call and keeps it;
# `int8-ov` scales its input per token first (openvino.scale_per_token) and quantizes it too.
STATIC_EXCLUDE = re.compile(r"/attn2/to_q/")


def default_variant_name(mode: str) -> str:
    return mode.replace("-", "_")


def node_scope(node: Any) -> str:
    """A node's module scope: TorchScript names nodes by it (`/blocks.3/attn1/to_q/MatMul`); the
    dynamo exporter (SD3, Flux) records it in the `namespace` metadata ("…/blocks.0.attn.to_q: Linear"),
    written here in the TorchScript form (`/blocks/0/attn/to_q/`)."""
    if node.name.startswith("/"):
        return node.name
    namespace = next((p.value for p in node.metadata_props if p.key == "namespace"), "")
    # "…/blocks.0.attn.to_q: torch.nn.Linear/linear_2: aten.linear.default": the last module entry
    entries = [part.split(":", 1) for part in namespace.split("/") if ":" in part]
    modules = [key.strip() for key, kind in entries if not kind.strip().startswith("aten.")]
    return "/" + modules[-1].replace(".", "/") + "/" if modules and modules[-1] else node.name


def linear_nodes(model: Any, static: bool = False) -> list[str]:
    """MatMul/Gemm nodes of attention and feed-forward layers whose weight is an initializer."""
    weights = {i.name for i in model.graph.initializer}
    return [
        node.name
        for node in model.graph.node
        if node.op_type in ("MatMul", "Gemm")
        and len(node.input) > 1
        and node.input[1] in weights
        and LINEAR_NODE.search(node_scope(node))
        and not (static and STATIC_EXCLUDE.search(node_scope(node)))
    ]


def per_token_nodes(model: Any) -> list[str]:
    """The linear layers static modes leave in float (STATIC_EXCLUDE), which `int8-ov` quantizes
    after scaling their input per token (openvino.scale_per_token)."""
    return sorted(set(linear_nodes(model)) - set(linear_nodes(model, static=True)))


def attention_bmms(model: Any) -> list[str]:
    """The softmax attentions' MatMuls of two activations (Q·Kᵀ, whose scores reach a Softmax, and
    P·V, which reads one), which `int8-ov` hands to NNCF too where the CPU has 8-bit dot products:
    NNCF quantizes Q·Kᵀ (its transformer pattern leaves the softmax output, so P·V, in float) and
    OpenVINO runs its fused attention in int8: a PixArt-XL block 5 % faster at 1024 tokens on an
    AVX512-VNNI EPYC, 2 % at 256, segment rel. L2 0.0003 against 0.0002 (`python -m
    experiments.int8_attention`). Without 8-bit dot products int8 products of two activations
    saturate (the overflow fix can halve only a weight's range). Linear attention (Sana's: no softmax)
    stays in float: quantized, its segments fell below 30 dB."""
    weights = {i.name for i in model.graph.initializer}
    producer = {out: node for node in model.graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def reaches_softmax(name: str, hops: int = 4) -> bool:  # scale, mask, cast between them
        nodes = consumers.get(name, [])
        if any(n.op_type == "Softmax" for n in nodes):
            return True
        passing = [n for n in nodes if n.op_type in ("Mul", "Div", "Add", "Cast", "Where")]
        return hops > 0 and any(reaches_softmax(n.output[0], hops - 1) for n in passing)

    def reads_softmax(name: str) -> bool:
        node = producer.get(name)
        while node is not None and node.op_type == "Cast":
            node = producer.get(node.input[0])
        return node is not None and node.op_type == "Softmax"

    return [
        node.name
        for node in model.graph.node
        if node.op_type == "MatMul"
        and not any(name in weights for name in node.input)
        and ATTENTION_NODE.search(node_scope(node))
        and (reaches_softmax(node.output[0]) or any(reads_softmax(name) for name in node.input))
    ]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ORT's quantizer prints progress and warns about pre-processing through `logging` and print."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def _reader(samples: list[dict[str, np.ndarray]]) -> Any:
    from onnxruntime.quantization import CalibrationDataReader

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(samples)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.items, None)

    return Reader()


def _external(path: Path) -> bool:
    """Whether to write `path`'s rewrite with external weights (protobuf stops at 2 GB)."""
    size = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return size + (data.stat().st_size if data.is_file() else 0) > 2**30


def fuse_for_cpu(source: Path, target: Path, external: bool = False, dynamo: bool = False) -> None:
    """ORT's transformer fusions that keep the math: tanh-GELU -> FastGelu, LayerNormalization.

    The exporter writes the tanh GELU as ~8 elementwise ops over the 4x-wide FF hidden; after the
    linear layers run in int8 those were ~20 % of a block on ORT CPU. The fused op is ORT-only
    (com.microsoft), which is why only the ORT `int8-dynamic` variant gets it. A graph of the dynamo
    exporter (SD3, Flux) has its LayerNormalization already; the norm fusion would turn its q/k RMS
    norms into SimplifiedLayerNormalization, which ORT runs but ONNX's checker rejects."""
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_model

    options = FusionOptions("bert")
    for flag in ("attention", "skip_layer_norm", "embed_layer_norm", "bias_skip_layer_norm"):
        setattr(options, f"enable_{flag}", False)  # diffusers attention does not match these patterns
    options.enable_layer_norm = not dynamo
    model = optimize_model(
        str(source), model_type="bert", num_heads=0, hidden_size=0, optimization_options=options, opt_level=0
    )
    model.save_model_to_file(str(target), use_external_data_format=external)


def quantize_segment(
    source: Path,
    target: Path,
    mode: str,
    samples: list[dict[str, np.ndarray]] | None = None,
    calibrate: str = "minmax",
) -> int:
    """Write the quantized `source` to `target`; returns how many linear layers were quantized."""
    import onnx

    try:
        graph = onnx.load(str(source), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError for a truncated or corrupt file
        raise BundleError(f"cannot read {source} ({type(exc).__name__}: {exc}); rebuild the bundle") from None
    nodes = linear_nodes(graph, static=mode != "int8-dynamic")
    dynamo = any(node.metadata_props for node in graph.graph.node)  # dynamo exporter scopes: SD3, Flux
    if mode != "int8-dynamic" and not samples:
        raise ConfigError(f"{mode} needs calibration samples")
    if mode == "int8-ov":
        from ilf_deploy.build.quantization.openvino import quantize_segment_openvino

        attention = attention_bmms(graph) if cpu_has_int8_dot() else []
        per_token = per_token_nodes(graph)
        wanted = nodes + per_token + attention
        return quantize_segment_openvino(source, target, samples or [], wanted, per_token)
    if not nodes:
        shutil.copyfile(source, target)  # nothing to quantize (e.g. an empty block range)
        return 0
    target.parent.mkdir(parents=True, exist_ok=True)
    external = _external(source)  # the > 2 GB path was never exercised here (our models are small)
    common: dict[str, Any] = dict(
        op_types_to_quantize=["MatMul", "Gemm"],
        nodes_to_quantize=nodes,
        per_channel=True,
        use_external_data_format=external,
    )
    with _quiet():
        if mode == "int8-dynamic":
            _quantize_dynamic(source, target, external, common, dynamo)
        else:
            _quantize_static(source, target, mode, samples or [], calibrate, common)
    onnx.checker.check_model(str(target))
    return len(nodes)


def _quantize_dynamic(
    source: Path, target: Path, external: bool, common: dict[str, Any], dynamo: bool = False
) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    fused = target.with_name(f".{target.stem}.fused.onnx")
    fuse_for_cpu(source, fused, external, dynamo)
    quantize_dynamic(
        fused,
        target,
        weight_type=QuantType.QInt8,
        # 7-bit weights: ORT's u8s8 GEMM on AVX2 CPUs without VNNI (e.g. AMD EPYC here) can
        # saturate 16-bit pair sums with full-range weights (segment SNR fell to ~27 dB).
        reduce_range=True,
        extra_options={"MatMulConstBOnly": True},
        **common,
    )
    for leftover in fused.parent.glob(f"{fused.name}*"):  # and its external data
        leftover.unlink()


def _quantize_static(
    source: Path,
    target: Path,
    mode: str,
    samples: list[dict[str, np.ndarray]],
    calibrate: str,
    common: dict[str, Any],
) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    fp8 = mode == "fp8-qdq"
    qtype = QuantType.QFLOAT8E4M3FN if fp8 else QuantType.QInt8
    method = {
        "minmax": CalibrationMethod.MinMax,
        "percentile": CalibrationMethod.Percentile,
        "entropy": CalibrationMethod.Entropy,
    }[calibrate]
    quantize_static(
        source,
        target,
        _reader(samples),
        quant_format=QuantFormat.QDQ,
        activation_type=qtype,
        weight_type=qtype,
        # ORT supports only its distribution calibration for float8 (zero points are 0 anyway).
        calibrate_method=CalibrationMethod.Distribution if fp8 else method,
        extra_options={
            "ActivationSymmetric": True,  # TensorRT: activation zero points must be 0
            "WeightSymmetric": True,
            "MatMulConstBOnly": True,
            # A Q/DQ pair per consumer: the residual stream that also feeds a quantized
            # MatMul must stay unquantized (sharing the pair rounds the residual too).
            "DedicatedQDQPair": True,
            "OpTypesToExcludeOutputQuantization": ["MatMul", "Gemm"],  # inputs only, as TRT wants
            # MatMul weights are (in, out): one scale per output channel. Gemm has transB=1.
            "QDQOpTypePerChannelSupportToAxis": {"MatMul": 1, "Gemm": 0},
        },
        **common,
    )


def quantize_bundle(
    bundle_path: str | Path,
    mode: str,
    name: str | None = None,
    calibrate: str = "minmax",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Add (or replace) the precision variant `name`; returns its manifest entry."""
    if mode not in MODES:
        raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if calibrate not in CALIBRATION_METHODS:
        raise ConfigError(f"calibration method must be one of {', '.join(CALIBRATION_METHODS)}")
    bundle = Bundle.load(bundle_path)
    name = name or default_variant_name(mode)
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
        raise ConfigError(f"variant name {name!r} may use letters, digits, '_', '-' and '.' only")
    if bundle.manifest.precision != "fp32":
        raise ConfigError(
            f"quantize an fp32 bundle (this one is {bundle.manifest.precision}): ORT's quantizer "
            "calibrates and rewrites fp32 graphs"
        )
    if mode not in CALIBRATION_FREE_MODES and bundle.manifest.calibration is None:
        raise BundleError(f"{mode} needs calibration data; run `ilf-deploy calibrate {bundle.path}` first")
    if mode == "bf16":  # no new files: the segments that stay in budget in bf16 (build/quantization/bf16.py)
        from ilf_deploy.build.quantization.bf16 import bf16_entry

        entry = bf16_entry(bundle, progress)
        entry["tools"] = {**tool_versions(), **_versions("openvino")}
        _record_variant(bundle.path, name, entry)
        shutil.rmtree(bundle.path / "onnx" / name, ignore_errors=True)  # an older variant's, unlisted now
        return entry
    root = bundle.path
    with staging(root, "onnx") as staged:  # renamed in just before the manifest is written
        folder = staged / "onnx" / name
        folder.mkdir(parents=True)
        try:
            segments, counts = _write_variant(bundle, mode, name, calibrate, folder, progress)
        except Exception as exc:
            no_space = _no_space(exc, staged, bundle)
            if no_space is None:
                raise
            raise ConfigError(no_space) from None
        entry: dict[str, Any] = {
            "mode": mode,
            "segments": segments,
            "quantized_layers": counts,
            "calibration": None
            if mode == "int8-dynamic"
            else {**bundle.manifest.calibration.raw, "method": calibrate},  # type: ignore[union-attr]
            "tools": tool_versions(),
        }
        if mode == "fp8-qdq":
            entry["ort_session_config"] = EMULATED_QDQ_ORT_CONFIG
        if VARIANT_ENGINES[mode] == ("openvino",):
            entry["tools"].update(_versions("openvino", "nncf"))
        _record_variant(root, name, entry, staged)
    return entry


def _no_space(exc: BaseException, staged: Path, bundle: Bundle) -> str | None:
    """One line where `exc` comes from a full disk, else None. ORT's writers do not always raise it:
    a model they cut short comes back as protobuf's DecodeError when read, so a file system left with
    less room than the bundle's largest segment counts as full too."""
    current: BaseException | None = exc
    said_so = False
    for _ in range(8):  # the exception and what it was raised from
        if current is None or said_so:
            break
        said_so = isinstance(current, OSError) and current.errno in (errno.ENOSPC, errno.EDQUOT)
        current = current.__cause__ or current.__context__
    free = shutil.disk_usage(staged).free
    largest = max((p.stat().st_size for p in (bundle.path / "onnx").glob("*") if p.is_file()), default=0)
    if not said_so and free >= max(largest, 2**20):
        return None
    return (
        f"quantize: no space left on the device that holds {bundle.path} ({free / 2**20:.1f} MB free); "
        "free some space and run it again (the bundle is unchanged)"
    )


def _record_variant(root: Path, name: str, entry: dict[str, Any], staged: Path | None = None) -> None:
    """Add (or replace) variant `name` in the manifest with the files `staged` holds under
    onnx/<name>/ (none for a bf16 variant, whose segments are the bundle's own files), renamed in
    by `rewrite_manifest`; the old variant's files the new one did not replace are deleted after."""

    def mutate(manifest: dict[str, Any]) -> None:
        variants = manifest.setdefault("variants", {})
        for listed in [f for f in manifest["files"] if f.startswith(f"onnx/{name}/")]:
            manifest["files"].pop(listed)
        variants[name] = entry

    manifest = rewrite_manifest(root, mutate, staged)
    remove_unlisted(root, f"onnx/{name}", manifest)


def remove_variant(root: Path, name: str) -> None:
    """Take variant `name` out of the manifest, then delete its files (`quantize` of a variant
    that misses its budget, without --keep-failing)."""

    def mutate(manifest: dict[str, Any]) -> None:
        manifest.get("variants", {}).pop(name, None)
        for listed in [f for f in manifest["files"] if f.startswith(f"onnx/{name}/")]:
            manifest["files"].pop(listed)

    manifest = rewrite_manifest(root, mutate)
    remove_unlisted(root, f"onnx/{name}", manifest)
    folder = root / "onnx" / name
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()


def miss_line(variant: str, checks: list[Check]) -> str | None:
    """One line saying how `variant` misses its budget (its worst failing check), or None."""
    failed = [c for c in checks if not c.ok]
    if not failed:
        return None
    worst = next((c for c in failed if c.kind == "end-to-end"), failed[0])
    measured = worst.limit.value(worst.metrics)
    others = f" (and {len(failed) - 1} more checks)" if len(failed) > 1 else ""
    where = f"{worst.label} {worst.name}"
    return f"variant {variant!r} misses its budget: {where} {measured:.3g}, budget {worst.limit}{others}"


def _write_variant(
    bundle: Bundle,
    mode: str,
    name: str,
    calibrate: str,
    staged: Path,
    progress: Callable[[str], None] | None,
) -> tuple[dict[str, Any], dict[str, int]]:
    """Quantize every quantizable segment into `staged` (the staging copy of `onnx/<name>/`);
    returns (the variant's segment specs, quantized layers per segment)."""
    suffix = ".xml" if mode == "int8-ov" else ".onnx"  # OpenVINO IR (weights in the .bin beside it)
    segments: dict[str, Any] = {}
    counts: dict[str, int] = {}
    for segment in bundle.manifest.quantizable_segments:
        if progress:
            progress(f"{mode} {segment}")
        samples = None if mode == "int8-dynamic" else load_calibration(bundle, segment)
        counts[segment] = quantize_segment(
            bundle.segment_path(segment), staged / f"{segment}{suffix}", mode, samples, calibrate
        )
        base = bundle.segment_spec(segment).to_dict()
        segments[segment] = {**base, "file": f"onnx/{name}/{segment}{suffix}"}
    return segments, counts


def _versions(*packages: str) -> dict[str, str]:
    from importlib import metadata

    found = {}
    for package in packages:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


# -- running variants -----------------------------------------------------------------------------


def variant_engine(bundle: Bundle, variant: str | None) -> str:
    """The backend a variant opens on by default (runtime.manifest.VARIANT_ENGINES decides)."""
    return FALLBACK_BACKEND if variant is None else bundle.variant_spec(variant).engine


def variant_generator(bundle: Bundle, variant: str | None, threads: int | None = None) -> Generator:
    """The bundle (or a variant) on the CPU: ONNX Runtime's CPU provider (what fidelity is measured
    against), or the variant's own engine."""
    if variant is None:
        return reference_generator(bundle, threads)
    engine = variant_engine(bundle, variant)
    if engine != "onnxruntime":
        return open_bundle_generator(bundle, engine, variant, threads=threads)
    return open_generator(bundle, variant, threads=threads, providers=["CPUExecutionProvider"])


def variant_budget(bundle: Bundle, variant: str) -> Budget:
    """The budget `verify-variant` holds `variant` to (compare.BUDGETS, on its own engine)."""
    spec = bundle.variant_spec(variant)  # raises with the list of variants
    return budget(spec.engine, spec.mode)


def verify_variant(
    bundle: Bundle,
    variant: str,
    plan: str | None = None,
    request: Request | None = None,
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Check]:
    """Each replaced segment on a held-out trajectory's feeds, then the plan's final latents, vs fp32
    (ONNX Runtime CPU); the variant runs on its engine (ONNX Runtime, or OpenVINO for int8-ov)."""
    limits = variant_budget(bundle, variant)
    candidate = variant_generator(bundle, variant, threads)
    reference = run_reference(bundle, plan, request, threads=threads, progress=progress)
    segments = list(bundle.variant_spec(variant).segments)
    return compare_to_reference(candidate, reference, segments, limits, progress)
