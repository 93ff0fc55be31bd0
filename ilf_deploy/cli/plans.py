"""`plan` and `make-tiny`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ..errors import ConfigError
from . import command, console, out, tables

# -- plan ------------------------------------------------------------------------------------


def _model_facts(model: Path) -> tuple[int, dict[str, Any], tuple[int, int] | None, str | None]:
    """(num_blocks, scheduler config, feedback loop and t_post) from a model directory's JSON only."""
    from ..ilf import CONFIG_FILE, FEEDBACK_DIR, FeedbackConfig
    from ..loading import detect_architecture, resolve_source
    from ..schedulers import DIT_SCHEDULER_CONFIG, PIXART_SCHEDULER_CONFIG

    path = resolve_source(model)
    architecture, is_pipeline = detect_architecture(path)
    config = json.loads(((path / "transformer") if is_pipeline else path).joinpath("config.json").read_text())
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    default = DIT_SCHEDULER_CONFIG if architecture == "dit" else PIXART_SCHEDULER_CONFIG
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else dict(default)
    feedback_file = path / FEEDBACK_DIR / CONFIG_FILE
    if not feedback_file.is_file():
        return int(config["num_layers"]), scheduler, None, None
    fb = FeedbackConfig(**json.loads(feedback_file.read_text()))  # its defaults cover older files
    return int(config["num_layers"]), scheduler, fb.loop, fb.t_post


def plan_table(plan, baseline_steps: int) -> Any:
    from ..plan import predicted_speedup

    title = (
        f"plan {plan.name}: {plan.num_steps} steps, {plan.block_forwards} block forwards, "
        f"predicted speedup {predicted_speedup(plan, baseline_steps):.2f}x vs base-{baseline_steps} "
        f"({plan.num_blocks * baseline_steps} block forwards)"
    )
    return tables.plan_table(plan, title)


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
        str | None,
        typer.Option(
            "--t-post",
            help="Post-feedback timestep: none, uniform, rescale (eq. 4), anneal (eq. 5) "
            "(default: the --model feedback's own rule, else rescale).",
        ),
    ] = None,
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
    from ..plan import baseline_plan, cache_plan, ilf_plan, parse_range

    num_blocks, scheduler, model_loop, model_t_post = 28, None, None, None
    if model is not None:
        num_blocks, scheduler, model_loop, model_t_post = _model_facts(model)
    num_blocks = blocks or num_blocks
    if num_blocks < 1:
        raise ConfigError(f"--blocks must be >= 1, got {num_blocks}")
    if cache and (loop or feedback):
        raise ConfigError(
            "choose either an ILF plan (--loop/--feedback) or a caching plan (--cache), not both"
        )
    if cache:
        cache_range = parse_range(cache, "--cache", num_blocks)
        plan = cache_plan(steps, num_blocks, cache_range, refresh_every, scheduler)
    elif loop or feedback:
        ilf_loop = parse_range(loop, "--loop", num_blocks) if loop else model_loop
        rule = t_post or model_t_post or "rescale"
        plan = ilf_plan(steps, num_blocks, ilf_loop, feedback or "first2,last2", rule, scheduler)
    else:
        plan = baseline_plan(steps, num_blocks, scheduler)
    if save is not None:
        plan.save(save)
    if as_json:
        print(plan.to_json())
    else:
        out.print(plan_table(plan, baseline_steps))


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
    from ..plan import parse_range
    from ..tiny import make_tiny_pipeline

    ilf_loop = parse_range(loop, "--loop", layers if layers >= 1 else None) if loop else None
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
