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

app = typer.Typer(
    help="Deploy diffusion transformers accelerated with Inner Loop Feedback (ILF).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(stderr=True)
out = Console()


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


@command()
def generate(
    model: Annotated[str, typer.Argument(help="Diffusers pipeline directory (with feedback/) or hub id.")],
    plan: Annotated[
        str, typer.Option("--plan", "-p", help=PRESET_HELP[0].upper() + PRESET_HELP[1:] + ".")
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
) -> None:
    """Generate an image by running a step plan with the PyTorch reference runner."""
    import numpy as np
    import torch

    from .loading import load_model
    from .plan import resolve_plan
    from .reference import Request, TorchGenerator

    initial = _read_latents(latents_in) if latents_in is not None else None
    for path in (latents_out, image_out):
        if path is not None and not path.parent.exists():
            raise ConfigError(f"output directory {path.parent} does not exist")
    with console.status("loading model"):
        loaded = load_model(model)
    if loaded.architecture == "dit" and class_label is None:
        raise ConfigError("DiT models need --class-label")
    if loaded.architecture != "dit" and not prompt:
        raise ConfigError("PixArt models need --prompt")
    step_plan = resolve_plan(
        plan,
        loaded.adapter.num_blocks,
        loaded.scheduler_config,
        loaded.feedback.loop if loaded.feedback else None,
    )
    scale = guidance_scale if guidance_scale is not None else (4.0 if loaded.architecture == "dit" else 4.5)
    request = Request(prompt, negative_prompt, class_label, scale, seed, height, width)
    generator = TorchGenerator(loaded)
    with progress() as bar:
        task = bar.add_task(f"{step_plan.name}", total=step_plan.num_steps)
        latents = generator.generate_latents(
            step_plan,
            request,
            torch.from_numpy(initial) if initial is not None else None,
            on_step=lambda _i: bar.advance(task),
        )
    if latents_out is not None:
        np.save(latents_out, latents.float().numpy())
        console.print(f"latents → {latents_out}")
    if image_out is not None or latents_out is None:
        image_out = image_out or Path("image.png")
        from PIL import Image

        Image.fromarray(generator.decode(latents)[0]).save(image_out)
        console.print(f"image → {image_out}")
    console.print(f"{step_plan.name}: {step_plan.block_forwards} block forwards, seed {seed}")


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
