"""Joining a Ray cluster, and our own error inside Ray's."""

from __future__ import annotations

import logging
from typing import Any

from ..errors import ConfigError, IlfError
from . import require_ray


def connect(address: str) -> Any:
    """`ray.init(address)` once per process (quietly: the progress bar is ours)."""
    ray = require_ray()
    if not ray.is_initialized():
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
    lines = [line for line in str(exc).splitlines() if "Error: " in line]
    return (lines[-1] if lines else str(exc).splitlines()[0]).strip()
