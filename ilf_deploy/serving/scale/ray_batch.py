"""`batch --ray-address`: the rows on a pool of Ray actors; the driver writes what comes back.

Each actor opens the bundle once (a shared path, or shipped: ship.py) with the driver's digest pinned,
then makes the images of the rows it is handed, one at a time, as `generate` does (worker.py). Actors
are spread over the nodes (`SPREAD`) and take `--actor-cpus` CPUs each. The driver hands each actor a
task of `rows_per_task` rows and keeps TASKS_IN_FLIGHT of them queued on it, so an actor never waits
for its next rows; it then blocks in `ray.wait` until a task ends: no polling beside the engines.
Ray restarts an actor lost with its node (elsewhere, where CPUs are free) and re-runs the tasks it
had in flight there (`max_restarts`, `max_task_retries`); the driver writes each index once whatever
comes back twice. Rows are handed out once every actor's constructor has run: one that cannot open
the bundle fails the batch at once, in one line (its error), not after Ray's retries, each of which
prints a traceback on the driver's terminal.

Plain actors, not Ray Data: Ray Data's executor polls its tasks (100 Hz) and runs three helper actors
beside a batch, 4 % of a core in all while one image of the PixArt-XL config takes 40 s, which on a
2-core node made an image 2-3 % slower than locally (benchmarks/README.md, `batch`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.serving.scale.cluster import cause, connect
from ilf_deploy.serving.scale.options import BatchOptions
from ilf_deploy.serving.scale.ship import SharedPath, Shipped, source
from ilf_deploy.serving.scale.worker import BatchWorker, Outcome

TASKS_IN_FLIGHT = 2  # per actor: the one it runs and the next, already there when it ends


class BatchActor:
    """A Ray actor: the bundle opened once, then the rows of each task it is handed."""

    def __init__(
        self,
        bundle: SharedPath | Shipped,
        backend: str | None,
        variant: str | None,
        digest: str,
        plans: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.worker = BatchWorker(bundle.materialize(), backend, variant, digest, plans=plans)

    def run_many(self, works: list[dict[str, Any]]) -> list[Outcome]:
        return self.worker.run_many(works)


def cluster_cpus(address: str) -> float:
    """The CPUs of the cluster at `address` (joined): what the default actor pool is sized from."""
    ray = connect(address)
    return float(ray.cluster_resources().get("CPU", 1.0))


def run_on_ray(
    options: BatchOptions,
    jobs: list[dict[str, Any]],
    bundle: Bundle,
    plans: dict[str, dict[str, Any]] | None = None,
) -> Iterator[Outcome]:
    """The outcomes of `jobs` as they finish, made by actors that refuse any bundle but the driver's
    (`bundle`: the one its engine was opened from, hashes and pin checked), running the driver's
    resolved `plans` (by spec: an `auto` or a preset is the driver's plan on every node)."""
    if not jobs:
        return
    ray = connect(options.ray_address or "auto")
    actor_class = ray.remote(BatchActor).options(
        num_cpus=options.actor_cpus, max_restarts=-1, max_task_retries=-1, scheduling_strategy="SPREAD"
    )
    arguments = (source(bundle, options.ship), options.backend, options.variant, bundle.digest, plans)
    actors = [actor_class.remote(*arguments) for _ in range(options.actors or 1)]
    tasks = deque(options.tasks(jobs))
    running: dict[Any, Any] = {}  # a task's result (ObjectRef) -> the actor it runs on

    def hand(actor: Any) -> None:
        if tasks:
            running[actor.run_many.remote(tasks.popleft())] = actor

    try:
        # every actor's constructor first, as Ray Data did: rows spread over all of them from the start
        opening = [actor.__ray_ready__.options(max_task_retries=0).remote() for actor in actors]
        while opening:
            (done,), opening = ray.wait(opening, num_returns=1)
            ray.get(done)  # raises what the constructor raised
        for _ in range(TASKS_IN_FLIGHT):
            for actor in actors:
                hand(actor)
        while running:
            (done,), _ = ray.wait(list(running), num_returns=1)
            hand(running.pop(done))
            yield from ray.get(done)
    except ray.exceptions.RayError as exc:
        raise ConfigError(f"the Ray batch failed: {cause(exc)}") from None
    # the actors end with their handles, when this generator does
