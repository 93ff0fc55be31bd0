"""User-facing errors: the CLI prints these as one line and exits 2, never a traceback."""


class IlfError(Exception):
    """Base class for errors caused by bad input or a bad environment, not by a bug."""


class ConfigError(IlfError):
    """An option, plan or model config that cannot be used."""


class ModelLoadError(IlfError):
    """A model directory or hub id that cannot be loaded."""


class NonFiniteError(IlfError):
    """A generation produced non-finite latents; names the step and the plan.

    Raised by the denoising loop (core/runtime/loop.py) when its once-per-step check finds NaN or Inf:
    the CLI exits non-zero, servers answer 500 with the reason and count it, and a warm-up that
    raises it keeps the server not ready."""


MAX_PORT = 65535


def check_at_least(flag: str, value: float | None, low: float = 1) -> None:
    """The one lower-bound check and its wording, `FLAG must be >= LOW, got VALUE` (None: not
    given, nothing to check)."""
    if value is not None and value < low:
        raise ConfigError(f"{flag} must be >= {low:g}, got {value}")


def check_port(flag: str, port: int) -> None:
    """A TCP port to listen on, one rule for every server: 1..65535, or 0 for a free port that the
    server picks and reports (`serve` logs it; `serve --server triton` picks before starting)."""
    if not 0 <= port <= MAX_PORT:
        raise ConfigError(f"{flag} must be in 0..{MAX_PORT} (0: a free port), got {port}")
