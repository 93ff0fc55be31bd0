"""HTTP serving of a bundle: OpenAI-style image generation with micro-batching (`ilf-deploy serve`).

FastAPI and uvicorn are imported only here (the `serve` extra), never by the rest of the package.
"""

from .app import ServeOptions, create_app

__all__ = ["ServeOptions", "create_app"]
