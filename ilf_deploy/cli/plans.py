"""`plan` and `make-tiny`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from ilf_deploy.cli import command, console, out, tables
from ilf_deploy.cli.options import Force
from ilf_deploy.cli.paths import output_dir, output_file
from ilf_deploy.cli.sizes import parse_resolutions
from ilf_deploy.core.errors import ConfigError, check_at_least

# -- plan ------------------------------------------------------------------------------------


def _model_facts(
    model: Path, sizes: list[tuple[int, int]] | None = None
) -> tuple[int, dict[str, Any], tuple[int, int] | None, str | None]:
    """(num_blocks, scheduler config, feedback loop and t_post) from a model directory's JSON only;
    a size-dependent schedule is made for `sizes` (height, width in pixels)."""
    from ilf_deploy.core.schedulers import for_image_tokens, for_pipeline
    from ilf_deploy.model.ilf import CONFIG_FILE, FEEDBACK_DIR, FeedbackConfig
    from ilf_deploy.model.loading import default_scheduler_config, detect_architecture, resolve_source

    path = resolve_source(model)
    architecture, is_pipeline = detect_architecture(path)
    config = json.loads(((path / "transformer") if is_pipeline else path).joinpath("config.json").read_text())
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    default = default_scheduler_config(architecture, config)
    scheduler = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else dict(default)
    num_blocks = int(config["num_layers"]) + int(config.get("num_single_layers", 0))  # Flux: double + single
    if architecture in ("sd3", "flux"):
        vae_file = path / "vae" / "config.json"
        levels = len(json.loads(vae_file.read_text())["block_out_channels"]) if vae_file.is_file() else 4
        factor = 2 ** (levels - 1) * 2  # the VAE's downsampling, then a 2x2 patch (SD3) or packing (Flux)
        tokens = [(h // factor) * (w // factor) for h, w in sizes or [(1024, 1024)]]
        scheduler = for_image_tokens(for_pipeline(scheduler, architecture), tokens)
    feedback_file = path / FEEDBACK_DIR / CONFIG_FILE
    if not feedback_file.is_file():
        return num_blocks, scheduler, None, None
    fb = FeedbackConfig(**json.loads(feedback_file.read_text()))  # its defaults cover older files
    return num_blocks, scheduler, fb.loop, fb.t_post


def plan_table(plan, baseline_steps: int) -> Any:
    from ilf_deploy.core.plan import predicted_speedup

    most = "at most " if plan.adaptive else ""  # adaptive ops decide per image at run time
    title = (
        f"plan {plan.name}: {plan.num_steps} steps, {most}{plan.block_forwards} block forwards, "
        f"predicted speedup {predicted_speedup(plan, baseline_steps):.2f}x vs base-{baseline_steps} "
        f"({plan.num_blocks * baseline_steps} block forwards)"
    )
    return tables.plan_table(plan, title)


Steps = Annotated[int, typer.Option("--steps", "-n", help="Number of denoising steps.")]
Loop = Annotated[str | None, typer.Option(help="ILF inner loop B:E (0-based, inclusive). Implies ILF steps.")]
FeedbackSteps = Annotated[
    str | None,
    typer.Option(help="Steps that run the feedback: first2,last2 | all | none | indices like 0,1,8,9."),
]
TPost = Annotated[
    str | None,
    typer.Option(
        "--t-post",
        help="Post-feedback timestep: none, uniform, rescale (eq. 4), anneal (eq. 5) "
        "(default: the --model feedback's own rule, else rescale).",
    ),
]
Cache = Annotated[
    str | None,
    typer.Option(help="Δ-cache this block range B:E on the steps without feedback (composes with ILF)."),
]
RefreshEvery = Annotated[
    int | None, typer.Option(help="Refresh the Δ-cache every n-th step (default 3; Δ-DiT 2).")
]
Adaptive = Annotated[
    float | None,
    typer.Option(
        help="Adaptive Δ-cache: reuse while the range's input changed by at most this relative L1 since "
        "the last refresh, decided per image at run time (the --cache range, or the default one)."
    ),
]
MaxReuse = Annotated[int, typer.Option(help="Adaptive Δ-cache: the most reuses in a row.")]
DeltaDit = Annotated[
    int | None,
    typer.Option(help="Δ-DiT: cache this many rear blocks before --boundary, as many front blocks after."),
]
Boundary = Annotated[int | None, typer.Option(help="Δ-DiT's step boundary (default: half the steps).")]
BlockCaching = Annotated[
    float | None,
    typer.Option(help="Block Caching with this δ (eq. 7), from the --model's profiled block changes."),
]
Blocks = Annotated[int | None, typer.Option(help="Backbone depth (default 28, or read from --model).")]
ModelDir = Annotated[
    Path | None, typer.Option(help="Read depth, scheduler and feedback loop from this model directory.")
]
Name = Annotated[str | None, typer.Option(help="The plan's name (default: its preset's, else composed-N).")]


SIZES_HELP = (
    "With --model, where the schedule depends on the image size (Flux-dev's dynamic shift): the "
    "sizes HxW[,HxW...] the plan carries a schedule for (default: 1024x1024, the pipeline's)."
)


@command("plan")
def plan_command(
    steps: Steps = 20,
    loop: Loop = None,
    feedback: FeedbackSteps = None,
    t_post: TPost = None,
    cache: Cache = None,
    refresh_every: RefreshEvery = None,
    adaptive: Adaptive = None,
    max_reuse: MaxReuse = 2,
    delta_dit: DeltaDit = None,
    boundary: Boundary = None,
    block_caching: BlockCaching = None,
    blocks: Blocks = None,
    model: ModelDir = None,
    name: Name = None,
    baseline_steps: Annotated[int, typer.Option(help="Baseline the speedup is predicted against.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan itself as JSON.")] = False,
    save: Annotated[Path | None, typer.Option("--out", "-o", help="Also write the plan JSON here.")] = None,
    sizes: Annotated[str | None, typer.Option(help=SIZES_HELP)] = None,
    force: Force = False,
) -> None:
    """Build a step plan and print its per-step table, block forwards and predicted speedup.

    ILF feedback steps (--loop/--feedback) compose with one caching method on the other steps
    (--cache [--adaptive], --delta-dit or --block-caching): each feedback step refreshes the cache
    of every range it recomputes (docs/plans.md ("Composed and adaptive plans"))."""
    from ilf_deploy.core.plan import parse_range

    output_file(save, "--out", (".json",), force=force)
    for flag, value in (("--refresh-every", refresh_every), ("--baseline-steps", baseline_steps)):
        check_at_least(flag, value)  # 0 is not "the default": it is refused as -1 is
    if block_caching is not None and not 0 <= block_caching < float("inf"):  # NaN fails too
        raise ConfigError(f"--block-caching δ must be a finite number >= 0, got {block_caching}")
    num_blocks, scheduler, model_loop, model_t_post = 28, None, None, None
    if model is not None:
        num_blocks, scheduler, model_loop, model_t_post = _model_facts(model, parse_resolutions(sizes))
    num_blocks = blocks if blocks is not None else num_blocks
    check_at_least("--blocks", num_blocks)
    ilf = {"feedback": (), "loop": None, "t_post": t_post or model_t_post or "rescale"}
    if loop or feedback:
        ilf["loop"] = parse_range(loop, "--loop", num_blocks) if loop else model_loop
        ilf["feedback"] = feedback or "first2,last2"
    request = PlanRequest(steps, num_blocks, scheduler, name, ilf, refresh_every)
    plan = request.build(cache, adaptive, max_reuse, delta_dit, boundary, block_caching, model)
    if save is not None:
        plan.save(save)
    if as_json:
        print(plan.to_json())
    else:
        out.print(plan_table(plan, baseline_steps))


class PlanRequest:
    """What `plan`'s options ask for, built by one method per caching choice."""

    def __init__(self, steps, num_blocks, scheduler, name, ilf: dict[str, Any], refresh_every) -> None:
        self.steps, self.num_blocks, self.scheduler, self.name = steps, num_blocks, scheduler, name
        self.ilf, self.refresh_every = ilf, refresh_every

    def build(self, cache, adaptive, max_reuse, delta_dit, boundary, block_caching, model):
        chosen = {
            "--cache/--adaptive": cache or adaptive is not None,
            "--delta-dit": delta_dit is not None,
            "--block-caching": block_caching is not None,
        }
        methods = [option for option, given in chosen.items() if given]
        if len(methods) > 1:
            raise ConfigError(f"choose one caching method, not {' and '.join(methods)}")
        if delta_dit is not None:
            return self.delta_dit(delta_dit, boundary)
        if block_caching is not None:
            return self.block_caching(block_caching, model)
        if cache or adaptive is not None:
            return self.cache(cache, adaptive, max_reuse)
        return self.plain()

    def plain(self):
        from ilf_deploy.core.plan import baseline_plan, ilf_plan

        if not self.ilf["feedback"]:
            return baseline_plan(self.steps, self.num_blocks, self.scheduler, self.name)
        loop, feedback, rule = self.ilf["loop"], self.ilf["feedback"], self.ilf["t_post"]
        return ilf_plan(self.steps, self.num_blocks, loop, feedback, rule, self.scheduler, self.name)

    def cache(self, cache: str | None, adaptive: float | None, max_reuse: int):
        from ilf_deploy.core.plan import (
            CacheSpec,
            cache_plan,
            compose_plan,
            default_cache_range,
            parse_range,
            preset_name,
        )
        from ilf_deploy.core.plan.builders import default_feedback, parse_step_set

        start, end = (
            parse_range(cache, "--cache", self.num_blocks) if cache else default_cache_range(self.num_blocks)
        )
        every = self.refresh_every or 3
        if adaptive is not None and (adaptive < 0 or max_reuse < 1):
            raise ConfigError(
                f"--adaptive must be >= 0 and --max-reuse >= 1, got {adaptive:g} and {max_reuse}"
            )
        if adaptive is None and not self.ilf["feedback"]:
            return cache_plan(self.steps, self.num_blocks, (start, end), every, self.scheduler, self.name)
        spec = CacheSpec(start, end, "cache", every, threshold=adaptive, max_reuse=max_reuse)
        feedback = self.ilf["feedback"]
        usual = not feedback or parse_step_set(feedback, self.steps) == parse_step_set(
            default_feedback(self.steps), self.steps
        )
        name = self.name or (
            preset_name(self.steps, bool(feedback), spec) if usual else f"composed-{self.steps}"
        )
        return compose_plan(
            self.steps,
            self.num_blocks,
            [spec],
            loop=self.ilf["loop"],
            feedback=feedback,
            t_post=self.ilf["t_post"],
            scheduler_config=self.scheduler,
            name=name,
        )

    def delta_dit(self, num_cached: int, boundary: int | None):
        from ilf_deploy.core.plan import delta_dit_plan

        every = self.refresh_every or 2
        return delta_dit_plan(
            self.steps,
            self.num_blocks,
            num_cached,
            boundary,
            every,
            self.scheduler,
            self.name,
            self.ilf["feedback"],
            self.ilf["loop"],
            self.ilf["t_post"],
        )

    def block_caching(self, delta: float, model: Path | None):
        from ilf_deploy.core.plan import baseline_plan, block_caching_plan

        if model is None:
            raise ConfigError("--block-caching profiles a model's blocks: give --model")
        changes = _profile(model, baseline_plan(self.steps, self.num_blocks, self.scheduler))
        return block_caching_plan(
            changes,
            delta,
            self.scheduler,
            self.name,
            self.ilf["feedback"],
            self.ilf["loop"],
            self.ilf["t_post"],
        )


def _profile(model: Path, plan) -> Any:
    """Block Caching's profile (eq. 6) of `model` over `plan`, on four training-split captions."""
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.engines.backends.pytorch import TorchGenerator, profile_block_changes
    from ilf_deploy.model.data import make_batch
    from ilf_deploy.model.loading import load_model

    with console.status("profiling block changes"):
        loaded = load_model(model)
        requests = [
            Request(prompt=s.caption(0), seed=i) for i, s in enumerate(make_batch(range(4), 0).samples)
        ]
        return profile_block_changes(TorchGenerator(loaded), plan, requests)


# -- make-tiny -------------------------------------------------------------------------------


@command("make-tiny")
def make_tiny_command(
    architecture: Annotated[
        str,
        typer.Argument(help="pixart-alpha, pixart-sigma, dit, sd3, sd3.5, flux (dev), flux-schnell or sana."),
    ],
    out_dir: Annotated[Path, typer.Argument(help="Directory to create (empty or absent, or --force).")],
    seed: Annotated[int, typer.Option(help="Seed of the random weights.")] = 0,
    layers: Annotated[
        int, typer.Option(help="Number of transformer blocks (Flux: double + single, at least 2).")
    ] = 8,
    loop: Annotated[str | None, typer.Option(help="Feedback loop B:E (default: 8-19 of 28, scaled).")] = None,
    resolution_conditions: Annotated[
        bool, typer.Option(help="PixArt-α 1024-style resolution/aspect-ratio conditions.")
    ] = False,
    force: Force = False,
) -> None:
    """Write a tiny random-weight diffusers pipeline (+ random ILF feedback) for tests and demos."""
    from ilf_deploy.core.plan import parse_range
    from ilf_deploy.model.tiny import make_tiny_pipeline

    output_dir(out_dir, "OUT_DIR", force=force)

    ilf_loop = parse_range(loop, "--loop", layers if layers >= 1 else None) if loop else None
    with console.status(f"writing tiny {architecture}"):  # staged, and swapped in whole with --force
        make_tiny_pipeline(
            architecture,
            out_dir,
            seed=seed,
            num_layers=layers,
            loop=ilf_loop,
            resolution_conditions=resolution_conditions,
            force=force,
        )
    console.print(f"tiny {architecture} pipeline → {out_dir}")
