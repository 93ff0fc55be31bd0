"""`ilf-deploy batch`: one image per request line, into a resumable output directory.

The driver (this process) opens the bundle (its hashes, and the pinned digest if any), checks every
line with the one request contract (`core/runtime/request.py`: a refused line gets the message `serve`'s
400 would carry), writes refused lines as error rows at once and hands the rest to workers: this
process, a local process pool (`--actors N`), or a pool of Ray actors (`--ray-address`; ray_batch.py).
Workers get the bundle's digest (the one given, else the driver's) and refuse any other bundle. Every
row is written by the driver, once (rows/Results).
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Generator
from ilf_deploy.core.runtime.request import RequestContract, RequestError
from ilf_deploy.engines.backends.plans import PlanBook
from ilf_deploy.serving.scale.options import BatchOptions
from ilf_deploy.serving.scale.rows import Line, Results, image_name, read_prompts, row
from ilf_deploy.serving.scale.worker import BatchWorker, Outcome, job


@dataclass
class Summary:
    rows: int = 0  # request lines in the file
    before: int = 0  # rows an earlier run wrote
    images: int = 0
    refused: int = 0
    failed: int = 0
    seconds: float = 0.0

    def line(self, out: Path) -> str:
        earlier = f", {self.before} from an earlier run" if self.before else ""
        return (
            f"{self.rows} rows{earlier}: {self.images} images, {self.refused} refused, {self.failed} failed "
            f"in {self.seconds:.1f} s -> {out / 'results.jsonl'}"
        )


@dataclass
class Prepared:
    """The driver's side of a batch: the engine it checked with, the work left, the open results."""

    options: BatchOptions
    generator: Generator  # its bundle is the one the driver checked (hashes, pin): workers pin its digest
    results: Results
    jobs: list[dict[str, Any]]
    summary: Summary
    book: PlanBook  # the plans the jobs name, resolved by the driver

    @property
    def plans(self) -> dict[str, dict[str, Any]]:
        """Each plan the jobs name, as data for the workers: they run the driver's plans."""
        return {spec: self.book[spec].to_dict() for spec in {work["plan"] for work in self.jobs}}

    @property
    def bundle(self) -> Bundle:
        return self.generator.opened_bundle()

    @property
    def digest(self) -> str:
        return self.bundle.digest


def contract_for(bundle: Bundle, generator: Generator, book: PlanBook) -> RequestContract:
    """The request contract, its plans `book`'s: a row's `plan` is any spec the resolver takes."""
    return RequestContract.for_bundle(bundle, generator, 1, book.default, book.check)


def check_line(contract: RequestContract, line: Line) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(the job, None) for an accepted line, (None, its error row) for a refused one. A line without a
    seed gets 0, as `generate` does."""
    if line.fields is None:
        return None, row(line.index, error=line.error)
    fields = dict(line.fields)
    if fields.get("seed") is None:
        fields["seed"] = 0
    try:
        checked = contract.check(fields)
    except RequestError as exc:  # the message of serve's 400 (its `param` is in the text's start)
        return None, row(line.index, error=exc.message)
    assert checked.plan is not None
    return job(line.index, checked.plan, checked.requests[0]), None


def prepare(options: BatchOptions) -> Prepared:
    """Open the bundle, read and check every line, open the output; refused lines are written now."""
    from ilf_deploy.engines.backends import open_generator
    from ilf_deploy.engines.backends.auto import AUTO

    options.check()
    if options.ray_address is not None:  # before the output directory is made
        from ilf_deploy.serving.scale.cluster import check_reachable

        check_reachable(options.ray_address)
    generator = open_generator(
        options.bundle, options.backend or AUTO, variant=options.variant, digest=options.digest
    )
    bundle = generator.opened_bundle()  # checked (hashes, pin) by the load that opened it
    book = PlanBook(bundle, options.plan, "--plan", files=True)  # a bad --plan: one line, before any output
    contract = contract_for(bundle, generator, book)
    lines, prompts_digest = read_prompts(options.prompts)
    identity = {
        "prompts": prompts_digest,
        "bundle": bundle.digest,
        "plan": contract.default_plan,
        "backend": options.backend or AUTO,
        "variant": options.variant,
    }
    results = Results.open(options.out, identity)
    summary = Summary(rows=len(lines), before=sum(line.index in results.done for line in lines))
    jobs = []
    for line in lines:
        if line.index in results.done:
            continue
        work, refused = check_line(contract, line)
        if refused is not None:
            results.write(refused)
            summary.refused += 1
        else:
            jobs.append(work)
    return Prepared(options, generator, results, jobs, summary, book)


def run_local(prepared: Prepared) -> Iterator[Outcome]:
    """This process (one actor: the driver's own engine), or a pool of spawned processes."""
    options = prepared.options
    assert options.actors is not None  # decided by run_batch (BatchOptions.with_actors)
    plans = prepared.plans
    if options.actors == 1:
        worker = BatchWorker(options.bundle, None, None, prepared.digest, prepared.generator, plans)
        for work in prepared.jobs:
            yield worker.run(work)
        return
    args = (str(options.bundle), options.backend, options.variant, prepared.digest, plans)
    context = multiprocessing.get_context("spawn")  # no engine state forked from the driver
    with ProcessPoolExecutor(options.actors, context, initializer=_pool_open, initargs=args) as pool:
        futures = [pool.submit(_pool_run, works) for works in options.tasks(prepared.jobs)]
        for future in as_completed(futures):
            yield from future.result()


_POOL_WORKER: BatchWorker | None = None


def _pool_open(
    bundle: str, backend: str | None, variant: str | None, digest: str, plans: dict[str, dict[str, Any]]
) -> None:
    global _POOL_WORKER
    _POOL_WORKER = BatchWorker(bundle, backend, variant, digest, plans=plans)


def _pool_run(works: list[dict[str, Any]]) -> list[Outcome]:
    assert _POOL_WORKER is not None
    return _POOL_WORKER.run_many(works)


def record(prepared: Prepared, outcomes: Iterable[Outcome], on_row: Callable[[], None]) -> None:
    """Write each finished row (once: a repeated index, e.g. from a retried task, is dropped)."""
    requests = {work["index"]: {"plan": work["plan"], **work["request"]} for work in prepared.jobs}
    summary = prepared.summary
    for result, png in outcomes:
        index = result["index"]
        values = row(index, request=requests[index], **{k: v for k, v in result.items() if k != "index"})
        if png is not None:
            values["file"] = image_name(index)
        if prepared.results.write(values, png):
            summary.failed += png is None
            summary.images += png is not None
            on_row()


def run_batch(
    options: BatchOptions,
    on_start: Callable[[int, str], None] | None = None,
    on_row: Callable[[], None] | None = None,
) -> Summary:
    """Run the batch; `on_start(rows to make, who makes them)` once, then `on_row()` after each row
    written."""
    started = time.perf_counter()
    prepared = prepare(options)
    try:
        if options.ray_address is None:
            prepared.options = options = options.with_actors(None)
            workers = "this process" if options.actors == 1 else f"{options.actors} local processes"
            outcomes = run_local(prepared)
        else:
            from ilf_deploy.serving.scale.ray_batch import cluster_cpus, run_on_ray

            cpus = cluster_cpus(options.ray_address)
            prepared.options = options = options.with_actors(cpus)
            workers = f"{options.actors} Ray actors ({cpus:g} cluster CPUs, {options.actor_cpus:g} each)"
            outcomes = run_on_ray(options, prepared.jobs, prepared.bundle, prepared.plans)
        if on_start is not None:
            on_start(len(prepared.jobs), workers)
        record(prepared, outcomes, on_row or (lambda: None))
    finally:
        prepared.results.close()
    prepared.summary.seconds = time.perf_counter() - started
    return prepared.summary
