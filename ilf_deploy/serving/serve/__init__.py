"""HTTP serving of a bundle: OpenAI-style image generation with micro-batching (`ilf-deploy serve`).

FastAPI and uvicorn (the `serve` extra) are imported on first use of `create_app`/`ServeOptions`,
so the CLI, which imports `serve.commands`, starts without them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ilf_deploy.serving.serve.app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from ilf_deploy.serving.serve import app

        return getattr(app, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
