"""`tune`: which engine x precision is fastest on this machine within its fidelity budget, and
(`--search-plans`) which plan is fastest within a quality budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ilf_deploy.cli import command, console, out, progress
from ilf_deploy.cli.options import Digest, Force, load_bundle
from ilf_deploy.cli.paths import image_suffixes, output_file
from ilf_deploy.cli.sizes import split_list
from ilf_deploy.cli.tables import plan_search_table, tune_table
from ilf_deploy.core.runtime.bundle import Bundle, strict_json

SearchPlans = Annotated[
    bool,
    typer.Option(
        "--search-plans",
        help="Then search plans (the bundle's, composed and adaptive ones its segments allow): quality "
        "with `eval` on the tuning prompts, time on the winner; record the fastest within "
        "--quality-budget for `--plan auto`.",
    ),
]
QualityBudgetOption = Annotated[
    str,
    typer.Option(
        help="How much worse than --reference a plan may be: acc=se|D (paired accuracy drop), "
        "frechet=F (Fréchet rise), l2=L (latent rel L2); 'none' lifts one."
    ),
]
PromptCount = Annotated[
    int, typer.Option("--prompt-count", help="Tuning prompts the search evaluates each plan on.")
]
PromptOffset = Annotated[
    int, typer.Option(help="The first tuning prompt (the reporting prompts, 200000 on, are refused).")
]
Reference = Annotated[
    str | None, typer.Option(help="The plan quality is measured against (default: the bundle's default).")
]
Plot = Annotated[Path | None, typer.Option(help="The Pareto plot's PNG (default BUNDLE/plan_search.png).")]
ConfirmPrompts = Annotated[
    int,
    typer.Option(
        help="Then measure the plans that would beat --reference again on this many fresh tuning prompts "
        "(those after --prompt-count); only one within the budget on both is chosen (0: off)."
    ),
]

BudgetSeconds = Annotated[
    float,
    typer.Option(
        help="Seconds for the whole command: candidates are checked likeliest winner first (int8, "
        "bf16, fp32; int8 after fp32 on a CPU without 8-bit dot products) and those whose check "
        "would overrun it are skipped (the reference's check and one timing round always run)."
    ),
]
MaxOpen = Annotated[
    int | None,
    typer.Option(
        help="At most this many engines open at once, the reference included; more are timed in "
        "groups, each with the reference (default: as many as the available memory holds)."
    ),
]
Backends = Annotated[
    str | None,
    typer.Option(
        help="Only these engines, comma-separated (e.g. openvino): fewer checks within --budget-s on "
        "a large model or image size; ONNX Runtime fp32, the reference, always runs."
    ),
]


@command()
def tune(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    plan: Annotated[
        str | None,
        typer.Option("--plans", "--plan", "-p", help="The plan to check and time (default: the ILF plan)."),
    ] = None,
    budget_s: BudgetSeconds = 300.0,
    threads: Annotated[int | None, typer.Option(help="Threads per engine (default: the engine's).")] = None,
    max_open: MaxOpen = None,
    backends: Backends = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print tuning.json instead of the table.")] = False,
    digest: Digest = None,
    search_plans: SearchPlans = False,
    quality_budget: QualityBudgetOption = "acc=se,frechet=2",
    prompts: PromptCount = 128,
    prompt_offset: PromptOffset = 100_000,
    reference: Reference = None,
    plot: Plot = None,
    confirm_prompts: ConfirmPrompts = 0,
    force: Force = False,
) -> None:
    """Check every installed engine x precision against ONNX Runtime fp32, time one denoising step
    of each, and write BUNDLE/tuning.json for `--backend auto` (a failing one is never chosen)."""
    from ilf_deploy.checks.tuning import (
        QualityBudget,
        check_tuning_prompts,
        only_backends,
        plan_search_schema,
    )
    from ilf_deploy.checks.tuning import tune as run_tune

    budget = QualityBudget.parse(quality_budget)  # bad options fail before any work
    include = only_backends(split_list(backends)) if backends is not None else None
    output_file(plot, "--plot", image_suffixes(), force=force)  # BUNDLE/tuning.json is tune's to rewrite
    check_tuning_prompts(prompt_offset, prompts)
    if confirm_prompts:
        check_tuning_prompts(prompt_offset + prompts, confirm_prompts)
    loaded = load_bundle(bundle, digest)  # hashes and pin once: tune, the plan search and its eval share it
    with progress() as bar:
        task = bar.add_task("tune", total=None)
        progressed = lambda s: bar.update(task, description=s)  # noqa: E731 (the progress bar's callback)
        report = run_tune(loaded, plan, budget_s, threads, progressed, include, max_open=max_open)
    if not as_json:
        _print_tune(bundle, report)
    if search_plans:
        search = _search(loaded, budget, reference, (prompt_offset, prompts), plot, as_json, confirm_prompts)
        report = {**report, "schema": plan_search_schema(search), "plan_search": search}  # as written
    if as_json:
        print(json.dumps(strict_json(report), indent=2, allow_nan=False))


def _print_tune(bundle: Path, report: dict) -> None:
    from ilf_deploy.engines.backends.auto import TUNING_FILE

    machine = report["fingerprint"]
    bf16 = [f for f in machine["flags"] if "bf16" in f or f.startswith("amx")]
    title = (
        f"{bundle} on {machine['cpu']} ({machine['cores']} cores; "
        f"{', '.join(bf16) or 'no bf16/AMX'}): one step of {report['plan']}, median of rounds"
    )
    out.print(tune_table(title, report))
    winner = report["winner"]
    console.print(f"chose {winner['reason']}")
    memory = report["timed"]["memory"]
    if memory["mode"] != "interleaved":
        console.print(
            f"memory: timed in {memory['groups']} groups of at most {memory['most_open']} engines, each with "
            "the reference (memory or --max-open); speedups are against the reference timed beside each"
        )
    console.print(
        f"wrote {Path(bundle) / TUNING_FILE}: `--backend auto` runs {winner['label']} on this machine "
        f"({report['seconds']:g} s of --budget-s {report['budget_s']:g})"
    )


def _search(
    bundle: Bundle, budget, reference: str | None, prompts: tuple[int, int], plot, quiet: bool, confirm: int
) -> dict:
    """`--search-plans`: the search, its Pareto table, and what `--plan auto` now runs."""
    from ilf_deploy.checks.evaluation import plan_quality
    from ilf_deploy.checks.tuning import PLAN_SEARCH_PLOT, search_plans

    with progress() as bar:
        task = bar.add_task("plan search", total=None)
        quality = plan_quality(
            bundle, on_samples=lambda spec, n: bar.update(task, description=f"eval {spec}")
        )
        search = search_plans(
            bundle,
            quality,
            budget,
            reference,
            prompts,
            progress=lambda s: bar.update(task, description=s),
            plot=plot,
            confirm=confirm,
        )
    if not quiet:
        first, count = prompts
        title = (
            f"plans on {search['engine']}, quality on tuning prompts {first}..{first + count - 1} "
            f"vs {search['reference']}; budget: {budget.text}"
        )
        out.print(plan_search_table(title, search["candidates"]))
        for name, miss in search.get("confirm", {}).get("checked", {}).items():
            console.print(
                f"confirmed on {search['confirm']['n']} more prompts: {name}: {miss or 'within the budget'}"
            )
        where = plot or bundle.path / PLAN_SEARCH_PLOT
        console.print(f"Pareto plot → {where}; `--plan auto` runs {search['chosen']['name']} on this machine")
    return search
