"""ilf-deploy: deploy diffusion transformers accelerated with Inner Loop Feedback (ILF).

The public Python API, importable from the package itself (loaded on first use, so that
``import ilf_deploy`` stays cheap and the runtime keeps needing no torch)::

    from ilf_deploy import Bundle, Request, open_generator

    generator = open_generator("out/demo/bundle", backend="onnxruntime")
    plan = Bundle.load("out/demo/bundle").plan("ilf-10")
    latents = generator.generate_latents(plan, Request(prompt="a red circle", seed=0))
    images = generator.decode(latents)  # (1, H, W, 3) uint8

- `open_generator`: a bundle's `Generator` on one engine (hashes and pinned digest checked).
- `Bundle`: a built bundle (manifest, plans, segments), loaded and verified.
- `StepPlan`: a step plan (the JSON a bundle carries: steps, segments, coefficients).
- `Request`: one image's request; `Generator`: the engine-independent generation contract.
- `IlfError`: the base class of every user-facing error (one line, exit 2 on the CLI).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> module that defines it (imported on first attribute access: PEP 562)
_PUBLIC = {
    "open_generator": "ilf_deploy.engines.backends",
    "Bundle": "ilf_deploy.core.runtime.bundle",
    "StepPlan": "ilf_deploy.core.plan",
    "Request": "ilf_deploy.core.runtime.generator",
    "Generator": "ilf_deploy.core.runtime.generator",
    "IlfError": "ilf_deploy.core.errors",
}
__all__ = ["Bundle", "Generator", "IlfError", "Request", "StepPlan", "__version__", "open_generator"]

if TYPE_CHECKING:
    from ilf_deploy.core.errors import IlfError
    from ilf_deploy.core.plan import StepPlan
    from ilf_deploy.core.runtime.bundle import Bundle
    from ilf_deploy.core.runtime.generator import Generator, Request
    from ilf_deploy.engines.backends import open_generator


assert set(__all__) == {"__version__", *_PUBLIC}


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ilf_deploy' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
