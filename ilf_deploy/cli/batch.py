"""`batch` (many images: here or on Ray actors) and `export-kuberay` (the same on Kubernetes)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ilf_deploy.cli import command, console, progress
from ilf_deploy.cli.cluster import Image, Namespace, NodeSelector, PodMonitor, Tolerations, cluster
from ilf_deploy.cli.options import Backend, BundleDir, Digest, Variant, load_bundle
from ilf_deploy.cli.paths import output_dir
from ilf_deploy.serving.scale.options import AUTO_ROWS_PER_TASK, TASKS_PER_ACTOR
from ilf_deploy.serving.triton.k8s import CLAIM

ROWS_HELP = (
    "One request per line, a JSON object: prompt (or class_label), seed (default 0, as `generate`), "
    "and optionally plan, guidance_scale, negative_prompt, size (WIDTHxHEIGHT)."
)
ADDRESS_HELP = "Run on this Ray cluster (`auto`: the one this machine belongs to); default: this machine."
ACTORS_HELP = (
    "Workers: processes here (default 1: one engine already uses every core), or Ray actors "
    "(default: the cluster's CPUs / --actor-cpus)."
)
BUNDLE_PATH_HELP = (
    "The bundle's path on the claim (default: its directory name; NAME/1/bundle in an export-triton "
    "repository)."
)
SHIP_HELP = (
    "Ray: copy the bundle to the nodes through the object store (default: the same path on every node)."
)
# `serve --server ray`'s options (cli/serve.py)
RayAddress = Annotated[
    str | None, typer.Option(help="--server ray: the Ray cluster (default auto: the one this machine is in).")
]
Replicas = Annotated[int | None, typer.Option(help="--server ray: Ray Serve replicas (default 1).")]
Autoscale = Annotated[
    str | None,
    typer.Option(metavar="MIN:MAX", help="--server ray: Ray Serve's autoscaler, MIN..MAX replicas."),
]
ReplicaCpus = Annotated[float | None, typer.Option(help="--server ray: CPUs per replica (default 1).")]
ShipBundle = Annotated[bool, typer.Option("--ship-bundle", help=SHIP_HELP)]


def started(bar, task, total: int, workers: str) -> None:
    """The batch's first line: how many rows, made by whom (so a one-actor cluster run is seen)."""
    bar.console.print(f"batch: {total} rows to make on {workers}", highlight=False)
    bar.update(task, total=total)


@command("batch")
def batch(
    bundle: BundleDir,
    prompts: Annotated[Path, typer.Option(help=ROWS_HELP)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output: images/<index>.png, results.jsonl.")],
    plan: Annotated[
        str | None, typer.Option(help="Plan for lines without one (any plan spec; default: first ILF plan).")
    ] = None,
    backend: Backend = None,
    variant: Variant = None,
    ray_address: Annotated[str | None, typer.Option(help=ADDRESS_HELP)] = None,
    actors: Annotated[int | None, typer.Option(help=ACTORS_HELP, show_default=False)] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            help=f"Rows per task handed to a worker (default: up to {AUTO_ROWS_PER_TASK}, "
            f"{TASKS_PER_ACTOR} tasks an actor at least)."
        ),
    ] = None,
    actor_cpus: Annotated[float, typer.Option(help="Ray CPUs per actor (whole CPUs are safest).")] = 1.0,
    ship_bundle: ShipBundle = False,
    digest: Digest = None,
) -> None:
    """Generate one image per request line into a resumable directory (a re-run skips rows done).

    Each image is the one `ilf-deploy generate` makes from the same fields, bit for bit; a refused or
    failed line gets an error row and the others go on."""
    from ilf_deploy.serving.scale.batch import run_batch
    from ilf_deploy.serving.scale.options import BatchOptions

    output_dir(out, "--out", force=False, files=())  # no --force: a re-run resumes (docs/cli-guide.md)
    options = BatchOptions(
        bundle, prompts, out, plan, backend, variant, digest, ray_address, actors, batch_size, actor_cpus,
        ship_bundle,
    )  # fmt: skip
    with progress(eta=True) as bar:
        task = bar.add_task("batch", total=None)
        summary = run_batch(
            options,
            on_start=lambda total, workers: started(bar, task, total, workers),
            on_row=lambda: bar.advance(task),
        )
    console.print(summary.line(out), highlight=False)
    if summary.images == 0 and summary.refused + summary.failed:  # nothing made: a script must see it
        raise typer.Exit(1)


def ray_options(server: str, address, replicas, autoscale, replica_cpus, ship: bool) -> dict:
    """`serve`'s Ray options, refused for the other servers rather than ignored."""
    from ilf_deploy.core.errors import ConfigError

    given = {
        "ray_address": address,
        "replicas": replicas,
        "autoscale": autoscale,
        "replica_cpus": replica_cpus,
    }
    if server != "ray" and (ship or any(value is not None for value in given.values())):
        flags = "--ray-address, --replicas, --autoscale, --replica-cpus and --ship-bundle"
        raise ConfigError(f"{flags} need --server ray")
    return {**given, "ship_bundle": ship}


def _ray_serve_options(ray: dict, logs: tuple[str, str]):
    from ilf_deploy.serving.scale.options import RayServeOptions, parse_autoscale

    return RayServeOptions(
        replicas=1 if ray["replicas"] is None else ray["replicas"],
        autoscale=parse_autoscale(ray["autoscale"]),
        replica_cpus=1.0 if ray["replica_cpus"] is None else ray["replica_cpus"],
        ship=ray["ship_bundle"],
        logs=logs,
    )


def serve_on_ray(
    bundle: Path,
    options,
    listen: tuple,
    require_auth: bool,
    logs: tuple[str, str],
    ray: dict,
    unused: list[str],
) -> None:
    """`serve --server ray`: deploy on the cluster, serve until Ctrl-C or SIGTERM, then delete the
    application. `listen`: (host, port, TLS files) of Ray Serve's proxies; `ray`: `ray_options`."""
    import signal
    import time

    from rich.markup import escape

    from ilf_deploy.core.errors import ConfigError
    from ilf_deploy.serving.scale.serve import deploy, undeploy
    from ilf_deploy.serving.serve.auth import check_exposure

    unused = [name for name in unused if name != "body_timeout_s"]  # the replicas' app keeps that one
    if unused:
        flags = ", ".join("--" + name.replace("_", "-") for name in unused)
        raise ConfigError(
            f"{flags}: --server ray's connections are Ray Serve's proxy's, which has no such limit"
        )
    host, port, tls = listen
    http = {"host": host, "port": port, **{k: v for k, v in tls.items() if v is not None}}
    warning = check_exposure(host, options.api_keys, require_auth, "ssl_keyfile" in http)
    if warning:
        console.print(f"[yellow]warning:[/yellow] {escape(warning)}")
    ray_options = _ray_serve_options(ray, logs)
    address = ray["ray_address"] or "auto"
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # SIGTERM as Ctrl-C: delete the app
    digest = deploy(str(bundle), options, ray_options, address, http)
    # again: ray.init (in deploy) installs its own SIGTERM handler, which logs a stack trace and
    # aborts (exit -6) after ours ran; ours alone deletes the app (the replicas drain) and exits 0
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    how = "shipped to the nodes" if ray_options.ship else "a shared path"
    low_high = ray_options.autoscale
    scale = f"{low_high[0]}..{low_high[1]}" if low_high else ray_options.replicas
    console.print(
        f"serving {bundle} ({digest}, {how}) on http://{host}:{port} with {scale} Ray Serve replica(s) "
        f"on {address}; Ctrl-C stops it",
        highlight=False,
        soft_wrap=True,
    )
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        undeploy()
        console.print("stopped: the application was deleted")


@command("export-kuberay")
def export_kuberay(
    bundle: BundleDir,
    out: Annotated[Path, typer.Option("--out", "-o", help="Directory for rayservice.yaml and rayjob.yaml.")],
    name: Annotated[str, typer.Option(help="Name of the RayService (the RayJob is NAME-batch).")] = "ilf",
    claim: Annotated[str, typer.Option(help="PersistentVolumeClaim holding the bundle.")] = CLAIM,
    bundle_path: Annotated[str | None, typer.Option(help=BUNDLE_PATH_HELP)] = None,
    image: Image = None,
    namespace: Namespace = "default",
    toleration: Tolerations = None,
    node_selector: NodeSelector = None,
    pod_monitor: PodMonitor = False,
    workers: Annotated[int, typer.Option(help="Ray worker pods (the autoscaler's minimum).")] = 2,
    max_workers: Annotated[
        int | None, typer.Option(help="Let KubeRay's autoscaler add pods up to this many.")
    ] = None,
    worker_cpus: Annotated[int, typer.Option(help="CPUs per worker pod.")] = 2,
    gpu: Annotated[bool, typer.Option("--gpu", help="One NVIDIA GPU per worker pod.")] = False,
    replicas: Annotated[int, typer.Option(help="Ray Serve replicas (RayService).")] = 1,
    autoscale: Annotated[
        str | None, typer.Option(metavar="MIN:MAX", help="Ray Serve's autoscaler instead of --replicas.")
    ] = None,
    backend: Backend = None,
    api_key_secret: Annotated[
        str | None, typer.Option(help="A Secret whose ILF_API_KEYS key holds serve's API keys.")
    ] = None,
    data_claim: Annotated[
        str, typer.Option(help="RayJob: the claim with prompts.jsonl; results go to results/ there.")
    ] = "ilf-batch-data",
    actors: Annotated[int, typer.Option(help="RayJob: Ray actors of the batch.")] = 2,
    digest: Digest = None,
    force: Annotated[bool, typer.Option(help="Replace manifests already in --out.")] = False,
) -> None:
    """Write KubeRay manifests: a RayService (`serve --server ray`) and a RayJob (`batch` on Ray actors)
    over the bundle on a PersistentVolumeClaim, its digest pinned and checked in every pod."""
    from ilf_deploy.core.errors import check_at_least
    from ilf_deploy.engines.backends import get_backend
    from ilf_deploy.engines.backends.auto import AUTO
    from ilf_deploy.serving.scale.kuberay import KubeRay, write_manifests
    from ilf_deploy.serving.scale.options import parse_autoscale

    output_dir(out, "--out", force=force, files=())  # write_manifests checks the files it writes
    if backend not in (None, AUTO):
        get_backend(backend)  # an unknown engine is refused here, as by every other command
    loaded = load_bundle(bundle, digest)  # every file's hash: the digest must be worth pinning
    for flag, value in [("--workers", workers), ("--replicas", replicas), ("--actors", actors)]:
        check_at_least(flag, value)
    check_at_least("--worker-cpus", worker_cpus)
    check_at_least("--max-workers", max_workers, workers)  # at least --workers
    spec = KubeRay(
        name=name, bundle=bundle_path or loaded.path.resolve().name, digest=loaded.digest, claim=claim,
        image=image, cluster=cluster(namespace, toleration, node_selector, pod_monitor),
        workers=workers, max_workers=max_workers, worker_cpus=worker_cpus, gpu=gpu,
        replicas=replicas, autoscale=parse_autoscale(autoscale), backend=backend or "auto",
        api_key_secret=api_key_secret, data_claim=data_claim, actors=actors,
    )  # fmt: skip
    for path in write_manifests(out, spec, force):
        console.print(f"wrote {path}", highlight=False)
