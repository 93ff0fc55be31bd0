"""`verify-engines`: TensorRT engines against ONNX Runtime fp32 (never run in this project's CI:
no GPU or TensorRT here; see README, "TensorRT on H100")."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..backends.tensorrt import engine_set, open_generator
from ..quantization.calibration import TrajectoryRecorder
from ..quantization.quantize import VERIFY_PROMPT, Fidelity, fidelity, variant_generator
from ..runtime.bundle import Bundle
from ..runtime.generator import Request

# (per segment SNR dB at least, end-to-end latents relative L2 at most) vs ONNX Runtime fp32.
# fp32 engines may use TF32; quantized variants inherit the budgets of ilf_deploy.quantize.
TRT_BUDGETS = {"fp32": (40.0, 1e-2), "fp16": (30.0, 5e-2), "int8-dynamic": (30.0, 0.05)}
TRT_BUDGETS.update({"int8-qdq": (30.0, 0.05), "fp8-qdq": (25.0, 0.10)})


def verify_engines(
    bundle: Bundle,
    variant: str | None = None,
    plan: str | None = None,
    cuda_graphs: bool = False,
    request: Any = None,
    progress: Callable[[str], None] | None = None,
) -> list[Any]:
    """TensorRT against ONNX Runtime fp32 (CPU): each engine on one held-out trajectory's recorded
    feeds (both `t` and `t_post`), then the plan's final latents. Returns quantize.Fidelity rows."""
    mode = bundle.manifest.precision_of(variant)
    seg_snr, e2e_rel = TRT_BUDGETS.get(mode, TRT_BUDGETS["fp16"])
    plan_name = plan or bundle.default_plan
    step_plan = bundle.plan(plan_name)
    request = request or Request(prompt=VERIFY_PROMPT, class_label=3, seed=123)
    reference = variant_generator(bundle, None)
    recorder = TrajectoryRecorder(bundle, max_samples=2)
    reference.segments.recorder = recorder
    if progress:
        progress(f"onnxruntime {plan_name}")
    want = reference.generate_latents(step_plan, request)
    trt_generator = open_generator(bundle, variant, cuda_graphs=cuda_graphs)
    if progress:
        progress(f"tensorrt {plan_name}")
    got = trt_generator.latents_to_numpy(trt_generator.generate_latents(step_plan, request))
    rows = []
    for segment in engine_set(bundle.manifest, variant).segments:
        feeds = [s for (n, _), kept in recorder.samples.items() if n == segment for s in kept]
        if not feeds:
            continue
        scores = []
        for sample in feeds:
            ours = trt_generator.segments.run(segment, sample)
            theirs = reference.segments.run(segment, sample)
            name = next(iter(theirs))
            scores.append(fidelity(ours[name].float().cpu().numpy(), theirs[name]))
        snr, cosine, rel = min(s[0] for s in scores), min(s[1] for s in scores), max(s[2] for s in scores)
        rows.append(Fidelity("segment", segment, snr, cosine, rel, len(scores), bool(snr >= seg_snr)))
    snr, cosine, rel = fidelity(got, want)
    rows.append(Fidelity("end-to-end", plan_name, snr, cosine, rel, 1, bool(rel <= e2e_rel)))
    return rows
