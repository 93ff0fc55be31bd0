"""How a bundle reaches Ray's nodes.

- A **shared path** (the default): the same directory on every node (NFS, a Kubernetes volume, or
  one machine). Each worker opens it there.
- **Shipped** (`--ship-bundle`): the driver puts the bundle's files (the manifest, its digest and
  every file the manifest lists, nothing else) into Ray's object store; each node writes them once
  into a cache directory named by the digest (`$ILF_BUNDLE_CACHE`, default
  `$TMPDIR/ilf-deploy-bundles`; renamed into place only when complete), and its workers open that
  copy. The objects belong to the driver: shipping lasts as long as the `batch` or `serve` command.

Either way a worker opens the bundle with the digest pinned and checks every file's sha256
(`open_generator(..., digest=...)`), so a node with another bundle at the path, or a damaged copy,
refuses to run.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.files import DestinationExists, staged_directory
from ilf_deploy.core.runtime.bundle import DIGEST_FILE, MANIFEST, Bundle, BundleError

CACHE_ENV = "ILF_BUNDLE_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "ilf-deploy-bundles")


@dataclass(frozen=True)
class SharedPath:
    """The bundle is at `path` on every node."""

    path: str
    how = "shared path"

    def materialize(self) -> Path:
        path = Path(self.path)
        if not (path / MANIFEST).is_file():
            raise ConfigError(
                f"{path} is not a bundle on node {socket.gethostname()}: give every node the same path "
                "(a shared volume) or ship it with --ship-bundle"
            )
        return path


@dataclass(frozen=True)
class Shipped:
    """The bundle's files in Ray's object store: (path inside the bundle, object ref) pairs."""

    name: str
    digest: str
    files: tuple[tuple[str, Any], ...]
    how = "shipped through Ray's object store"

    def materialize(self) -> Path:
        """This node's copy, written on first use (by whichever worker of the node comes first)."""
        root = cache_root()
        final = root / self.digest.removeprefix("sha256:")
        target = final / self.name
        if self._complete(target):
            return target
        import ray

        root.mkdir(parents=True, exist_ok=True)
        try:
            # a copy already there is replaced only when it is not complete (damaged, an older one)
            with staged_directory(
                final, replace=lambda there: not self._complete(there / self.name)
            ) as staged:
                for relative, ref in self.files:
                    path = staged / self.name / relative
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(ray.get(ref))
        except DestinationExists:
            pass  # another worker of this node renamed its complete copy in first: use it
        return target

    def _complete(self, target: Path) -> bool:
        """A copy renamed into place whole, of this digest (its files' hashes: checked on open)."""
        try:
            Bundle.load(target, verify_hashes=False, digest=self.digest)
        except BundleError:
            return False
        return True


def bundle_files(bundle: Bundle) -> list[str]:
    """Everything a bundle is: its manifest, its digest, and every file the manifest lists."""
    return [MANIFEST, DIGEST_FILE, *sorted(bundle.manifest.files)]


def ship(bundle: Bundle) -> Shipped:
    """Put the bundle's files into the object store (call after `ray.init`)."""
    import ray

    refs = tuple((name, ray.put((bundle.path / name).read_bytes())) for name in bundle_files(bundle))
    return Shipped(bundle.path.resolve().name, bundle.digest, refs)


def source(bundle: Bundle, shipped: bool) -> SharedPath | Shipped:
    return ship(bundle) if shipped else SharedPath(str(bundle.path.resolve()))
