"""The options of a batch (shared by its local and Ray runners) and of `serve --server ray`."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ilf_deploy.core.errors import ConfigError, check_at_least

# A Ray task costs about 0.5 ms of its own (the next one is already queued on the actor: ray_batch.py;
# it was 8-12 ms on Ray Data), measured on the tiny bundle (10 ms an image; benchmarks/README.md
# `batch`): 16 rows a task make it 0.03 ms a row. Not more: the driver writes a task's rows when it
# ends, and 16 images of the PixArt-XL config (40 s each) already take 10 min.
AUTO_ROWS_PER_TASK = 16
TASKS_PER_ACTOR = 4


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
    actors: int | None = None  # workers: processes here, or Ray actors; None: `with_actors`
    batch_size: int | None = None  # rows per task handed to a worker; None: rows_per_task decides
    actor_cpus: float = 1.0  # Ray's CPUs per actor
    ship: bool = False  # Ray: copy the bundle to the nodes through the object store

    def check(self) -> None:
        check_at_least("--actors", self.actors)
        check_at_least("--batch-size", self.batch_size)
        if not self.actor_cpus > 0:
            raise ConfigError(f"--actor-cpus must be > 0, got {self.actor_cpus}")
        if self.ship and self.ray_address is None:
            raise ConfigError("--ship-bundle is for Ray (--ray-address); here the bundle is already local")

    def with_actors(self, cluster_cpus: float | None) -> BatchOptions:
        """The options with `actors` decided: as given, else one here (this process's engine already
        uses every core) and, on Ray, as many as the cluster's CPUs hold at `actor_cpus` each."""
        if self.actors is not None:
            return self
        if cluster_cpus is None:
            return replace(self, actors=1)
        return replace(self, actors=max(1, int(cluster_cpus // self.actor_cpus)))

    def rows_per_task(self, rows: int) -> int:
        """--batch-size, else as many rows a task as keeps TASKS_PER_ACTOR tasks for every actor (so
        the last tasks still spread over them), at most AUTO_ROWS_PER_TASK: a Ray task costs about
        0.5 ms of its own (docs/scale.md, "Cost"), which 16 rows make small beside even a 10 ms
        image, and which a task of one image that takes seconds does not notice."""
        if self.batch_size is not None:
            return self.batch_size
        return max(1, min(AUTO_ROWS_PER_TASK, rows // (TASKS_PER_ACTOR * (self.actors or 1))))

    def tasks(self, jobs: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
        """`jobs` cut into the tasks handed to the workers, `rows_per_task` rows each."""
        size = self.rows_per_task(len(jobs))
        return [jobs[start : start + size] for start in range(0, len(jobs), size)]


@dataclass(frozen=True)
class RayServeOptions:
    replicas: int = 1
    autoscale: tuple[int, int] | None = None  # (min, max) replicas: Ray Serve's autoscaler
    replica_cpus: float = 1.0
    ship: bool = False  # the bundle through the object store (default: a shared path)
    logs: tuple[str, str] = ("human", "info")  # the replicas' --log-format and --log-level

    def check(self) -> None:
        check_at_least("--replicas", self.replicas)
        if self.autoscale is not None:
            parse_autoscale(f"{self.autoscale[0]}:{self.autoscale[1]}")
        if not self.replica_cpus > 0:
            raise ConfigError(f"--replica-cpus must be > 0, got {self.replica_cpus}")


def parse_autoscale(text: str | None) -> tuple[int, int] | None:
    """`--autoscale MIN:MAX`: Ray Serve's autoscaler keeps MIN..MAX replicas (0 <= MIN <= MAX, MAX >= 1)."""
    if text is None:
        return None
    try:
        low, high = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"--autoscale must be MIN:MAX (e.g. 1:4), got {text!r}") from None
    if not (0 <= low <= high and high >= 1):
        raise ConfigError(f"--autoscale MIN:MAX needs 0 <= MIN <= MAX and MAX >= 1, got {text!r}")
    return low, high
