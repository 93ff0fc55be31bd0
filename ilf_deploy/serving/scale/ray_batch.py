"""`batch --ray-address`: the rows on a Ray Data actor pool; the driver writes what comes back.

Each actor opens the bundle once (a shared path, or shipped: ship.py) with the driver's digest pinned,
then makes the images of the rows it is handed, one at a time, as `generate` does (worker.py). Actors
are spread over the nodes (`SPREAD`) and take whole CPUs by default: fractional-CPU actors can leave
no CPU for Ray Data's own tasks. Ray Data restarts an actor lost with its node and re-runs the rows it
had in flight; the driver writes each index once whatever comes back twice.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.serving.scale.cluster import cause, connect
from ilf_deploy.serving.scale.options import BatchOptions
from ilf_deploy.serving.scale.ship import SharedPath, Shipped, source
from ilf_deploy.serving.scale.worker import BatchWorker, Outcome

MAX_BLOCKS = 2000  # Ray Data blocks the rows are cut into (each is one actor task)


class BatchActor:
    """A Ray Data callable class: one per actor, so the bundle is opened once per actor."""

    def __init__(
        self,
        bundle: SharedPath | Shipped,
        backend: str | None,
        variant: str | None,
        digest: str,
        plans: dict[str, dict[str, Any]] | None = None,
    ) -> None:
        self.worker = BatchWorker(bundle.materialize(), backend, variant, digest, plans=plans)

    def __call__(self, batch: dict[str, Any]) -> dict[str, list]:
        outcomes = self.worker.run_many([json.loads(work) for work in batch["job"]])
        return {
            "result": [json.dumps(result) for result, _ in outcomes],
            "png": [png or b"" for _, png in outcomes],
        }


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
    connect(options.ray_address or "auto")
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    # actors go over the nodes: Ray Data's default scheduling, SPREAD (setting it warns in Ray 2.60)
    # Every 30 s Ray Data warned that an actor uses GBs beside a 0 B memory request (its engine's
    # weights, by design), advising a `memory=` that `batch` has no option for: a wall of text per
    # half minute of a batch that hours of rows do not need. Actors are sized by CPUs (--actor-cpus).
    context.issue_detectors_config.high_memory_detector_config.detection_time_interval_s = -1
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "progress bars disabled"
    items = [{"job": json.dumps(work)} for work in jobs]
    rows_per_task = options.rows_per_task(len(items))
    blocks = min(MAX_BLOCKS, -(-len(items) // rows_per_task))
    dataset = ray.data.from_items(items, override_num_blocks=blocks).map_batches(
        BatchActor,
        fn_constructor_kwargs={
            "bundle": source(bundle, options.ship),
            "backend": options.backend,
            "variant": options.variant,
            "digest": bundle.digest,
            "plans": plans,
        },
        batch_size=rows_per_task,
        compute=ray.data.ActorPoolStrategy(size=options.actors),
        num_cpus=options.actor_cpus,
    )
    try:
        for item in dataset.iter_rows():
            png = bytes(item["png"])
            yield json.loads(item["result"]), png or None
    except ray.exceptions.RayError as exc:
        raise ConfigError(f"the Ray batch failed: {cause(exc)}") from None
