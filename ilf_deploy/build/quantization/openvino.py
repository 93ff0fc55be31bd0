"""`int8-ov`: NNCF post-training quantization of a segment's linear layers, as an OpenVINO IR.

NNCF (OpenVINO's quantizer) calibrates on the bundle's recorded trajectories (`ilf-deploy
calibrate`), inserts FakeQuantize before the attention and feed-forward MatMuls that `quantize.py`
selects (the same layers as the ORT static modes and, where the CPU has 8-bit dot products, the
attention's two BMMs) and stores int8 weights; OpenVINO's CPU plugin then runs those MatMuls (and its
fused attention) with int8 kernels (VNNI/AMX where the CPU has them). Activations: per
tensor, asymmetric (NNCF's `mixed` preset); weights: per output channel, symmetric. SmoothQuant and
fast bias correction are NNCF's defaults for transformers and stay on. On a CPU without 8-bit dot
products (AVX2 only) OpenVINO's int8 kernels saturate 16-bit pair sums, as ONNX Runtime's do: there
every weight gets half the 8-bit range (NNCF's overflow fix, as `int8-dynamic`'s 7-bit weights), or
the tiny model's int8-ov missed its budget (end-to-end rel. L2 0.056 > 0.05 on an AVX2 EPYC).

PixArt's and Sana's cross-attention query reads the un-normalised residual stream, whose range grows
~100x over a trajectory, so one static per-tensor scale cannot span it (the ORT static modes leave it
in float, `quantize.STATIC_EXCLUDE`). Here it is quantized all the same, scaled per token first
(`scale_per_token`): the last float GEMM of the block, on OpenVINO's int8 kernels too.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """NNCF logs every skipped node and draws progress bars."""
    logger = logging.getLogger("nncf")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def overflow_fix() -> Any:
    """NNCF's overflow fix for this CPU: every weight at half range without 8-bit dot products, else
    NNCF's own default (the first layer only)."""
    from nncf.quantization.advanced_parameters import OverflowFix

    from ilf_deploy.engines.backends.machine import cpu_has_int8_dot

    return OverflowFix.FIRST_LAYER if cpu_has_int8_dot() else OverflowFix.ENABLE


def scale_per_token(model: Any, names: set[str]) -> None:
    """Rewrite each linear MatMul `x·W` named in `names` as `s ⊙ ((x / s)·W)`, s = max |x| over the
    features of each token ([B, S, 1]): the same product, but the MatMul's input now lies in [-1, 1]
    at every step of a trajectory, which a static per-tensor scale spans. The MatMul keeps its name
    (NNCF's scope)."""
    from openvino import opset13 as ops

    for op in model.get_ordered_ops():
        if op.get_type_name() != "MatMul" or op.get_friendly_name() not in names:
            continue
        consumers = list(op.output(0).get_target_inputs())
        features = op.input_value(0)  # [B, S, C]
        scale = ops.maximum(  # [B, S, 1]; an all-zero token keeps 0 / tiny = 0
            ops.reduce_max(ops.abs(features), np.array([-1]), True), np.array(1e-12, np.float32)
        )
        op.input(0).replace_source_output(ops.divide(features, scale).output(0))
        restored = ops.multiply(op.output(0), scale)
        for consumer in consumers:
            consumer.replace_source_output(restored.output(0))
    model.validate_nodes_and_infer_types()


def quantize_segment_openvino(
    source: Path,
    target: Path,
    samples: list[dict[str, np.ndarray]],
    nodes: list[str],
    per_token: Sequence[str] = (),
) -> int:
    """Write `source` with the MatMuls `nodes` (ONNX node names) quantized to `target` (.xml, its
    weights beside it in .bin), those of them in `per_token` scaled per token first
    (`scale_per_token`); returns how many were quantized."""
    import nncf
    import openvino as ov

    from ilf_deploy.engines.backends.openvino import core

    model = core().read_model(str(source))
    wanted = set(nodes)
    scale_per_token(model, wanted & set(per_token))
    # OpenVINO keeps the ONNX node names; every other MatMul (adaLN, the attention BMMs without 8-bit
    # dot products) stays in float.
    matmuls = [op.get_friendly_name() for op in model.get_ordered_ops() if op.get_type_name() == "MatMul"]
    ignored = [name for name in matmuls if name not in wanted]
    found = len(matmuls) - len(ignored)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not found:
        ov.save_model(model, str(target), compress_to_fp16=False)
        return 0
    feeds: list[dict[str, Any]] = [dict(sample) for sample in samples]
    with _quiet():
        quantized = nncf.quantize(
            model,
            nncf.Dataset(feeds),
            preset=nncf.QuantizationPreset.MIXED,
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(feeds),
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
            advanced_parameters=nncf.AdvancedQuantizationParameters(overflow_fix=overflow_fix()),
        )
    ov.save_model(quantized, str(target), compress_to_fp16=False)
    return found
