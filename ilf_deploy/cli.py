"""`ilf-deploy`: a thin command-line skin over the library."""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .errors import ConfigError, IlfError
from .plan import PRESET_HELP
from .runtime.generator import Request

app = typer.Typer(
    help="Deploy diffusion transformers accelerated with Inner Loop Feedback (ILF).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console(width=None if sys.stdout.isatty() else 160)  # tables stay readable when piped


def command(name: str | None = None):
    """`app.command` that turns an IlfError into a one-line message and exit code 2."""

    def decorate(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except IlfError as exc:
                console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
                raise typer.Exit(2) from None

        return app.command(name)(wrapper)

    return decorate


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


# -- plan ------------------------------------------------------------------------------------


def _model_facts(model: Path) -> tuple[int, dict[str, Any], tuple[int, int] | None]:
    """(num_blocks, scheduler config, feedback loop) from a model directory's JSON files only."""
    from .loading import detect_architecture, resolve_source
    from .schedulers import DIT_SCHEDULER_CONFIG, PIXART_SCHEDULER_CONFIG

    path = resolve_source(model)
    architecture, is_pipeline = detect_architecture(path)
    config = json.loads(((path / "transformer") if is_pipeline else path).joinpath("config.json").read_text())
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    default = DIT_SCHEDULER_CONFIG if architecture == "dit" else PIXART_SCHEDULER_CONFIG
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else dict(default)
    feedback_file = path / "feedback" / "ilf_config.json"
    loop = None
    if feedback_file.is_file():
        fb = json.loads(feedback_file.read_text())
        loop = (int(fb["loop_start"]), int(fb["loop_end"]))
    return int(config["num_layers"]), scheduler, loop


def plan_table(plan, baseline_steps: int) -> Table:
    from .plan import predicted_speedup

    title = (
        f"plan {plan.name}: {plan.num_steps} steps, {plan.block_forwards} block forwards, "
        f"predicted speedup {predicted_speedup(plan, baseline_steps):.2f}x vs base-{baseline_steps} "
        f"({plan.num_blocks * baseline_steps} block forwards)"
    )
    table = Table(title=title, title_justify="left")
    for column in ("step", "t", "t_post", "segments", "block fwd"):
        table.add_column(column, justify="left" if column == "segments" else "right")
    for step in plan.steps:
        t_post = "" if step.t_post is None else f"{step.t_post:.1f}"
        ops = " → ".join(op.describe() for op in step.ops)
        table.add_row(str(step.index), f"{step.timestep:g}", t_post, ops, str(step.block_forwards))
    return table


@command("plan")
def plan_command(
    steps: Annotated[int, typer.Option("--steps", "-n", help="Number of denoising steps.")] = 20,
    loop: Annotated[
        str | None, typer.Option(help="ILF inner loop B:E (0-based, inclusive). Implies an ILF plan.")
    ] = None,
    feedback: Annotated[
        str | None,
        typer.Option(help="Steps that run the feedback: first2,last2 | all | none | indices like 0,1,8,9."),
    ] = None,
    t_post: Annotated[
        str,
        typer.Option(
            "--t-post", help="Post-feedback timestep: none, uniform, rescale (eq. 4), anneal (eq. 5)."
        ),
    ] = "rescale",
    cache: Annotated[str | None, typer.Option(help="Δ-cache this block range B:E (a caching plan).")] = None,
    refresh_every: Annotated[int, typer.Option(help="Refresh the Δ-cache every n-th step.")] = 3,
    blocks: Annotated[
        int | None, typer.Option(help="Backbone depth (default 28, or read from --model).")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="Read depth, scheduler and feedback loop from this model directory.")
    ] = None,
    baseline_steps: Annotated[int, typer.Option(help="Baseline the speedup is predicted against.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan itself as JSON.")] = False,
    save: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the plan JSON here.")] = None,
) -> None:
    """Build a step plan and print its per-step table, block forwards and predicted speedup."""
    from .plan import baseline_plan, cache_plan, ilf_plan, parse_range

    num_blocks, scheduler, model_loop = 28, None, None
    if model is not None:
        num_blocks, scheduler, model_loop = _model_facts(model)
    num_blocks = blocks or num_blocks
    if num_blocks < 1:
        raise ConfigError(f"--blocks must be >= 1, got {num_blocks}")
    if cache and (loop or feedback):
        raise ConfigError(
            "choose either an ILF plan (--loop/--feedback) or a caching plan (--cache), not both"
        )
    if cache:
        plan = cache_plan(steps, num_blocks, parse_range(cache, "cache range"), refresh_every, scheduler)
    elif loop or feedback:
        ilf_loop = parse_range(loop) if loop else model_loop
        plan = ilf_plan(steps, num_blocks, ilf_loop, feedback or "first2,last2", t_post, scheduler)
    else:
        plan = baseline_plan(steps, num_blocks, scheduler)
    if save is not None:
        plan.save(save)
    if as_json:
        print(plan.to_json())
    else:
        out.print(plan_table(plan, baseline_steps))


# -- generate --------------------------------------------------------------------------------


def _open(source: str, backend: str | None, variant: str | None = None):
    """(generator, plan resolver, architecture) for a bundle or a model directory / hub id."""
    from .runtime.bundle import Bundle, is_bundle

    if is_bundle(source):
        from .runtime.pipeline import open_generator

        generator = open_generator(source, backend or "onnxruntime", variant=variant)
        bundle = Bundle.load(source, verify_hashes=False)  # open_generator has checked the hashes
        return generator, bundle.plan, bundle.architecture
    if backend not in (None, "torch"):
        raise ConfigError(
            f"{source} is a model, not a bundle: build one with `ilf-deploy build` for {backend}"
        )
    from .loading import load_model
    from .plan import resolve_plan
    from .reference import TorchGenerator

    with console.status("loading model"):
        loaded = load_model(source)
    loop = loaded.feedback.loop if loaded.feedback else None

    def resolve(spec: str):
        return resolve_plan(spec, loaded.adapter.num_blocks, loaded.scheduler_config, loop)

    return TorchGenerator(loaded), resolve, loaded.architecture


BACKEND_HELP = "onnxruntime or torch (default: onnxruntime for bundles, torch for model directories)."
VARIANT_HELP = "A precision variant added to the bundle after the build (e.g. quantized segments)."


@command()
def generate(
    model: Annotated[
        str, typer.Argument(help="A bundle, a diffusers pipeline directory (+ feedback/), or a hub id.")
    ],
    plan: Annotated[
        str,
        typer.Option(
            "--plan", "-p", help=PRESET_HELP[0].upper() + PRESET_HELP[1:] + " For bundles: a bundled plan."
        ),
    ] = "ilf-10",
    prompt: Annotated[str, typer.Option(help="Text prompt (PixArt).")] = "",
    negative_prompt: Annotated[str, typer.Option(help="Negative prompt (PixArt).")] = "",
    class_label: Annotated[int | None, typer.Option(help="ImageNet class id (DiT).")] = None,
    guidance_scale: Annotated[
        float | None,
        typer.Option(help="Classifier-free guidance (default 4.5 PixArt, 4.0 DiT; <=1 disables)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial noise.")] = 0,
    height: Annotated[int | None, typer.Option(help="Image height in pixels (default: the model's).")] = None,
    width: Annotated[int | None, typer.Option(help="Image width in pixels (default: the model's).")] = None,
    latents_in: Annotated[
        Path | None, typer.Option(help="Start from these latents (.npy) instead of noise.")
    ] = None,
    latents_out: Annotated[Path | None, typer.Option(help="Write the final latents here (.npy).")] = None,
    image_out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Write the image here (.png).")
    ] = None,
    backend: Annotated[str | None, typer.Option(help=BACKEND_HELP)] = None,
    variant: Annotated[str | None, typer.Option(help=VARIANT_HELP)] = None,
) -> None:
    """Generate an image by running a step plan (ONNX Runtime for bundles, PyTorch for models)."""
    import numpy as np

    initial = _read_latents(latents_in) if latents_in is not None else None
    for path in (latents_out, image_out):
        if path is not None and not path.parent.exists():
            raise ConfigError(f"output directory {path.parent} does not exist")
    generator, resolve, architecture = _open(model, backend, variant)
    if architecture == "dit" and class_label is None:
        raise ConfigError("DiT models need --class-label")
    if architecture != "dit" and not prompt:
        raise ConfigError("PixArt models need --prompt")
    step_plan = resolve(plan)
    scale = guidance_scale if guidance_scale is not None else (4.0 if architecture == "dit" else 4.5)
    request = Request(prompt, negative_prompt, class_label, scale, seed, height, width)
    with progress() as bar:
        task = bar.add_task(f"{step_plan.name}", total=step_plan.num_steps)
        latents = generator.generate_latents(
            step_plan, request, initial, on_step=lambda _i: bar.advance(task)
        )
    if latents_out is not None:
        np.save(latents_out, np.asarray(latents, dtype=np.float32))
        console.print(f"latents → {latents_out}")
    if image_out is not None or latents_out is None:
        image_out = image_out or Path("image.png")
        from PIL import Image

        Image.fromarray(generator.decode(latents)[0]).save(image_out)
        console.print(f"image → {image_out}")
    console.print(f"{step_plan.name}: {step_plan.block_forwards} block forwards, seed {seed}")


# -- bundles ---------------------------------------------------------------------------------


def _split_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _parse_resolutions(text: str | None, height: int | None, width: int | None) -> list[tuple[int, int]]:
    sizes = []
    for part in _split_list(text or ""):
        try:
            h, w = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise ConfigError(f"resolution {part!r} is not HxW (e.g. 512x512)") from None
        sizes.append((h, w))
    if height or width:
        sizes.insert(0, (height or width, width or height))  # type: ignore[arg-type]
    return sizes


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
) -> None:
    """Export every segment the plans need, the text encoder and the VAE decoder to ONNX, as a bundle."""
    from .export.build import BuildOptions, build_bundle

    options = BuildOptions(
        plans=_split_list(plans),
        precision=precision,
        max_batch=max_batch,
        resolutions=_parse_resolutions(resolutions, height, width),
        copy_model=copy_model,
        force=force,
    )
    with progress() as bar:
        task = bar.add_task("export", total=None)

        def report(name: str, index: int, total: int) -> None:
            bar.update(task, description=f"export {name}", completed=index, total=total)

        path = build_bundle(model, out, options, report)
    console.print(f"bundle → {path}")


@command()
def inspect(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the manifest.")] = False,
) -> None:
    """Show a bundle's model, plans, segments and their I/O."""
    from .runtime.bundle import Bundle

    loaded = Bundle.load(bundle)
    m = loaded.manifest
    if as_json:
        print(json.dumps(m, indent=2))
        return
    sizes = ", ".join(f"{h}x{w}" for h, w in m["resolutions"])
    out.print(
        f"{loaded.path}: {m['architecture']}, {m['model']['num_blocks']} blocks, precision {m['precision']}, "
        f"sizes {sizes}, max batch {m['max_batch']}, feedback loop {loaded.loop}, "
        f"cut points {m['cut_points']}"
    )
    plans = Table(title="plans", title_justify="left")
    for column in ("plan", "steps", "block fwd", "feedback steps"):
        plans.add_column(column)
    for name in loaded.plan_names:
        plan = loaded.plan(name)
        plans.add_row(name, str(plan.num_steps), str(plan.block_forwards), str(plan.feedback_steps or "-"))
    out.print(plans)
    segments = Table(title="segments", title_justify="left")
    for column in ("segment", "blocks", "inputs", "outputs", "MB"):
        segments.add_column(column)
    for name, spec in m["segments"].items():
        size = sum(v for f, v in _file_sizes(loaded.path).items() if f.startswith(spec["file"]))
        io = lambda vs: ", ".join(f"{v['name']}{v['shape']}:{v['dtype']}" for v in vs)  # noqa: E731
        blocks = "-" if not spec["blocks"] else f"{spec['blocks'][0]}-{spec['blocks'][1]}"
        segments.add_row(name, blocks, io(spec["inputs"]), io(spec["outputs"]), f"{size / 1e6:.1f}")
    out.print(segments)


def _file_sizes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


@command()
def verify(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (built with its torch model).")],
    as_json: Annotated[
        Path | None, typer.Option("--json", help="Also write the checks as JSON here.")
    ] = None,
    prompt: Annotated[str, typer.Option(help="Prompt of the recorded trajectory.")] = "a small red circle",
    class_label: Annotated[int, typer.Option(help="Class of the recorded trajectory (DiT).")] = 1,
) -> None:
    """Check every ONNX segment against PyTorch (random and trajectory inputs), then every plan end to end."""
    from .runtime.bundle import Bundle
    from .verify import TOLERANCES, verify_bundle

    loaded = Bundle.load(bundle)
    with progress() as bar:
        task = bar.add_task("verify", total=None)
        checks = verify_bundle(
            loaded,
            Request(prompt=prompt, class_label=class_label),
            lambda what: bar.update(task, description=what),
        )
    seg_tol, e2e_tol = TOLERANCES[loaded.manifest["precision"]]
    table = Table(
        title=f"{bundle}: ONNX Runtime vs PyTorch ({loaded.manifest['precision']}; tolerance: segments "
        f"{seg_tol:g}, end-to-end {e2e_tol:g} relative L2)",
        title_justify="left",
    )
    for column in ("check", "name", "rel L2", "max abs", "ok"):
        table.add_column(column)
    for c in checks:
        table.add_row(
            c.kind, c.name, f"{c.rel_l2:.2e}", f"{c.max_abs:.2e}", "ok" if c.ok else "[red]FAIL[/red]"
        )
    out.print(table)
    if as_json is not None:
        as_json.write_text(json.dumps([c.to_dict() for c in checks], indent=2) + "\n")
    failed = [c for c in checks if not c.ok]
    if failed:
        console.print(f"[red]{len(failed)} check(s) beyond tolerance[/red]")
        raise typer.Exit(1)
    console.print(f"all {len(checks)} checks within tolerance")


@command()
def bench(
    bundle: Annotated[str, typer.Argument(help="Bundle directory.")],
    plans: Annotated[str | None, typer.Option(help="Comma-separated bundled plans (default: all).")] = None,
    runs: Annotated[int, typer.Option(help="Measured runs per plan (the median is reported).")] = 3,
    warmup: Annotated[int, typer.Option(help="Unmeasured runs first.")] = 1,
    backend: Annotated[str, typer.Option(help="onnxruntime or torch.")] = "onnxruntime",
    variant: Annotated[str | None, typer.Option(help=VARIANT_HELP)] = None,
    prompt: Annotated[str, typer.Option(help="Prompt (PixArt).")] = "a small red circle on a blue background",
    class_label: Annotated[int, typer.Option(help="Class (DiT).")] = 1,
    as_json: Annotated[Path | None, typer.Option("--json", help="Write results as JSON here.")] = None,
    plot_out: Annotated[Path | None, typer.Option("--plot", help="Write a latency chart (PNG) here.")] = None,
) -> None:
    """Per-stage latency of each plan, block forwards, measured vs predicted speedup, images/s."""
    from .bench import bench_plans, plot, summary
    from .runtime.bundle import Bundle

    if runs < 1 or warmup < 0:
        raise ConfigError("--runs must be >= 1 and --warmup >= 0")
    loaded = Bundle.load(bundle)
    names = _split_list(plans) if plans else loaded.plan_names
    step_plans = [loaded.plan(name) for name in names]
    generator, _, _ = _open(bundle, backend, variant)
    request = Request(prompt=prompt, class_label=class_label)
    with progress() as bar:
        task = bar.add_task("bench", total=None)
        results = bench_plans(
            generator, step_plans, request, runs, warmup, lambda s: bar.update(task, description=s)
        )
    rows = summary(results)
    for result in results:
        if not result.stages:
            continue
        table = Table(title=f"{result.plan}: median of {runs} runs", title_justify="left")
        for column in ("stage", "calls", "ms", "share"):
            table.add_column(column, justify="left" if column == "stage" else "right")
        for stage, (calls, seconds) in sorted(result.stages.items(), key=lambda kv: -kv[1][1]):
            share = f"{100 * seconds / result.latency:.1f}%"
            table.add_row(stage, str(calls), f"{seconds * 1000:.1f}", share)
        out.print(table)
    table = Table(title=f"{bundle} on {backend}", title_justify="left")
    for column in (
        "plan",
        "steps",
        "block fwd",
        "ms",
        "images/s",
        "speedup",
        "predicted",
        "measured/predicted",
    ):
        table.add_column(column, justify="left" if column == "plan" else "right")
    for row in rows:
        extra = (
            [f"{row[k]:.2f}x" for k in ("measured_speedup", "predicted_speedup")]
            if "baseline" in row
            else ["-", "-"]
        )
        ratio = f"{row['speedup_ratio']:.3f}" if "baseline" in row else "-"
        table.add_row(
            row["plan"],
            str(row["steps"]),
            str(row["block_forwards"]),
            f"{row['latency_s'] * 1000:.0f}",
            f"{row['images_per_s']:.2f}",
            *extra,
            ratio,
        )
    out.print(table)
    if as_json is not None:
        as_json.write_text(json.dumps({"backend": backend, "runs": runs, "plans": rows}, indent=2) + "\n")
    if plot_out is not None:
        plot(results, plot_out)


def _read_latents(path: Path):
    import numpy as np

    try:
        return np.load(path).astype(np.float32)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read latents {path}: {exc}") from None


# -- make-tiny -------------------------------------------------------------------------------


@command("make-tiny")
def make_tiny_command(
    architecture: Annotated[str, typer.Argument(help="pixart-alpha, pixart-sigma or dit.")],
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (must not exist or be empty).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    layers: Annotated[int, typer.Option(help="Number of transformer blocks.")] = 8,
    loop: Annotated[str | None, typer.Option(help="Feedback loop B:E (default: 8-19 of 28, scaled).")] = None,
    resolution_conditions: Annotated[
        bool, typer.Option(help="PixArt-α 1024-style resolution/aspect-ratio conditions.")
    ] = False,
) -> None:
    """Write a tiny random-weight diffusers pipeline (+ random ILF feedback) for tests and demos."""
    from .plan import parse_range
    from .tiny import make_tiny_pipeline

    ilf_loop = parse_range(loop) if loop else None
    with console.status(f"writing tiny {architecture}"):
        path = make_tiny_pipeline(
            architecture,
            out_dir,
            seed=seed,
            num_layers=layers,
            loop=ilf_loop,
            resolution_conditions=resolution_conditions,
        )
    console.print(f"tiny {architecture} pipeline → {path}")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        console.print("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
