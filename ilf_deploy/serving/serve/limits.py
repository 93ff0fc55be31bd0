"""The shutdown and connection limits both servers share (`serve`, `serve --server triton`), in a
module without the serve extra's imports: the Triton path checks `--drain-s` without FastAPI."""

from __future__ import annotations

from ilf_deploy.core.errors import ConfigError

MAX_TIMEOUT_S = 3600.0
DRAIN_S = 10.0  # on SIGTERM, how long the batch in the engine (Triton: in-flight requests) may run


def check_drain_s(drain_s: float) -> float:
    if not 0 <= drain_s <= MAX_TIMEOUT_S:  # 0: stop the running batch at once
        raise ConfigError(f"--drain-s must be in 0..{MAX_TIMEOUT_S:g}, got {drain_s}")
    return drain_s
