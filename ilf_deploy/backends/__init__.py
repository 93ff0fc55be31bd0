"""Every engine behind one contract, and the registry that names them.

A backend is a module with `open_generator(bundle, variant=None, device="cpu", **options)` that
returns a `runtime.generator.Generator`; engines that run bundle segments implement
`runtime.runner.SegmentRunner` and wrap it in `runtime.pipeline.BundleGenerator`. Adding one is a
new module here plus one `register(...)` line below (or, from another package, an entry point in
the `ilf_deploy.backends` group whose object is a `Backend`); the CLI's `--backend` choices, `serve`,
`bench`, `eval` and `verify` read the registry. Modules are imported only when their backend is
opened, so a missing SDK fails with a one-line error naming the extra that installs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..runtime.bundle import Bundle
from ..runtime.generator import Generator

ENTRY_POINT_GROUP = "ilf_deploy.backends"


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # imported on first use; has `open_generator(bundle, variant, device, **options)`
    summary: str
    extra: str | None = None  # `pip install 'ilf-deploy[EXTRA]'` brings what it needs
    requires: tuple[str, ...] = ()  # top-level modules it imports (checked before opening)
    variants: bool = True  # runs the bundle's precision variants
    devices: tuple[str, ...] = ("cpu",)  # what `--device` may say ("*": any torch device)
    options: dict[str, Any] = field(default_factory=dict)  # default keyword options

    def missing(self) -> str | None:
        """The first required module that does not import, or None."""
        for name in self.requires:
            try:
                importlib.import_module(name)
            except ImportError:
                return name
        return None

    def open(
        self, bundle: Bundle, variant: str | None = None, device: str = "cpu", **options: Any
    ) -> Generator:
        missing = self.missing()
        if missing is not None:
            hint = f": pip install 'ilf-deploy[{self.extra}]'" if self.extra else ""
            raise ConfigError(f"the {self.name} backend needs {missing}{hint}")
        if variant is not None and not self.variants:
            raise ConfigError(
                f"variant {variant!r} runs on a bundle engine (e.g. onnxruntime), not {self.name}"
            )
        if "*" not in self.devices and device not in self.devices:
            raise ConfigError(f"--device {device} is for the torch backend; {self.name} chooses its own")
        module = importlib.import_module(self.module)
        generator = module.open_generator(bundle, variant, device, **{**self.options, **options})
        generator.backend = self.name
        return generator


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    REGISTRY[backend.name] = backend
    return backend


register(
    Backend(
        "onnxruntime",
        "ilf_deploy.backends.onnxruntime",
        "ONNX Runtime (CPU; CUDA when the installed build has it)",
        extra="onnx",
        requires=("onnxruntime",),
    )
)
register(
    Backend(
        "torch",
        "ilf_deploy.backends.pytorch",
        "the bundle's PyTorch model (the reference; any torch device)",
        variants=False,
        devices=("*",),
    )
)
register(
    Backend(
        "tensorrt",
        "ilf_deploy.backends.tensorrt",
        "TensorRT engines from `ilf-deploy build-engines` (NVIDIA GPU)",
        extra="tensorrt",
    )
)


def _load_entry_points() -> None:
    """Backends other packages declare (entry point group `ilf_deploy.backends`)."""
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        backend = entry.load()
        if isinstance(backend, Backend) and backend.name not in REGISTRY:
            register(backend)


_load_entry_points()


def backend_names() -> list[str]:
    return list(REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def open_bundle_generator(
    bundle: Bundle,
    backend: str = "onnxruntime",
    variant: str | None = None,
    device: str = "cpu",
    **options: Any,
) -> Generator:
    """A generator for a loaded bundle on the named backend."""
    return get_backend(backend).open(bundle, variant, device, **options)


def open_generator(
    source: str | Path,
    backend: str = "onnxruntime",
    verify_hashes: bool = True,
    variant: str | None = None,
    device: str = "cpu",
    **options: Any,
) -> Generator:
    """A generator for the bundle at `source`: its hashes checked, then the named backend opened.

    `device` is where the torch backend runs; the others choose their own. Options go to the
    backend (e.g. `model=` for torch on a `--no-copy-model` bundle, `cuda_graphs=` for TensorRT)."""
    spec = get_backend(backend)  # an unknown name fails before the hashes are read
    return spec.open(Bundle.load(source, verify_hashes), variant, device, **options)
