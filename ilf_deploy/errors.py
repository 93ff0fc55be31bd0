"""User-facing errors: the CLI prints these as one line and exits 2, never a traceback."""


class IlfError(Exception):
    """Base class for errors caused by bad input or a bad environment, not by a bug."""


class ConfigError(IlfError):
    """An option, plan or model config that cannot be used."""


class ModelLoadError(IlfError):
    """A model directory or hub id that cannot be loaded."""


class NonFiniteError(IlfError):
    """A generation produced non-finite latents; names the step and the plan.

    Raised by the denoising loop (runtime/loop.py) when its once-per-step check finds NaN or Inf:
    the CLI exits non-zero, servers answer 500 with the reason and count it, and a warm-up that
    raises it keeps the server not ready."""
