"""`verify-engines`: TensorRT engines against ONNX Runtime fp32 (never run in this project's CI:
no GPU or TensorRT here; see docs/tensorrt.md). Budgets: compare.BUDGETS ("tensorrt", …)."""

from __future__ import annotations

from collections.abc import Callable

from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.engines.backends.tensorrt import engine_set, open_generator
from ilf_deploy.engines.compare import Budget, Check, budget, compare_to_reference, run_reference


def engines_budget(bundle: Bundle, variant: str | None) -> Budget:
    """The budget TensorRT engines of `variant` (None: the bundle's own) are held to."""
    return budget("tensorrt", bundle.manifest.precision_of(variant))


def verify_engines(
    bundle: Bundle,
    variant: str | None = None,
    plan: str | None = None,
    cuda_graphs: bool = False,
    request: Request | None = None,
    progress: Callable[[str], None] | None = None,
) -> list[Check]:
    """TensorRT against ONNX Runtime fp32 (CPU): each engine on feeds recorded along one held-out
    trajectory (a uniform sample of its calls), then the plan's final latents."""
    limits = engines_budget(bundle, variant)
    reference = run_reference(bundle, plan, request, max_samples=2, progress=progress)
    candidate = open_generator(bundle, variant, cuda_graphs=cuda_graphs)
    segments = list(engine_set(bundle.manifest, variant).segments)
    return compare_to_reference(candidate, reference, segments, limits, progress)
