"""`ilf-deploy serve`: a bundle over HTTP, on our FastAPI server, on NVIDIA Triton or on Ray Serve."""

from __future__ import annotations

import logging
import os
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer

from ilf_deploy.cli import command, console
from ilf_deploy.cli.batch import (
    Autoscale,
    RayAddress,
    ReplicaCpus,
    Replicas,
    ShipBundle,
    ray_options,
    serve_on_ray,
)
from ilf_deploy.cli.generate import announce
from ilf_deploy.cli.options import Backend, BundleDir, DefaultPlan, Digest
from ilf_deploy.core.batching import DEFAULT_BATCHING, BatchingPolicy
from ilf_deploy.core.errors import ConfigError, check_port

LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
SERVERS = ("ilf", "triton", "ray")
KEYS_HELP = (
    "API keys, one per line (`NAME:KEY` names it in metrics and logs); also read from the "
    "ILF_API_KEYS environment variable. Clients send `Authorization: Bearer KEY`."
)
# The batching policy (core/batching.py: its defaults are the flags' defaults, for every --server).
MAX_BATCH_HELP = (
    "Images per engine call (default: the bundle's, ≥ 8). Calls run at bucket sizes 1, 2, 4, … up to "
    "it, each warmed up before ready; OpenVINO keeps one compiled model per bucket (~80 MB per "
    "PixArt-XL int8 block at 256 px each: ~2.3 GB per bucket for 28 blocks)."
)
MaxBatch = Annotated[int | None, typer.Option(help=MAX_BATCH_HELP)]
MaxWait = Annotated[float, typer.Option(help="How long a batch's first image waits for others.")]
MaxQueue = Annotated[int, typer.Option(help="Images waiting before requests get 429.")]
Timeout = Annotated[float, typer.Option(help="Per-request limit, queueing included (504).")]
MaxN = Annotated[int, typer.Option(help="Largest `n` (images per request).")]
# The connection layer and shutdown (docs/serving.md); None: the defaults.
HeaderTimeout = Annotated[
    float | None, typer.Option(help="Seconds for a request's headers; then 408, closed (default 10).")
]
BodyTimeout = Annotated[
    float | None, typer.Option(help="Seconds for a request's body; then 408, closed (default 30).")
]
MaxConnections = Annotated[
    int | None, typer.Option(help="Open connections (default 1024, fewer under a low ulimit -n).")
]
# OpenAI compatibility (docs/serving.md ("OpenAI compatibility"))
ModelName = Annotated[
    str | None,
    typer.Option(help="The model id in /v1/models and requests' `model` (default: the bundle's name)."),
]
UrlTtl = Annotated[float, typer.Option(help='Seconds a `response_format: "url"` image link answers.')]
Drain = Annotated[
    float | None,
    typer.Option(
        help="On SIGTERM, seconds the engine's batch may finish (10; Triton: its --exit-timeout-secs, 30)."
    ),
]


@command("serve")
def serve(
    bundle: BundleDir,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    backend: Backend = None,
    max_batch: MaxBatch = DEFAULT_BATCHING.max_batch,
    max_wait_ms: MaxWait = DEFAULT_BATCHING.max_wait_ms,
    max_queue: MaxQueue = DEFAULT_BATCHING.max_queue,
    timeout_s: Timeout = DEFAULT_BATCHING.timeout_s,
    max_n: MaxN = DEFAULT_BATCHING.max_n,
    default_plan: DefaultPlan = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
    log_format: Annotated[str, typer.Option(help="human, or json: one JSON object per log line.")] = "human",
    api_key_file: Annotated[Path | None, typer.Option(help=KEYS_HELP)] = None,
    require_auth: Annotated[
        bool, typer.Option("--require-auth", help="Refuse to start without API keys.")
    ] = False,
    max_inflight_per_key: Annotated[
        int | None, typer.Option(help="Images one key may have in flight (429).")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="TLS private key (PEM), to serve HTTPS.")] = None,
    ssl_certfile: Annotated[Path | None, typer.Option(help="TLS certificate chain (PEM).")] = None,
    server: Annotated[
        str,
        typer.Option(help="ilf (this FastAPI server), triton (tritonserver, KServe v2) or ray (Ray Serve)."),
    ] = "ilf",
    http_port: Annotated[int | None, typer.Option(help="Triton's HTTP port (default --port).")] = None,
    grpc_port: Annotated[int, typer.Option(help="Triton's gRPC port.")] = 8001,
    metrics_port: Annotated[int, typer.Option(help="Triton's Prometheus metrics port.")] = 8002,
    digest: Digest = None,
    header_timeout_s: HeaderTimeout = None,
    body_timeout_s: BodyTimeout = None,
    max_connections: MaxConnections = None,
    drain_s: Drain = None,
    ray_address: RayAddress = None,
    replicas: Replicas = None,
    autoscale: Autoscale = None,
    replica_cpus: ReplicaCpus = None,
    ship_bundle: ShipBundle = False,
    model_name: ModelName = None,
    url_ttl_s: UrlTtl = 600.0,
) -> None:
    """Serve a bundle over HTTP: OpenAI-style /v1/images/generations with micro-batching."""
    if server not in SERVERS:
        raise ConfigError(f"--server must be one of {', '.join(SERVERS)}, got {server!r}")
    ray = ray_options(server, ray_address, replicas, autoscale, replica_cpus, ship_bundle)  # cli/batch.py
    security = {
        "--api-key-file": api_key_file is not None,
        "--require-auth": require_auth,
        "--max-inflight-per-key": max_inflight_per_key is not None,
        "--ssl-keyfile/--ssl-certfile": ssl_keyfile is not None or ssl_certfile is not None,
    }
    given = _given(header_timeout_s=header_timeout_s, body_timeout_s=body_timeout_s, drain_s=drain_s)
    policy = BatchingPolicy(max_batch, max_wait_ms, max_queue, timeout_s, max_n)  # every server's batching
    if server == "triton":  # the same bundle on NVIDIA Triton Inference Server (cli/triton.py)
        from ilf_deploy.cli.triton import run_triton
        from ilf_deploy.serving.serve.limits import check_drain_s

        _refuse_security_options(security, host)
        connection = [*given, *(["max_connections"] if max_connections is not None else [])]
        _refuse_connection_options([name for name in connection if name != "drain_s"])
        if drain_s is not None:  # Triton's --exit-timeout-secs; its own default (30) otherwise
            check_drain_s(drain_s)
        code = run_triton(
            bundle, backend or "auto", host, http_port or port, grpc_port, metrics_port, policy,
            default_plan, digest=digest, drain_s=drain_s,
        )  # fmt: skip
        raise typer.Exit(code)
    from ilf_deploy.serving.serve.auth import ENV_VAR, load_keys
    from ilf_deploy.serving.serve.state import ServeOptions

    options = ServeOptions(
        **asdict(policy),
        backend=backend or "auto",
        default_plan=default_plan,
        api_keys=load_keys(api_key_file, os.environ.get(ENV_VAR)),  # never from argv: `ps` shows it
        max_inflight_per_key=max_inflight_per_key,
        digest=digest,
        max_connections=max_connections,
        model_name=model_name,
        url_ttl_s=url_ttl_s,
        **given,
    )
    tls = _tls_files(ssl_keyfile, ssl_certfile)
    if server == "ray":  # the same app in Ray Serve replicas (cli/batch.py; docs/scale.md)
        unused = [*given, *(["max_connections"] if max_connections is not None else [])]
        serve_on_ray(bundle, options, (host, port, tls), require_auth, (log_format, log_level), ray, unused)
        return
    _run_http(bundle, options, host, port, (log_level, log_format), require_auth, tls, backend)


def _refuse_security_options(given: dict[str, bool], host: str) -> None:
    """Triton answers without our keys, TLS or per-key limits: never ignore them silently."""
    from ilf_deploy.serving.serve.auth import ENV_VAR, ApiKeys, check_exposure

    used = [name for name, on in {**given, ENV_VAR: bool(os.environ.get(ENV_VAR))}.items() if on]
    if used:
        raise ConfigError(
            f"{', '.join(used)}: --server triton has no API keys, TLS or per-key limits; keep it on a "
            "loopback or private address behind an authenticating TLS proxy (README, Triton)"
        )
    warning = check_exposure(host, ApiKeys(), require_auth=False)
    if warning:
        from rich.markup import escape

        console.print(f"[yellow]warning:[/yellow] {escape(warning.split(' (give')[0])}")


def _given(**values: Any) -> dict[str, Any]:
    """The options given on the command line (None: ServeOptions' default)."""
    return {name: value for name, value in values.items() if value is not None}


def _refuse_connection_options(used: list[str]) -> None:
    """Triton's HTTP server has none of these limits (docs/serving.md)."""
    if used:
        flags = ", ".join("--" + name.replace("_", "-") for name in used)
        raise ConfigError(
            f"{flags}: --server triton has no header or body deadline or connection cap; "
            "put a proxy with such limits in front (README)"
        )


def _tls_files(keyfile: Path | None, certfile: Path | None) -> dict[str, str | None]:
    """The server's TLS arguments (both None: plain HTTP)."""
    if (keyfile is None) != (certfile is None):
        raise ConfigError("--ssl-keyfile and --ssl-certfile go together")
    for flag, path in (("--ssl-keyfile", keyfile), ("--ssl-certfile", certfile)):
        if path is not None and not path.is_file():
            raise ConfigError(f"{flag} {path}: no such file")
    if keyfile is None:
        return {"ssl_keyfile": None, "ssl_certfile": None}
    return {"ssl_keyfile": str(keyfile), "ssl_certfile": str(certfile)}


def _run_http(
    bundle: Path,
    options: Any,
    host: str,
    port: int,
    logs: tuple[str, str],
    require_auth: bool,
    tls: dict[str, str | None],
    backend: str | None,
) -> None:
    """Our FastAPI server (uvicorn behind serving/serve/server.py's connection layer), after every check
    that can fail before listening."""
    try:
        import uvicorn

        from ilf_deploy.serving.serve.app import create_app
        from ilf_deploy.serving.serve.server import run_server
    except ImportError as exc:  # the serve extra is optional
        raise ConfigError(f"serving needs {exc.name}: pip install 'ilf-deploy[serve]'") from None
    from ilf_deploy.serving.serve.auth import check_exposure
    from ilf_deploy.serving.serve.logs import LOG_FORMATS, configure_logging

    log_level, log_format = logs
    check_port("--port", port)
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"--log-level must be one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    if log_format not in LOG_FORMATS:
        raise ConfigError(f"--log-format must be one of {', '.join(LOG_FORMATS)}, got {log_format!r}")
    warning = check_exposure(host, options.api_keys, require_auth, tls["ssl_keyfile"] is not None)
    app = create_app(bundle, options)  # bundle and option errors surface before listening
    announce(app.state.ilf.generator.choice, bundle, backend)
    configure_logging(log_format, uvicorn.config.LOG_LEVELS[log_level])
    if warning:
        logging.getLogger("ilf_deploy.serving.serve").warning(warning)
    run_server(app, host=host, port=port, log_level=log_level, **tls)
