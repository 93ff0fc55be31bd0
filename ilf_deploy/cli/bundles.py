"""`build`, `inspect`, `verify` and `bench`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ilf_deploy.cli import command, console, finish_checks, out, progress
from ilf_deploy.cli.generate import announce, say
from ilf_deploy.cli.options import VARIANT_HELP, ChecksJson, Digest, Force, backend_help, load_bundle
from ilf_deploy.cli.paths import image_suffixes, output_file, refuse_existing
from ilf_deploy.cli.sizes import parse_resolutions, split_list
from ilf_deploy.cli.tables import bench_table, bundle_tables, checks_table, stage_table
from ilf_deploy.core.errors import ConfigError, check_at_least
from ilf_deploy.core.files import write_report
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.core.runtime.request import RequestError

# -- bundles ---------------------------------------------------------------------------------
EXPORTER_HELP = (
    "ONNX exporter: auto (TorchScript for PixArt/DiT: same bundle, 5x faster; torch.export for SD3, "
    "Flux, Sana), dynamo (torch.export for every family) or torchscript (PixArt/DiT only)."
)


@command()
def build(
    model: Annotated[str, typer.Argument(help="Diffusers pipeline directory (+ feedback/) or hub id.")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Bundle directory to create.")],
    plans: Annotated[
        str,
        typer.Option(
            help="Comma-separated plans to bundle (presets or JSON files); they decide the segments."
        ),
    ] = "base-20,ilf-10,cache-20",
    precision: Annotated[str, typer.Option(help="fp32 or fp16 for the transformer segments.")] = "fp32",
    max_batch: Annotated[
        int, typer.Option(help="Most images per engine call (guidance doubles the batch).")
    ] = 1,
    height: Annotated[int | None, typer.Option(help="Image height in pixels (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels (default: the model's).")] = None,
    resolutions: Annotated[str | None, typer.Option(help="More sizes, e.g. 256x256,512x384.")] = None,
    copy_model: Annotated[
        bool, typer.Option(help="Keep the PyTorch model inside (needed by `verify` and --backend torch).")
    ] = True,
    force: Annotated[bool, typer.Option(help="Replace an existing bundle (atomically).")] = False,
    backend: Annotated[
        str, typer.Option(help="onnxruntime, or tensorrt to also build TensorRT engines (NVIDIA GPU).")
    ] = "onnxruntime",
    exporter: Annotated[str, typer.Option(help=EXPORTER_HELP)] = "auto",
    cache_cross_kv: Annotated[
        bool,
        typer.Option(
            help="Compute each block's caption cross-attention keys and values once per image, not "
            "in every block forward (PixArt, Sana; others have none)."
        ),
    ] = True,
) -> None:
    """Export every segment the plans need, the text encoder and the VAE decoder to ONNX, as a bundle."""
    from ilf_deploy.build.export.build import BuildOptions, build_bundle

    taken = out.exists() and not (out.is_dir() and not any(out.iterdir()))  # a file too (--force: replaced)
    refuse_existing("--out", [out] if taken else [], force)  # before the export; build_bundle checks again
    options = BuildOptions(
        plans=split_list(plans),
        precision=precision,
        max_batch=max_batch,
        resolutions=parse_resolutions(resolutions, height, width),
        copy_model=copy_model,
        force=force,
        backend=backend,  # tensorrt: engines built inside the build's workspace, renamed in with it
        exporter=exporter,
        cache_cross_kv=cache_cross_kv,
    )
    with progress() as bar:
        task = bar.add_task("export", total=None)

        def report(name: str, index: int, total: int) -> None:
            bar.update(task, description=f"export {name}", completed=index, total=total)

        path = build_bundle(model, out, options, report)
    console.print(f"bundle → {path}")


@command()
def schema(
    name: Annotated[str, typer.Argument(help="manifest, plan or tuning.", metavar="NAME")],
) -> None:
    """Print a published JSON Schema (2020-12) of the bundle format: manifest, plan or tuning.

    Every reader (this tool, the C++ runtime) implements these; docs/bundles.md ("The bundle format")."""
    from ilf_deploy.core.schemas import schema as published

    print(json.dumps(published(name), indent=2))


@command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the digest and the manifest.")] = False,
    digest: Digest = None,
) -> None:
    """Show a bundle's digest, model, plans, segments and their I/O (every file's hash checked)."""

    loaded = load_bundle(bundle, digest)
    m = loaded.manifest
    if as_json:
        print(json.dumps({"digest": loaded.digest, **loaded.manifest_json()}, indent=2))
        return
    sizes = ", ".join(f"{h}x{w}" for h, w in m.resolutions)
    out.print(
        f"{loaded.path}: {m.architecture}, {m.model.num_blocks} blocks, precision {m.precision}, "
        f"sizes {sizes}, max batch {m.max_batch}, feedback loop {loaded.loop}, "
        f"cut points {list(m.cut_points)}\ndigest {loaded.digest}"
    )
    for rendered in bundle_tables(
        loaded, [loaded.plan(n) for n in loaded.plan_names], _file_sizes(loaded.path)
    ):
        out.print(rendered)


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (built with its torch model).")],
    as_json: ChecksJson = None,
    prompt: Annotated[
        str | None, typer.Option(help="Prompt of the recorded trajectory (default: the held-out one).")
    ] = None,
    class_label: Annotated[
        int | None, typer.Option(help="Class of the recorded trajectory (DiT; default: the held-out one).")
    ] = None,
    backend: Annotated[
        str,
        typer.Option(
            help="The engine to check against PyTorch (any bundle backend), or tensorrt (engines vs "
            "ONNX Runtime)."
        ),
    ] = "onnxruntime",
    variant: Annotated[str | None, typer.Option(help="With --backend tensorrt: a variant's engines.")] = None,
    model: Annotated[
        str | None,
        typer.Option(
            help="The model directory to check against, for a bundle built with --no-copy-model "
            "(refused unless its config hash is the bundle's)."
        ),
    ] = None,
    digest: Digest = None,
    force: Force = False,
) -> None:
    """Check every segment against PyTorch (random and trajectory inputs), then every plan end to end,
    at every resolution the bundle was built for."""
    from ilf_deploy.checks.verify.bundle import bundle_budget, verify_bundle
    from ilf_deploy.cli.engines import verify_tensorrt
    from ilf_deploy.engines.backends import get_backend
    from ilf_deploy.engines.compare import held_out_request

    output_file(as_json, "--json-out", (".json",), force=force)
    if backend == "tensorrt":
        return verify_tensorrt(bundle, variant, None, False, as_json, digest, force=force)
    if backend == "torch" or variant is not None:
        raise ConfigError(
            "verify checks a bundle engine (no variant) or tensorrt; for variants: verify-variant"
        )
    get_backend(backend)  # an unknown name fails before the work

    loaded = load_bundle(bundle, digest)
    limits = bundle_budget(loaded, backend)
    with progress() as bar:
        task = bar.add_task("verify", total=None)
        checks = verify_bundle(
            loaded,
            held_out_request(loaded, prompt, class_label),
            lambda what: bar.update(task, description=what),
            model=model,
            backend=backend,
        )
    title = f"{bundle}: {backend} vs PyTorch ({loaded.manifest.precision}; tolerance: {limits})"
    out.print(checks_table(title, checks))
    finish_checks(checks, as_json, "tolerance")


@command()
def bench(
    bundle: Annotated[str, typer.Argument(help="Bundle directory.")],
    plans: Annotated[
        str | None,
        typer.Option(help="Comma-separated plans: bundled, auto, .json files, presets (default: bundled)."),
    ] = None,
    runs: Annotated[int, typer.Option(help="Measured runs per plan (the median is reported).")] = 3,
    warmup: Annotated[int, typer.Option(help="Unmeasured runs first.")] = 1,
    backend: Annotated[str | None, typer.Option(help=backend_help("auto"))] = None,
    variant: Annotated[str | None, typer.Option(help=VARIANT_HELP)] = None,
    prompt: Annotated[str, typer.Option(help="Prompt (PixArt).")] = "a small red circle on a blue background",
    class_label: Annotated[int, typer.Option(help="Class (DiT).")] = 1,
    as_json: Annotated[
        Path | None, typer.Option("--json-out", help="Write the results as JSON to this file.")
    ] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="Write a latency chart (PNG) here.")] = None,
    digest: Digest = None,
    force: Force = False,
) -> None:
    """Per-stage latency of each plan, block forwards, measured vs predicted speedup, images/s."""
    from ilf_deploy.checks.bench import bench_plans, plot, summary
    from ilf_deploy.engines.backends import AUTO, open_bundle_generator
    from ilf_deploy.engines.backends.plans import resolve_bundle_plan

    check_at_least("--runs", runs)
    check_at_least("--warmup", warmup, 0)
    output_file(as_json, "--json-out", (".json",), force=force)
    output_file(plot_out, "--plot", image_suffixes(), force=force)
    loaded = load_bundle(bundle, digest)  # hashes and pin: the one the engine opens below
    names = split_list(plans) if plans else loaded.plan_names
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"--plans names {', '.join(twice)} more than once")
    try:  # the one resolver: bundled plans, auto, plan files, presets its segments cover
        step_plans = [resolve_bundle_plan(loaded, name, say) for name in names]
    except RequestError as exc:
        raise ConfigError(f"--plans: {exc.message}") from None
    generator = open_bundle_generator(loaded, backend or AUTO, variant)
    announce(generator.choice, bundle, backend)
    engine = generator.backend + (f" {generator.variant}" if generator.variant else "")
    request = Request(prompt=prompt, class_label=class_label)
    with progress() as bar:
        task = bar.add_task("bench", total=None)
        results = bench_plans(
            generator, step_plans, request, runs, warmup, lambda s: bar.update(task, description=s)
        )
    rows = summary(results)
    for result in results:
        if result.stages:
            out.print(stage_table(result, runs))
    table = bench_table(f"{bundle} on {engine}", rows)
    out.print(table)
    if as_json is not None:
        report = {"backend": generator.backend, "variant": generator.variant, "runs": runs, "plans": rows}
        write_report(as_json, report)
    if plot_out is not None:
        plot(results, plot_out)
