"""`tune`: which engine x precision is fastest on this machine within its fidelity budget."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from . import command, console, out, progress
from .options import Digest


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
        print(json.dumps(report, indent=2))
        return
    machine = report["fingerprint"]
    bf16 = [f for f in machine["flags"] if "bf16" in f or f.startswith("amx")]
    table = Table(
        title=f"{bundle} on {machine['cpu']} ({machine['cores']} cores; "
        f"{', '.join(bf16) or 'no bf16/AMX'}): one step of {report['plan']}, median of rounds",
        title_justify="left",
    )
    for column in ("engine", "ms/step", "speedup", "worst segment SNR dB", "end-to-end rel L2", "status"):
        table.add_column(column, justify="left" if column in ("engine", "status") else "right")
    winner = report["winner"]["label"]
    for row in report["candidates"]:
        segments = [f["metrics"]["snr_db"] for f in row["fidelity"] if f["kind"] == "segment"]
        e2e = [f["metrics"]["rel_l2"] for f in row["fidelity"] if f["kind"] == "end-to-end"]
        if row["error"]:
            status = f"[yellow]skipped[/yellow]: {row['error']}"
        elif not row["ok"]:
            status = "[red]beyond budget[/red]"
        else:
            status = "[green]winner[/green]" if row["label"] == winner else "ok"
        table.add_row(
            row["label"] + ("" if row["budget"] else " (reference)"),
            f"{row['ms_per_step']:.1f}" if row["ms_per_step"] else "-",
            f"{row['speedup']:.2f}x" if row["speedup"] else "-",
            f"{min(segments):.1f}" if segments else "-",
            f"{e2e[0]:.2e}" if e2e else "-",
            status,
        )
    out.print(table)
    console.print(f"wrote {Path(bundle) / TUNING_FILE}: `--backend auto` runs {winner} on this machine")
