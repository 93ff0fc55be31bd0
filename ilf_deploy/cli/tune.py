"""`tune`: which engine x precision is fastest on this machine within its fidelity budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from ..runtime.bundle import strict_json
from . import command, console, out, progress
from .options import Digest
from .tables import tune_table


@command()
def tune(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    plan: Annotated[
        str | None,
        typer.Option("--plans", "--plan", "-p", help="The plan to check and time (default: the ILF plan)."),
    ] = None,
    budget_s: Annotated[
        float, typer.Option(help="Seconds for the timing rounds (at least one round runs).")
    ] = 300.0,
    threads: Annotated[int | None, typer.Option(help="Threads per engine (default: the engine's).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print tuning.json instead of the table.")] = False,
    digest: Digest = None,
) -> None:
    """Check every installed engine x precision against ONNX Runtime fp32, time one denoising step
    of each, and write BUNDLE/tuning.json for `--backend auto` (a failing one is never chosen)."""
    from ..backends.auto import TUNING_FILE
    from ..tuning import tune as run_tune

    with progress() as bar:
        task = bar.add_task("tune", total=None)
        report = run_tune(
            bundle, plan, budget_s, threads, lambda s: bar.update(task, description=s), digest=digest
        )
    if as_json:
        print(json.dumps(strict_json(report), indent=2, allow_nan=False))
        return
    machine = report["fingerprint"]
    bf16 = [f for f in machine["flags"] if "bf16" in f or f.startswith("amx")]
    title = (
        f"{bundle} on {machine['cpu']} ({machine['cores']} cores; "
        f"{', '.join(bf16) or 'no bf16/AMX'}): one step of {report['plan']}, median of rounds"
    )
    out.print(tune_table(title, report))
    winner = report["winner"]["label"]
    console.print(f"wrote {Path(bundle) / TUNING_FILE}: `--backend auto` runs {winner} on this machine")
