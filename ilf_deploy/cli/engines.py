"""CLI commands for calibration, quantized variants and TensorRT engines.

The TensorRT commands (build-engines, verify-engines) were never run in this project's CI: it has
no GPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ilf_deploy.cli import command, console, finish_checks, out, progress
from ilf_deploy.cli.options import ChecksJson, Digest, Force, load_bundle, pin
from ilf_deploy.cli.paths import output_file, refuse_existing
from ilf_deploy.cli.tables import checks_table


@command("calibrate")
def calibrate(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    prompts: Annotated[
        Path | None, typer.Option(help="Text file, one prompt per line (default: 8 built-in prompts).")
    ] = None,
    plan: Annotated[
        str | None, typer.Option("--plan", "-p", help="Bundled plan to run (default: its ILF plan).")
    ] = None,
    max_samples: Annotated[
        int, typer.Option(help="Samples kept per segment and conditioning (t, t_post).")
    ] = 32,
    digest: Digest = None,
    force: Annotated[bool, typer.Option(help="Replace the bundle's calibration record.")] = False,
) -> None:
    """Record every transformer segment's inputs along real trajectories (for int8/fp8 Q/DQ)."""
    pin(bundle, digest)
    from ilf_deploy.build.quantization.calibration import CALIBRATION_DIR, collect_calibration
    from ilf_deploy.core.errors import ConfigError

    if _in_bundle(bundle).manifest.calibration is not None:
        refuse_existing("BUNDLE", [Path(bundle) / CALIBRATION_DIR], force)

    texts = None
    if prompts is not None:
        try:
            texts = [line.strip() for line in prompts.read_text("utf-8").splitlines() if line.strip()]
        except OSError as exc:
            raise ConfigError(f"cannot read prompts {prompts}: {exc}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"--prompts {prompts} is not UTF-8 text (one prompt per line)") from None
        if not texts:
            raise ConfigError(f"{prompts} has no prompts")
    with progress() as bar:
        task = bar.add_task("calibrate", total=None)
        record = collect_calibration(
            bundle,
            plan,
            texts,
            max_samples=max_samples,
            progress=lambda s: bar.update(task, description=s),
        )
    samples = sum(s["samples"] for s in record["segments"].values())
    console.print(
        f"calibration: {record['requests']} {record['plan']} trajectories, {samples} samples over "
        f"{len(record['segments'])} segments → {bundle}/calibration/"
    )


@command("quantize")
def quantize(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory (fp32).")],
    mode: Annotated[
        str,
        typer.Option(
            help="int8-dynamic (ORT CPU's fast path), int8-qdq (symmetric Q/DQ for TensorRT), "
            "fp8-qdq (E4M3 Q/DQ for H100 TensorRT; emulated on ORT CPU), int8-ov (NNCF, for "
            "--backend openvino), bf16 (OpenVINO bf16 on the segments within budget on their own)."
        ),
    ],
    name: Annotated[
        str | None, typer.Option(help="Variant name (default: the mode, e.g. int8_dynamic).")
    ] = None,
    calibration_method: Annotated[
        str, typer.Option(help="minmax, percentile or entropy (int8-qdq; fp8 uses ORT's distribution).")
    ] = "minmax",
    digest: Digest = None,
    keep_failing: Annotated[
        bool,
        typer.Option(
            "--keep-failing",
            help="Keep a variant that misses its budget (exit 0); without it, such a variant is "
            "removed again and quantize exits 1.",
        ),
    ] = False,
    force: Annotated[bool, typer.Option(help="Replace a variant of the same name.")] = False,
) -> None:
    """Add a precision variant (every block segment's attention/FF linear layers), then check it.

    The check is verify-variant's (compare.BUDGETS); a variant beyond its budget is removed again
    and quantize exits 1, unless --keep-failing."""
    pin(bundle, digest)
    from ilf_deploy.build.quantization.quantize import default_variant_name, quantize_bundle

    if (name or default_variant_name(mode)) in _in_bundle(bundle).manifest.variants:
        refuse_existing("--name", [f"{name or default_variant_name(mode)} (a variant of {bundle})"], force)

    with progress() as bar:
        task = bar.add_task("quantize", total=None)
        entry = quantize_bundle(
            bundle, mode, name, calibration_method, lambda s: bar.update(task, description=s)
        )
    layers = sum(entry["quantized_layers"].values())
    variant = name or default_variant_name(mode)
    what = f"{layers} MatMuls quantized in {len(entry['segments'])} segments ({mode})"
    if mode == "bf16":
        kept = entry["precision_policy"]["f32"]
        what = f"{len(entry['segments'])} segments in bf16, kept f32: {', '.join(kept) or 'none'}"
        for segment, why in kept.items():
            console.print(f"  {segment} stays f32: {why}")
    console.print(f"variant {variant!r}: {what}")
    _check_new_variant(bundle, variant, keep_failing)


def _in_bundle(path: Path):
    """The bundle at `path` as far as the --force rule needs it (its manifest); the command then
    loads it whole."""

    return load_bundle(path, verify_hashes=False)


def _check_new_variant(bundle: Path, variant: str, keep_failing: bool) -> None:
    """verify-variant's checks on the new variant: one line, and exit 1 (the variant removed
    again) when it misses its budget, unless --keep-failing."""
    from ilf_deploy.build.quantization.quantize import miss_line, remove_variant, verify_variant

    loaded = load_bundle(bundle)
    with progress() as bar:
        task = bar.add_task("verify", total=None)
        rows = verify_variant(loaded, variant, progress=lambda s: bar.update(task, description=s))
    miss = miss_line(variant, rows)
    details = f"`ilf-deploy verify-variant {bundle} --variant {variant}` shows every check"
    if miss is None:
        console.print(f"variant {variant!r} is within its budget ({len(rows)} checks); {details}")
    elif keep_failing:
        console.print(
            f"[yellow]warning:[/yellow] {miss}; kept (--keep-failing): tune never picks it; {details}"
        )
    else:
        remove_variant(loaded.path, variant)
        console.print(f"[red]error:[/red] {miss}; removed it again (keep it with --keep-failing)")
        raise typer.Exit(1)


@command("verify-variant")
def verify_variant_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    variant: Annotated[str, typer.Option(help="The precision variant to check against fp32.")],
    plan: Annotated[str | None, typer.Option("--plan", "-p", help="Plan (default: the ILF plan).")] = None,
    as_json: ChecksJson = None,
    digest: Digest = None,
    force: Force = False,
) -> None:
    """Per-segment SNR/cosine on a held-out trajectory and end-to-end latents vs fp32 (ORT CPU).

    Exits 1 when a check is beyond the budget of the variant's mode on its engine (compare.BUDGETS)."""
    from ilf_deploy.build.quantization.quantize import variant_budget, variant_engine, verify_variant

    output_file(as_json, "--json-out", (".json",), force=force)
    loaded = load_bundle(bundle, digest)
    limits = variant_budget(loaded, variant)  # an unknown variant fails here, before the work
    with progress() as bar:
        task = bar.add_task("verify", total=None)
        rows = verify_variant(loaded, variant, plan, progress=lambda s: bar.update(task, description=s))
    mode = loaded.variant_spec(variant).mode
    title = (
        f"{bundle}: variant {variant} ({mode}, on {variant_engine(loaded, variant)}) vs fp32 on ONNX "
        f"Runtime CPU; budget: {limits}"
    )
    out.print(checks_table(title, rows))
    finish_checks(rows, as_json)


@command("build-engines")
def build_engines_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.")],
    variant: Annotated[str | None, typer.Option(help="Build the engines of this precision variant.")] = None,
    segments: Annotated[str | None, typer.Option(help="Comma-separated segments (default: all).")] = None,
    opt_level: Annotated[int, typer.Option(help="Builder optimization level 0..5.")] = 3,
    workspace_gb: Annotated[float, typer.Option(help="Workspace memory pool limit (GiB).")] = 8.0,
    max_batch: Annotated[
        int | None, typer.Option(help="Images per call (default: the bundle's); guidance doubles it.")
    ] = None,
    tf32: Annotated[bool, typer.Option(help="Allow TF32 for fp32 layers.")] = True,
    force: Annotated[bool, typer.Option(help="Rebuild existing engines.")] = False,
    digest: Digest = None,
) -> None:
    """Build TensorRT engines (strongly typed, one profile from the manifest) into BUNDLE/engines/.

    Needs an NVIDIA GPU, TensorRT 10/11 and Polygraphy (the `tensorrt` extra). Never run in CI."""
    pin(bundle, digest)
    from ilf_deploy.engines.backends.tensorrt import build_engines

    names = [s.strip() for s in segments.split(",") if s.strip()] if segments else None
    with progress() as bar:
        task = bar.add_task("engines", total=None)

        def report(name: str, index: int, total: int) -> None:
            bar.update(task, description=f"engine {name}", completed=index, total=total)

        entry = build_engines(bundle, variant, names, opt_level, workspace_gb, max_batch, tf32, force, report)
    console.print(
        f"{len(entry['segments'])} engines for {variant or 'base'} on {entry['gpu']} "
        f"(sm {entry['compute_capability']}, TensorRT {entry['tensorrt']}) → {bundle}/engines/"
    )


@command("verify-engines")
def verify_engines_command(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory with engines.")],
    variant: Annotated[str | None, typer.Option(help="Engines of this precision variant.")] = None,
    plan: Annotated[str | None, typer.Option("--plan", "-p", help="Plan (default: the ILF plan).")] = None,
    cuda_graphs: Annotated[bool, typer.Option(help="Run the TensorRT side with CUDA graphs.")] = False,
    as_json: ChecksJson = None,
    digest: Digest = None,
    force: Force = False,
) -> None:
    """TensorRT vs ONNX Runtime (fp32): each segment on trajectory feeds, then the plan end to end.

    Needs an NVIDIA GPU and TensorRT. Never run in CI. Exits 1 beyond the budget."""
    verify_tensorrt(bundle, variant, plan, cuda_graphs, as_json, digest, force=force)


def verify_tensorrt(
    bundle: Path,
    variant: str | None,
    plan: str | None,
    cuda_graphs: bool,
    as_json: Path | None,
    digest: str | None = None,
    *,
    force: bool,
) -> None:
    """`verify-engines` (and `verify --backend tensorrt`): print the table, exit 1 beyond budget."""
    from ilf_deploy.checks.verify.engines import engines_budget, verify_engines

    output_file(as_json, "--json-out", (".json",), force=force)
    loaded = load_bundle(bundle, digest)
    limits = engines_budget(loaded, variant)
    with progress() as bar:
        task = bar.add_task("verify", total=None)
        rows = verify_engines(
            loaded, variant, plan, cuda_graphs, progress=lambda s: bar.update(task, description=s)
        )
    title = f"{bundle}: TensorRT ({variant or 'base'}) vs ONNX Runtime fp32; budget: {limits}"
    out.print(checks_table(title, rows))
    finish_checks(rows, as_json)
