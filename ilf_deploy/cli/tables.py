"""Every table the CLI prints, in one place and one shape: the title on the left, text columns
left-justified, numbers right-justified. Commands compute rows; these functions lay them out."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from typing import Any

from rich.markup import escape
from rich.table import Table


def table(
    title: str, columns: Sequence[str], rows: Iterable[Sequence[str]], text: Collection[str] | None = None
) -> Table:
    """A table whose `text` columns (default: the first) hold words, left-justified; the others hold
    numbers, right-justified."""
    words = {columns[0]} if text is None else set(text)
    out = Table(title=title, title_justify="left")
    for column in columns:
        out.add_column(column, justify="left" if column in words else "right")
    for row in rows:
        out.add_row(*row)
    return out


def checks_table(title: str, rows: list[Any]) -> Table:
    """The rows of every check command (compare.Check): verify, verify-variant, verify-engines."""
    sized = any(r.size for r in rows)
    columns = ["check", "name", *(["size"] if sized else []), "samples", "SNR dB", "cosine", "rel L2"]
    body = [
        [
            r.label,
            r.name,
            *([r.size] if sized else []),
            str(r.samples),
            f"{r.snr_db:.1f}",
            f"{r.cosine:.5f}",
            f"{r.rel_l2:.2e}",
            f"{r.max_abs:.2e}",
            str(r.limit),
            "ok" if r.ok else "[red]FAIL[/red]",
        ]
        for r in rows
    ]
    return table(title, [*columns, "max abs", "limit", "ok"], body, text=("check", "name", "size", "limit"))


def plan_table(plan: Any, title: str) -> Table:
    """A step plan, one row per step: its timesteps, the segments it runs and their block forwards."""
    rows = [
        [
            str(step.index),
            f"{step.timestep:g}",
            "" if step.t_post is None else f"{step.t_post:.1f}",
            " → ".join(op.describe() for op in step.ops),
            str(step.block_forwards),
        ]
        for step in plan.steps
    ]
    return table(title, ("step", "t", "t_post", "segments", "block fwd"), rows, text=("segments",))


def bundle_tables(bundle: Any, plans: list[Any], sizes: dict[str, int]) -> list[Table]:
    """`inspect`: the bundle's plans, and its segments with their I/O and file sizes."""
    plan_rows = [
        [p.name, str(p.num_steps), str(p.block_forwards), str(p.feedback_steps or "-")] for p in plans
    ]
    io = lambda vs: ", ".join(f"{v.name}{list(v.shape)}:{v.dtype}" for v in vs)  # noqa: E731
    segment_rows = []
    for name, spec in bundle.manifest.segments.items():
        size = sum(v for f, v in sizes.items() if f.startswith(spec.file))
        blocks = "-" if not spec.blocks else f"{spec.blocks[0]}-{spec.blocks[1]}"
        segment_rows.append([name, blocks, io(spec.inputs), io(spec.outputs), f"{size / 1e6:.1f}"])
    return [
        table(
            "plans",
            ("plan", "steps", "block fwd", "feedback steps"),
            plan_rows,
            text=("plan", "feedback steps"),
        ),
        table(
            "segments",
            ("segment", "blocks", "inputs", "outputs", "MB"),
            segment_rows,
            text=("segment", "blocks", "inputs", "outputs"),
        ),
    ]


def stage_table(result: Any, runs: int) -> Table:
    """`bench`: one plan's stages (segments, text encoder, VAE…), slowest first."""
    rows = [
        [stage, str(calls), f"{seconds * 1000:.1f}", f"{100 * seconds / result.latency:.1f}%"]
        for stage, (calls, seconds) in sorted(result.stages.items(), key=lambda kv: -kv[1][1])
    ]
    return table(f"{result.plan}: median of {runs} runs", ("stage", "calls", "ms", "share"), rows)


def bench_table(title: str, rows: list[dict[str, Any]]) -> Table:
    """`bench`: every plan's latency, block forwards and measured vs predicted speedup."""
    columns = ("plan", "steps", "block fwd", "ms", "images/s", "speedup", "predicted", "measured/predicted")
    body = []
    for row in rows:
        compared = "baseline" in row
        speedups = (
            [f"{row[k]:.2f}x" for k in ("measured_speedup", "predicted_speedup")] if compared else ["-", "-"]
        )
        body.append(
            [
                row["plan"],
                str(row["steps"]),
                str(row["block_forwards"]),
                f"{row['latency_s'] * 1000:.0f}",
                f"{row['images_per_s']:.2f}",
                *speedups,
                f"{row['speedup_ratio']:.3f}" if compared else "-",
            ]
        )
    return table(title, columns, body)


def tune_table(title: str, report: dict[str, Any]) -> Table:
    """`tune`: every candidate engine × precision, its time, fidelity and whether it won."""
    winner = report["winner"]["label"]
    body = []
    for row in report["candidates"]:
        segments = [f["metrics"]["snr_db"] for f in row["fidelity"] if f["kind"] == "segment"]
        e2e = [f["metrics"]["rel_l2"] for f in row["fidelity"] if f["kind"] == "end-to-end"]
        if row["error"]:
            why = row["error"].removeprefix("skipped: ")  # the budget's and memory's say it already
            status = f"[yellow]skipped[/yellow]: {why}"
        elif not row["ok"]:
            status = "[red]beyond budget[/red]"
        else:
            status = "[green]winner[/green]" if row["label"] == winner else "ok"
        body.append(
            [
                row["label"] + ("" if row["budget"] else " (reference)"),
                f"{row['ms_per_step']:.1f}" if row["ms_per_step"] else "-",
                f"{row['speedup']:.2f}x" if row["speedup"] else "-",
                f"{min(segments):.1f}" if segments else "-",
                f"{e2e[0]:.2e}" if e2e else "-",
                status,
            ]
        )
    columns = ("engine", "ms/step", "speedup", "worst segment SNR dB", "end-to-end rel L2", "status")
    return table(title, columns, body, text=("engine", "status"))


def backends_table(rows: list[dict[str, Any]]) -> Table:
    """`backends`: every registered engine, whether it is installed here, and what installs it."""
    body = [
        [r["name"], escape(r["summary"]), "yes" if r["installed"] else "no", escape(r["install"])]
        for r in rows
    ]
    return table(
        "backends",
        ("backend", "what", "installed", "install"),
        body,
        text=("backend", "what", "installed", "install"),
    )


def eval_table(title: str, rows: list[list[str]]) -> Table:
    """`eval`: `evaluation.format_table`'s rows, header first."""
    return table(title, rows[0], rows[1:])


def plan_search_table(title: str, rows: list[dict[str, Any]]) -> Table:
    """`tune --search-plans`: every candidate plan's block forwards, time and quality (the Pareto
    table), whether it is within the budget, on the Pareto front, and the chosen one."""
    body = []
    for r in sorted(rows, key=lambda r: r["seconds_per_image"]):
        ran, most = r["block_forwards_ran"], r["block_forwards"]
        if r["chosen"]:
            status = "[green]chosen[/green]"
        else:
            status = "ok" if r["ok"] else f"[red]outside[/red]: {escape(r['miss'] or '')}"
        body.append(
            [
                r["name"],
                f"{ran:.1f} (≤{most})" if r["adaptive"] else str(most),
                f"{r['seconds_per_image']:.3f}",
                f"{r['delta_acc']:+.3f} ± {r['delta_acc_se']:.3f}",
                f"{r['frechet']:.2f}",
                f"{r['latent_l2']:.3f}",
                "yes" if r["pareto"] else "",
                status,
            ]
        )
    columns = ("plan", "block fwd", "s/img", "Δ acc all", "Fréchet", "latent rel L2", "Pareto", "budget")
    return table(title, columns, body, text=("plan", "Pareto", "budget"))
