"""Options that several commands share, declared once as typed aliases."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from ilf_deploy.core.runtime.bundle import Bundle

Digest = Annotated[
    str | None,
    typer.Option(
        "--digest",
        metavar="sha256:HEX",
        help="Pin the bundle: refuse it unless its digest (`ilf-deploy inspect` prints it) is this one, "
        "as an image digest pins a container.",
    ),
]


def backend_help(default: str = "auto for bundles, torch for model directories") -> str:
    """The registry's backends, for --backend's help (a new backend shows up by itself)."""
    from ilf_deploy.engines.backends import REGISTRY

    names = ", ".join(f"{b.name} ({b.summary})" for b in REGISTRY.values())
    return (
        f"One of: {names}, auto (the engine `ilf-deploy tune` chose on this machine, else "
        f"onnxruntime fp32). Default: {default}."
    )


VARIANT_HELP = (
    "A precision variant added to the bundle after the build (e.g. quantized segments), or OpenVINO's bf16."
)
BACKEND_HELP = backend_help()

BundleDir = Annotated[Path, typer.Argument(help="Bundle directory (from `ilf-deploy build`).")]
Backend = Annotated[
    str | None, typer.Option(help=backend_help("auto (tune's winner here, else onnxruntime)"))
]
Variant = Annotated[str | None, typer.Option(help=VARIANT_HELP)]
DefaultPlan = Annotated[
    str | None,
    typer.Option(help="Plan for requests without one: bundled, auto, a file, a preset (default: first ILF)."),
]
Height = Annotated[int | None, typer.Option(help="Image height in pixels (default: the model's).")]
Width = Annotated[int | None, typer.Option(help="Image width in pixels (default: the model's).")]
# `--json` prints JSON to stdout (plan, inspect, backends, tune); `--json-out FILE` writes it to a file.
ChecksJson = Annotated[
    Path | None, typer.Option("--json-out", help="Also write the checks as JSON to this file.")
]
# Every command that writes an output path has it (cli/paths.py: an existing output is refused without).
Force = Annotated[bool, typer.Option("--force", help="Replace outputs that exist (refused without it).")]


def load_bundle(path: str | Path, digest: str | None = None, verify_hashes: bool = True) -> Bundle:
    """The bundle a command was given: manifest, files' hashes (unless `verify_hashes=False`) and the
    pinned `digest` checked, each refusal one line. The CLI's one way to open a bundle: a command
    loads it once and hands the `Bundle` on (to open_bundle_generator, the plan resolver...)."""
    from ilf_deploy.core.runtime.bundle import Bundle

    return Bundle.load(path, verify_hashes, digest=digest)


def pin(path: str | Path, digest: str | None) -> None:
    """Refuse the bundle at `path` before any work unless its digest is `digest` (None: no pin).

    For the commands that hand a path to the library (calibrate, quantize, build-engines, eval)."""
    from ilf_deploy.core.errors import ConfigError
    from ilf_deploy.core.runtime.bundle import is_bundle

    if digest is None:
        return
    if not is_bundle(path):
        raise ConfigError(f"--digest pins a bundle; {path} is not one")
    load_bundle(path, digest, verify_hashes=False)  # the files are checked by the command
