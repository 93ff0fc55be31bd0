"""Joining a Ray cluster, and our own error inside Ray's."""

from __future__ import annotations

import logging
import re
import socket
from typing import Any

from ilf_deploy.core.errors import ConfigError, IlfError
from ilf_deploy.serving.scale import require_ray

PROBE_S = 5.0  # how long a cluster address may take to accept a connection
OUR_ERROR = re.compile(r"^ilf_deploy(?:\.\w+)+Error: (.+)$")  # "ilf_deploy.core.errors.ConfigError: ..."


def check_reachable(address: str) -> None:
    """A HOST:PORT (or ray://HOST:PORT) address that nothing answers on is one line within PROBE_S:
    Ray itself retries it for a minute and more, printing warnings. `auto` and `local` pass."""
    target = address.removeprefix("ray://")
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_S).close()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ConfigError(
            f"--ray-address {address}: nothing answers there ({reason}); start the cluster "
            "(`ray start --head`) or give its head's address"
        ) from None


def connect(address: str) -> Any:
    """`ray.init(address)` once per process (quietly: the progress bar is ours)."""
    ray = require_ray()
    if not ray.is_initialized():
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise ConfigError(f"--ray-address {address}: {str(exc).splitlines()[0]}") from None
    return ray


def cause(exc: BaseException) -> str:
    """The first of our own errors inside a Ray error (an actor that refused the bundle), else its
    first line."""
    seen: BaseException | None = exc
    for _ in range(16):  # Ray wraps errors in errors; never loop on one that wraps itself
        if seen is None:
            break
        if isinstance(seen, IlfError):
            return str(seen)
        inner = getattr(seen, "cause", None)
        seen = inner if isinstance(inner, BaseException) and inner is not seen else seen.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if "Error: " in line]
    ours = [OUR_ERROR.match(line) for line in lines]  # ours, raised in a worker: only its text came back
    message = next((match.group(1) for match in ours if match), None)
    return message or (lines[-1] if lines else str(exc).splitlines()[0].strip())
