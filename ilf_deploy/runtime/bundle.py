"""Bundles on disk: the manifest, its schema version and the sha256 of every file.

A bundle is a directory: manifest.json, plans/*.json, tokenizer/, positions/*.npy, onnx/*.onnx
(and later engines/). Loading refuses a bundle whose schema is unknown or whose files changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import IlfError
from ..plan import StepPlan

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(IlfError):
    """A bundle that is missing, corrupted, or from an incompatible version."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tool_versions() -> dict[str, str]:
    versions = {}
    for package in ("ilf-deploy", "torch", "diffusers", "transformers", "onnx", "onnxruntime", "tokenizers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[package] = metadata.version(package)
    return versions


def is_bundle(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def rewrite_manifest(bundle_path: Path, mutate: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    """Apply `mutate` to the manifest, hash the files it (re)listed, write it atomically.

    `mutate` lists new or rewritten files in `manifest["files"]` with an empty digest (they are
    hashed here; the others keep theirs, so multi-GB bundles are not re-read) and removes the
    entries of files it deleted.
    """
    root = Path(bundle_path)
    path = root / MANIFEST
    manifest = json.loads(path.read_text())
    mutate(manifest)
    manifest["files"] = {
        name: digest or sha256_file(root / name) for name, digest in sorted(manifest["files"].items())
    }
    write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return manifest


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@dataclass
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @classmethod
    def load(cls, path: str | Path, verify_hashes: bool = True) -> Bundle:
        path = Path(path)
        manifest_path = path / MANIFEST
        if not manifest_path.is_file():
            raise BundleError(f"{path} is not a bundle (no {MANIFEST}); build one with `ilf-deploy build`")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise BundleError(f"{manifest_path} is unreadable: {exc}") from None
        version = manifest.get("schema_version") if isinstance(manifest, dict) else None
        if version != SCHEMA_VERSION:
            raise BundleError(
                f"{path}: bundle schema version {version!r} is not supported (this tool reads "
                f"{SCHEMA_VERSION}); rebuild the bundle with this version of ilf-deploy"
            )
        bundle = cls(path, manifest)
        if verify_hashes:
            bundle.verify_files()
        return bundle

    def verify_files(self) -> None:
        for name, digest in self.manifest["files"].items():
            file = self.path / name
            if not file.is_file():
                raise BundleError(f"{self.path}: {name} is missing; the bundle is incomplete, rebuild it")
            if sha256_file(file) != digest:
                raise BundleError(
                    f"{self.path}: {name} does not match its sha256 in the manifest (edited or corrupted)"
                )

    # -- facts ---------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return self.manifest["architecture"]

    @property
    def model(self) -> dict[str, Any]:
        return self.manifest["model"]

    @property
    def loop(self) -> tuple[int, int] | None:
        feedback = self.manifest.get("feedback")
        return tuple(feedback["loop"]) if feedback else None  # type: ignore[return-value]

    @property
    def plan_names(self) -> list[str]:
        return list(self.manifest["plans"])

    @property
    def default_plan(self) -> str:
        """The plan a request without one gets: the first ILF plan (what this toolchain is for),
        else the first plan. The one place every command and server takes it from."""
        return next((p for p in self.plan_names if p.startswith("ilf")), self.plan_names[0])

    def plan(self, spec: str) -> StepPlan:
        """A bundled plan by name, or a plan JSON file whose segments the bundle has."""
        if spec in self.manifest["plans"]:
            plan = StepPlan.load(self.path / self.manifest["plans"][spec])
        elif spec.endswith(".json") and Path(spec).is_file():
            plan = StepPlan.load(Path(spec))
        else:
            raise BundleError(f"plan {spec!r} is not in this bundle (it has: {', '.join(self.plan_names)})")
        missing = sorted(set(plan.cut_points) - set(self.manifest["cut_points"]))
        if missing:
            raise BundleError(
                f"plan {plan.name!r} cuts the model at block(s) {missing} where this bundle has no segment "
                "boundary; rebuild the bundle with the plan in --plans"
            )
        return plan

    @property
    def variants(self) -> list[str]:
        """Extra precisions added after the build (e.g. quantized segments), by name."""
        return list(self.manifest.get("variants", {}))

    def segment_spec(self, name: str, variant: str | None = None) -> dict[str, Any]:
        """A segment's manifest entry; a variant overrides the segments it has replaced."""
        if variant is not None:
            if variant not in self.manifest.get("variants", {}):
                raise BundleError(
                    f"the bundle has no variant {variant!r} (it has: {', '.join(self.variants) or 'none'})"
                )
            spec = self.manifest["variants"][variant]["segments"].get(name)
            if spec is not None:
                return spec
        if name not in self.manifest["segments"]:
            raise BundleError(f"the bundle has no {name!r} segment")
        return self.manifest["segments"][name]

    def segment_path(self, name: str, variant: str | None = None) -> Path:
        return self.path / self.segment_spec(name, variant)["file"]

    def positions(self, latent_height: int, latent_width: int) -> np.ndarray:
        path = self.path / "positions" / f"{latent_height}x{latent_width}.npy"
        if not path.is_file():
            sizes = ", ".join(f"{h}x{w}" for h, w in self.manifest["resolutions"])
            raise BundleError(
                f"the bundle was not built for {latent_height * self.model['vae_scale_factor']}x"
                f"{latent_width * self.model['vae_scale_factor']} images (it has: {sizes})"
            )
        return np.load(path)
