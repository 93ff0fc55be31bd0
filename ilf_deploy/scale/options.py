"""The options of a batch, shared by its local and Ray runners."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import ConfigError


@dataclass(frozen=True)
class BatchOptions:
    bundle: Path
    prompts: Path
    out: Path
    plan: str | None = None  # for lines without one (default: the bundle's first ILF plan)
    backend: str | None = None  # None: auto, as `generate`
    variant: str | None = None
    digest: str | None = None  # pin the bundle; None: the driver's bundle, pinned for every worker
    ray_address: str | None = None  # None: this machine
    actors: int = 1  # workers: processes here, or Ray Data actors
    batch_size: int = 1  # rows per task handed to a worker
    actor_cpus: float = 1.0  # Ray's CPUs per actor
    ship: bool = False  # Ray: copy the bundle to the nodes through the object store

    def check(self) -> None:
        if self.actors < 1:
            raise ConfigError(f"--actors must be >= 1, got {self.actors}")
        if self.batch_size < 1:
            raise ConfigError(f"--batch-size must be >= 1, got {self.batch_size}")
        if not self.actor_cpus > 0:
            raise ConfigError(f"--actor-cpus must be > 0, got {self.actor_cpus}")
        if self.ship and self.ray_address is None:
            raise ConfigError("--ship-bundle is for Ray (--ray-address); here the bundle is already local")
