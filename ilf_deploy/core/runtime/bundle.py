"""Bundles on disk: the manifest, its schema version and the sha256 of every file.

A bundle is a directory: manifest.json, manifest.sha256, plans/*.json, tokenizer/, positions/*.npy,
onnx/*.onnx (and later engines/). The manifest lists every other file's sha256, and manifest.sha256
holds the sha256 of the manifest's own bytes: the bundle's digest. Loading refuses a bundle whose
schema is unknown, whose manifest or files changed, or (with a pinned digest) that is another one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.files import remove_dead_staging, staging_workspace
from ilf_deploy.core.files import strict_json as strict_json  # its callers import it from here
from ilf_deploy.core.files import write_atomic as write_atomic  # its writers import it from here
from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.manifest import (
    SCHEMA_VERSION,  # noqa: F401  (export.build writes it: a new bundle is version 2)
    SCHEMA_VERSIONS,
    BundleError,
    Manifest,
    ModelSpec,
    SegmentSpec,
    TokenizerSpec,
    VariantSpec,
    schema_version_for,
)

MANIFEST = "manifest.json"
DIGEST_FILE = "manifest.sha256"  # "sha256:<hex>" of manifest.json's bytes: the bundle's identity
DIGEST_PATTERN = re.compile(r"sha256:[0-9a-f]{64}")


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


def check_digest_option(digest: str | None) -> str | None:
    """A `--digest` value, checked for form before any bundle is read."""
    if digest is not None and not DIGEST_PATTERN.fullmatch(digest):
        raise BundleError(f"--digest must look like sha256:<64 lowercase hex digits>, got {digest!r}")
    return digest


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The one serialisation of a manifest (strict JSON, 2-space indent, keys in the order written:
    plans and resolutions are ordered). The digest covers these bytes, so every writer uses this."""
    return (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode()


def write_manifest(
    root: Path, manifest: dict[str, Any], before_write: Callable[[], None] | None = None
) -> Manifest:
    """Validate `manifest`, then write manifest.json and its digest (each atomically).
    `before_write` runs between the two: what must happen only once the manifest is known valid."""
    data = manifest_bytes(manifest)
    parsed = Manifest.parse(json.loads(data), f"{root / MANIFEST} (as about to be written)")
    if before_write is not None:
        before_write()
    write_atomic(root / MANIFEST, data)
    write_atomic(root / DIGEST_FILE, f"sha256:{hashlib.sha256(data).hexdigest()}\n".encode())
    return parsed


def rewrite_manifest(
    bundle_path: Path,
    mutate: Callable[[dict[str, Any]], None],
    staged: Path | None = None,
) -> dict[str, Any]:
    """Apply `mutate` to the manifest, hash the files it (re)listed, validate and write it.

    `mutate` lists new or rewritten files in `manifest["files"]` with an empty digest (they are
    hashed here; the others keep theirs, so multi-GB bundles are not re-read) and removes the
    entries of files it deleted. An edited manifest is refused first: a rewrite must not bless it.
    `staged` (from `staging`) holds new files laid out as in the bundle: they are hashed there and
    listed, and renamed into place only once the new manifest is valid, just before it is written.
    So a kill, a Ctrl-C or a failure on the way leaves the bundle as it was, never the old manifest
    over new files (which would make the bundle refuse itself); only those renames are a window.
    """
    root = Path(bundle_path)
    new = {} if staged is None else {
        str(p.relative_to(staged)): sha256_file(p) for p in sorted(staged.rglob("*")) if p.is_file()
    }  # fmt: skip
    data = _read_manifest_bytes(root)
    _check_own_digest(root, data)
    manifest = json.loads(data)
    mutate(manifest)
    manifest["files"].update(new)
    if manifest.get("schema_version") in SCHEMA_VERSIONS:  # the oldest that says what it now holds
        manifest["schema_version"] = schema_version_for(manifest)
    manifest["files"] = {
        name: digest or sha256_file(root / name) for name, digest in sorted(manifest["files"].items())
    }

    def commit() -> None:
        assert staged is not None
        for rel in new:
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / rel, root / rel)

    write_manifest(root, manifest, commit if new else None)
    return manifest


@contextlib.contextmanager
def staging(bundle_path: Path, name: str) -> Iterator[Path]:
    """A directory inside the bundle (`.NAME.tmp-XXXX`) to write new files into, laid out as they
    will be in the bundle, for `rewrite_manifest(..., staged=)`; removed on the way out. It is the
    staging of every writer (files.staging_workspace: locked while its writer lives); what writers
    killed earlier (any writer's) left in the bundle is removed first (files.remove_dead_staging)."""
    remove_dead_staging(Path(bundle_path))
    with staging_workspace(Path(bundle_path), name) as staged:
        yield staged


def remove_unlisted(bundle_path: Path, folder: str, manifest: dict[str, Any]) -> None:
    """Delete the files in `folder` that `manifest` no longer lists (what a rewrite replaced)."""
    for path in (Path(bundle_path) / folder).glob("*"):
        if path.is_file() and str(path.relative_to(bundle_path)) not in manifest["files"]:
            path.unlink(missing_ok=True)


def _read_manifest_bytes(root: Path) -> bytes:
    path = root / MANIFEST
    if not path.is_file():
        raise BundleError(f"{root} is not a bundle (no {MANIFEST}); build one with `ilf-deploy build`")
    try:
        return path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path} is unreadable: {exc.strerror or exc}") from None


def _check_own_digest(root: Path, data: bytes) -> str:
    """The manifest's digest, refused unless it matches the one the bundle recorded."""
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    try:
        recorded = (root / DIGEST_FILE).read_text().strip()
    except OSError:
        raise BundleError(
            f"{root}: {DIGEST_FILE} is missing (a bundle from an older ilf-deploy, or incomplete); rebuild it"
        ) from None
    if recorded != digest:
        raise BundleError(
            f"{root}: {MANIFEST} does not match the bundle's digest in {DIGEST_FILE} "
            "(edited or corrupted); rebuild the bundle"
        )
    return digest


def _check_pin(path: Path, actual: str, digest: str | None) -> None:
    if digest is not None and digest != actual:
        raise BundleError(f"{path} has digest {actual}, not the pinned --digest {digest}")


@dataclass
class Bundle:
    path: Path
    manifest: Manifest
    digest: str  # "sha256:<hex>" of manifest.json: pins the bundle as an image digest pins a container

    @classmethod
    def load(cls, path: str | Path, verify_hashes: bool = True, digest: str | None = None) -> Bundle:
        """Read and validate a bundle; with `digest`, refuse any other bundle."""
        path = Path(path)
        check_digest_option(digest)
        data = _read_manifest_bytes(path)
        try:
            raw = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise BundleError(f"{path / MANIFEST} is not valid JSON: {exc}") from None
        if isinstance(raw, dict) and raw.get("schema_version") not in SCHEMA_VERSIONS:
            Manifest.parse(raw, str(path / MANIFEST))  # the version error says how to fix it
        actual = _check_own_digest(path, data)
        _check_pin(path, actual, digest)
        bundle = cls(path, Manifest.parse(raw, str(path / MANIFEST)), actual)
        if verify_hashes:
            bundle.verify_files()
        return bundle

    def check_pin(self, digest: str | None) -> Bundle:
        """This bundle, refused unless it is the pinned `digest` (None: any), as `load` refuses."""
        _check_pin(self.path, self.digest, check_digest_option(digest))
        return self

    def manifest_json(self) -> dict[str, Any]:
        """The manifest as JSON (for display: `inspect --json`); readers use `manifest`."""
        return json.loads((self.path / MANIFEST).read_bytes())

    def verify_files(self) -> None:
        for name, digest in self.manifest.files.items():
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
        return self.manifest.architecture

    @property
    def model(self) -> ModelSpec:
        return self.manifest.model

    @property
    def loop(self) -> tuple[int, int] | None:
        return self.manifest.loop

    @property
    def plan_names(self) -> list[str]:
        return list(self.manifest.plans)

    @property
    def default_plan(self) -> str:
        """The plan a request without one gets: the first ILF plan (what this toolchain is for),
        else the first plan. The one place every command and server takes it from."""
        return next((p for p in self.plan_names if p.startswith("ilf")), self.plan_names[0])

    def tokenizer(self, spec: TokenizerSpec | None = None) -> Any:
        """The bundle's `tokenizers.Tokenizer` as saved (truncation and padding as in its file),
        or a one-line BundleError when the file does not parse; `spec`: one of `tokenizers`."""
        from tokenizers import Tokenizer

        spec = spec or self.manifest.tokenizer
        if spec is None:
            raise ConfigError("this bundle has no tokenizer (class-conditional model); pass --class-label")
        try:
            return Tokenizer.from_file(str(self.path / spec.file))
        except Exception as exc:  # tokenizers raises its own Exception for a malformed file
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BundleError(
                f"cannot load the tokenizer {self.path / spec.file}: {reason}; rebuild the bundle"
            ) from None

    def plan(self, name: str) -> StepPlan:
        """A bundled plan by name. Plan specs (auto, files, presets) are backends.plans' to resolve."""
        if name not in self.manifest.plans:
            raise BundleError(f"plan {name!r} is not in this bundle (it has: {', '.join(self.plan_names)})")
        plan = StepPlan.load(self.path / self.manifest.plans[name])
        missing = sorted(set(plan.cut_points) - set(self.manifest.cut_points))
        if missing:
            raise BundleError(
                f"plan {plan.name!r} cuts the model at block(s) {missing} where this bundle has no segment "
                "boundary; rebuild the bundle with the plan in --plans"
            )
        return plan

    @property
    def variants(self) -> list[str]:
        """Extra precisions added after the build (e.g. quantized segments), by name."""
        return list(self.manifest.variants)

    def segment_spec(self, name: str, variant: str | None = None) -> SegmentSpec:
        """A segment's manifest entry; a variant overrides the segments it has replaced."""
        return self.manifest.segment(name, variant)

    def variant_spec(self, name: str) -> VariantSpec:
        return self.manifest.variant(name)

    def segment_path(self, name: str, variant: str | None = None) -> Path:
        return self.path / self.segment_spec(name, variant).file

    def positions(self, latent_height: int, latent_width: int) -> np.ndarray:
        path = self.path / "positions" / f"{latent_height}x{latent_width}.npy"
        if not path.is_file():
            sizes = ", ".join(f"{h}x{w}" for h, w in self.manifest.resolutions)
            raise BundleError(
                f"the bundle was not built for {latent_height * self.model.vae_scale_factor}x"
                f"{latent_width * self.model.vae_scale_factor} images (it has: {sizes})"
            )
        return np.load(path)
