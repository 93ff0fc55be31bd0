"""Every engine behind one contract, and the registry that names them.

A backend is a module with `open_generator(bundle, variant=None, device="cpu", **options)` that
returns a `runtime.generator.Generator`; engines that run bundle segments implement
`runtime.runner.SegmentRunner` and wrap it in `runtime.pipeline.BundleGenerator`. Adding one is a
new module here plus one `register(...)` line below (or, from another package, an entry point in
the `ilf_deploy.engines.backends` group whose object is a `Backend`); the CLI's `--backend` choices, `serve`,
`bench`, `eval` and `verify` read the registry. Modules are imported only when their backend is
opened, so a missing SDK fails with a one-line error naming the extra that installs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Generator
from ilf_deploy.engines.backends.auto import AUTO, choose, fallback

ENTRY_POINT_GROUP = "ilf_deploy.engines.backends"


@dataclass(frozen=True)
class Backend:
    name: str
    module: str  # imported on first use; has `open_generator(bundle, variant, device, **options)`
    summary: str
    extra: str | None = None  # `pip install 'ilf-deploy[EXTRA]'` brings what it needs
    requires: tuple[str, ...] = ()  # top-level modules it imports (checked before opening)
    probe: str | None = None  # "module:function" -> bool, where importing is not proof enough
    variants: bool = True  # runs the bundle's precision variants
    devices: tuple[str, ...] = ("cpu",)  # what `--device` may say ("*": any torch device)
    options: dict[str, Any] = field(default_factory=dict)  # default keyword options

    def missing(self, probe: bool = True) -> str | None:
        """The first required module that does not import (or fails the probe), or None."""
        for name in self.requires:
            try:
                importlib.import_module(name)
            except ImportError:
                return name
        if probe and self.probe is not None:
            module, function = self.probe.split(":")
            if not getattr(importlib.import_module(module), function)():
                return self.requires[0] if self.requires else self.name
        return None

    def open(
        self, bundle: Bundle, variant: str | None = None, device: str = "cpu", **options: Any
    ) -> Generator:
        missing = self.missing(probe=False)  # a failed probe: the module's own open says more
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
        generator.bundle = bundle  # its callers read the bundle here, never load it again
        return generator


REGISTRY: dict[str, Backend] = {}


def register(backend: Backend) -> Backend:
    REGISTRY[backend.name] = backend
    return backend


register(
    Backend(
        "onnxruntime",
        "ilf_deploy.engines.backends.onnxruntime",
        "ONNX Runtime (CPU; CUDA when the installed build has it)",
        extra="onnx",
        requires=("onnxruntime",),
    )
)
register(
    Backend(
        "torch",
        "ilf_deploy.engines.backends.pytorch",
        "the bundle's PyTorch model (the reference; any torch device)",
        extra="export",
        requires=("torch",),
        variants=False,
        devices=("*",),
    )
)
register(
    Backend(
        "openvino",
        "ilf_deploy.engines.backends.openvino",
        "OpenVINO (CPU; --variant bf16 or an int8-ov variant; Intel GPU/NPU passed through, untested)",
        extra="openvino",
        requires=("openvino",),
        devices=("*",),  # OpenVINO's device names (CPU, GPU, NPU): checked by the backend
    )
)
register(
    Backend(
        "tensorrt",
        "ilf_deploy.engines.backends.tensorrt",
        "TensorRT engines from `ilf-deploy build-engines` (NVIDIA GPU)",
        extra="tensorrt",
        # not `requires`: tensorrt-stubs alone import as a namespace package; ask for the real bindings
        probe="ilf_deploy.engines.backends.tensorrt:tensorrt_available",
    )
)


def _load_entry_points() -> None:
    """Backends other packages declare (entry point group `ilf_deploy.engines.backends`)."""
    for entry in metadata.entry_points(group=ENTRY_POINT_GROUP):
        backend = entry.load()
        if isinstance(backend, Backend) and backend.name not in REGISTRY:
            register(backend)


_load_entry_points()


def backend_names() -> list[str]:
    return list(REGISTRY)


def get_backend(name: str) -> Backend:
    if name not in REGISTRY:
        raise ConfigError(f"unknown backend {name!r}; choose from {', '.join(REGISTRY)} or {AUTO}")
    return REGISTRY[name]


def open_bundle_generator(
    bundle: Bundle,
    backend: str = "onnxruntime",
    variant: str | None = None,
    device: str = "cpu",
    **options: Any,
) -> Generator:
    """A generator for a loaded bundle on the named backend. `auto` (engines/backends/auto.py): the engine
    `ilf-deploy tune` chose on this machine, else ONNX Runtime fp32; `generator.choice` says which
    and why, in one line."""
    if backend != AUTO:
        return get_backend(backend).open(bundle, variant, device, **options)
    choice = choose(bundle, variant, device)
    try:
        generator = get_backend(choice.backend).open(
            bundle, choice.variant, device, **{**choice.options, **options}
        )
    except ConfigError as exc:  # e.g. the tuned engine's extra was uninstalled since
        if not choice.tuned:
            raise
        choice = fallback(f"{choice.label} from tuning.json did not open: {exc}")
        generator = get_backend(choice.backend).open(bundle, None, device, **options)
    generator.choice = choice.reason
    return generator


def open_generator(
    source: str | Path | Bundle,
    backend: str = "onnxruntime",
    verify_hashes: bool = True,
    variant: str | None = None,
    device: str = "cpu",
    digest: str | None = None,
    **options: Any,
) -> Generator:
    """A generator for the bundle at `source`: its hashes (and, if given, its pinned `digest`)
    checked, then the named backend opened. `generator.bundle` is the bundle loaded here: callers
    read it (a server's contract, plans and digest) rather than load the manifest again.

    `device` is where the torch backend runs; the others choose their own. Options go to the
    backend (e.g. `model=` for torch on a `--no-copy-model` bundle, `cuda_graphs=` for TensorRT)."""
    if backend != AUTO:
        get_backend(backend)  # an unknown name fails before the hashes are read
    bundle = as_bundle(source, verify_hashes, digest)
    return open_bundle_generator(bundle, backend, variant, device, **options)


def as_bundle(source: str | Path | Bundle, verify_hashes: bool = True, digest: str | None = None) -> Bundle:
    """`source` loaded (its hashes and the pinned `digest` checked), or, already a `Bundle`, as is but
    for the pin: a caller that holds the bundle hands it on rather than have it read again."""
    if isinstance(source, Bundle):
        return source.check_pin(digest)
    return Bundle.load(source, verify_hashes, digest=digest)
