"""`ilf-deploy serve`: registered on the CLI by `register(command)` (see ilf_deploy/cli/__init__.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .generate import backend_help

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def register(command) -> None:
    """Add `serve` with the CLI's `command` decorator factory (IlfError -> one line, exit 2)."""

    @command("serve")
    def serve(
        bundle: Annotated[Path, typer.Argument(help="Bundle directory (from `ilf-deploy build`).")],
        host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
        backend: Annotated[str, typer.Option(help=backend_help("onnxruntime"))] = "onnxruntime",
        max_batch: Annotated[
            int | None, typer.Option(help="Images per engine call (default: the bundle's, at least 8).")
        ] = None,
        max_wait_ms: Annotated[
            float, typer.Option(help="How long a batch's first image waits for others.")
        ] = 10.0,
        max_queue: Annotated[int, typer.Option(help="Images waiting before requests get 429.")] = 64,
        timeout_s: Annotated[float, typer.Option(help="Per-request limit, queueing included (504).")] = 120.0,
        max_n: Annotated[int, typer.Option(help="Largest `n` (images per request).")] = 8,
        default_plan: Annotated[
            str | None, typer.Option(help="Plan for requests without one (default: first ILF plan).")
        ] = None,
        log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    ) -> None:
        """Serve a bundle over HTTP: OpenAI-style /v1/images/generations with micro-batching."""
        from ..errors import ConfigError

        try:
            import uvicorn

            from ..serve.app import ServeOptions, create_app
        except ImportError as exc:  # the serve extra is optional
            raise ConfigError(f"serving needs {exc.name}: pip install 'ilf-deploy[serve]'") from None

        if not 0 <= port <= 65535:
            raise ConfigError(f"--port must be in 0..65535, got {port}")
        if log_level not in LOG_LEVELS:
            raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
        options = ServeOptions(
            backend=backend,
            max_batch=max_batch,
            max_wait_ms=max_wait_ms,
            max_queue=max_queue,
            timeout_s=timeout_s,
            max_n=max_n,
            default_plan=default_plan,
        )
        app = create_app(bundle, options)  # bundle and option errors surface before listening
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=10)
