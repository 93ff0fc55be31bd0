"""User-facing errors: the CLI prints these as one line and exits 2, never a traceback."""


class IlfError(Exception):
    """Base class for errors caused by bad input or a bad environment, not by a bug."""


class ConfigError(IlfError):
    """An option, plan or model config that cannot be used."""


class ModelLoadError(IlfError):
    """A model directory or hub id that cannot be loaded."""
