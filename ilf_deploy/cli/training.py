"""`train-feedback`, `train-base` and `eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ilf_deploy.build.training.recipe import RECIPE
from ilf_deploy.cli import command, console, out, progress
from ilf_deploy.cli.options import Digest, Force, backend_help, pin
from ilf_deploy.cli.paths import image_suffixes, output_dir, output_file
from ilf_deploy.cli.tables import eval_table
from ilf_deploy.core.errors import ConfigError, check_at_least

DEFAULT_EVAL_PLANS = "base-20,base-12,base-10,cache-20,ilf-10,ilf-12"


IMAGE_SIZE_HELP = "Training image size in pixels (default: the model's; Flux: 1024, as diffusers)."


@command("train-feedback")
def train_feedback_command(
    model: Annotated[str, typer.Argument(help="Diffusers pipeline directory (PixArt, DiT, SD3 or Flux).")],
    loop: Annotated[
        str | None, typer.Option(help="Inner loop B:E (default: the paper's 8-19 of 28, scaled).")
    ] = None,
    image_size: Annotated[int | None, typer.Option(help=IMAGE_SIZE_HELP)] = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 400,
    batch_size: Annotated[int, typer.Option(help="Latents per step.")] = 16,
    lr: Annotated[float, typer.Option(help="AdamW learning rate (feedback block and scales only).")] = 5e-4,
    t_post: Annotated[
        str, typer.Option("--t-post", help="t_post rule the student sees (as the plans).")
    ] = "rescale",
    timesteps: Annotated[str, typer.Option(help="plan: the ilf plans' feedback steps; uniform.")] = "plan",
    guidance: Annotated[
        float,
        typer.Option(help="> 1: distil the guided output at this scale (cond and null captions)."),
    ] = 0.0,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Where to save (default: MODEL/feedback).")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --out.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of data, noise and timesteps.")] = 0,
    device: Annotated[
        str, typer.Option(help="Where to train: cpu, cuda, cuda:N (default: cuda if present).")
    ] = "auto",
    force: Force = False,
) -> None:
    """Fast Approximate Distillation: the student (backbone + ILF) at t vs the frozen teacher at t/2."""
    import torch

    from ilf_deploy.build.training.feedback import (
        FeedbackTrainConfig,
        default_out_dir,
        summary,
        train_feedback,
    )
    from ilf_deploy.core.plan import default_loop, parse_range
    from ilf_deploy.model.ilf import FEEDBACK_DIR
    from ilf_deploy.model.loading import load_model

    if out_dir is None and Path(model).is_dir():  # MODEL/feedback, checked before the model loads
        out_dir = Path(model) / FEEDBACK_DIR
    if not resume:  # --resume continues the checkpoint there; a new training replaces it
        output_dir(out_dir, "--out", force=force)
    with console.status("loading model"):
        loaded = load_model(model, with_feedback=False)  # MODEL/feedback may be our own checkpoint
    chosen = parse_range(loop) if loop else default_loop(loaded.adapter.num_blocks)
    config = FeedbackTrainConfig(
        loop=chosen,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        t_post=t_post,
        timesteps=timesteps,
        guidance=guidance,
        seed=seed,
        image_size=image_size,
        device=("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device,
    )
    config.validate(loaded.adapter.num_blocks)
    target = out_dir or default_out_dir(loaded)
    with progress() as bar:
        task = bar.add_task("train-feedback", total=steps)

        def on_step(step: int, loss: float) -> None:
            bar.update(task, completed=step, description=f"train-feedback loss {loss:.4f}")

        _, state = train_feedback(loaded, config, target, resume=resume, on_step=on_step)
    stats = summary(state)
    console.print(
        f"feedback for loop {chosen[0]}:{chosen[1]} → {target} "
        f"(loss {stats['loss_first']:.4f} → {stats['loss_last']:.4f} over {stats['steps']} steps)"
    )


@command("train-base")
def train_base_command(
    stage: Annotated[str, typer.Argument(help="vae, latents, transformer, save or all.")] = "all",
    work: Annotated[Path, typer.Option(help="Checkpoint directory: each stage resumes from it.")] = Path(
        "out/train-base"
    ),
    out_dir: Annotated[Path, typer.Option("--out", help="Pipeline directory the save stage writes.")] = Path(
        "out/default_model"
    ),
    vae_steps: Annotated[int, typer.Option(help="VAE optimizer steps.")] = RECIPE.vae_steps,
    latents: Annotated[int, typer.Option(help="Training images encoded to latents.")] = RECIPE.latents,
    steps: Annotated[int, typer.Option(help="Transformer optimizer steps.")] = RECIPE.steps,
    batch_size: Annotated[int, typer.Option(help="Transformer latents per step.")] = RECIPE.batch,
    lr: Annotated[float, typer.Option(help="Transformer peak learning rate (cosine decay).")] = RECIPE.lr,
    minutes: Annotated[
        float | None, typer.Option(help="Stop a training stage after this long (it checkpoints).")
    ] = None,
    force: Force = False,
) -> None:
    """Train the shapes text-to-image PixArt (VAE, frozen T5, transformer) from scratch on CPU.

    The defaults are the embedded default model's recipe (about 95 minutes on 2 CPU cores).
    """
    from dataclasses import replace

    from ilf_deploy.build.training import base

    stages = ("vae", "latents", "transformer", "save")
    if stage not in (*stages, "all"):
        raise ConfigError(f"unknown stage {stage!r}; choose from {', '.join(stages)}, all")
    for flag, value in [
        ("--vae-steps", vae_steps),
        ("--latents", latents),
        ("--steps", steps),
        ("--batch-size", batch_size),
    ]:
        check_at_least(flag, value)
    if not lr > 0:
        raise ConfigError(f"--lr must be > 0, got {lr}")
    if stage in ("save", "all"):  # before hours of training, not after (--work resumes: no rule)
        output_dir(out_dir, "--out", force=force)
    recipe = replace(RECIPE, vae_steps=vae_steps, latents=latents, steps=steps, batch=batch_size, lr=lr)
    work.mkdir(parents=True, exist_ok=True)
    log = work / "train.log"
    run = stages if stage == "all" else (stage,)
    with progress() as bar:

        def reporter(name: str, total: int):
            task = bar.add_task(name, total=total)
            return lambda done, loss: bar.update(task, completed=done, description=f"{name} loss {loss:.4f}")

        if "vae" in run:
            base.train_vae(work, recipe, minutes=minutes, log=log, on_step=reporter("vae", vae_steps))
        if "latents" in run:
            base.encode_latents(work, count=recipe.latents, log=log)
        if "transformer" in run:
            on_step = reporter("transformer", steps)
            base.train_transformer(work, recipe, minutes=minutes, log=log, on_step=on_step)
    if "save" in run:
        console.print(f"saved {base.save_pipeline(work, out_dir, recipe=recipe)}")


@command("eval")
def eval_command(
    model: Annotated[str, typer.Argument(help="A PixArt pipeline directory or a bundle of one.")],
    plans: Annotated[str, typer.Option(help="Comma-separated plans to compare.")] = DEFAULT_EVAL_PLANS,
    n: Annotated[int, typer.Option(help="Prompts (one image each, seed = prompt index).")] = 64,
    offset: Annotated[
        int,
        typer.Option(help="First prompt index: tune on one range, report on another (e.g. 100000)."),
    ] = 0,
    batch_size: Annotated[
        int, typer.Option(help="Prompts generated together (same images as one at a time).")
    ] = 16,
    reference: Annotated[
        str, typer.Option(help="Plan the fidelity (PSNR, latents) is measured against.")
    ] = "base-20",
    paired_with: Annotated[
        str | None,
        typer.Option(help="Plan the paired accuracy difference is taken against (default: --reference)."),
    ] = None,
    guidance_scale: Annotated[
        float | None, typer.Option(help="Classifier-free guidance (default: the model's, 4.5 PixArt).")
    ] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json-out", help="Write the report as JSON to this file.")
    ] = None,
    grid: Annotated[Path | None, typer.Option(help="Write a PNG grid of samples per plan.")] = None,
    variant: Annotated[
        str | None, typer.Option(help="A bundle's precision variant (e.g. int8_dynamic) to run.")
    ] = None,
    device: Annotated[
        str, typer.Option(help="cpu, cuda, cuda:N: where the torch backend runs (a model directory).")
    ] = "cpu",
    backend: Annotated[
        str | None, typer.Option(help=backend_help("auto for bundles, torch for model directories"))
    ] = None,
    digest: Digest = None,
    force: Force = False,
) -> None:
    """Prompt adherence (attribute classifier), Fréchet distance and fidelity of each plan."""
    pin(model, digest)
    from ilf_deploy.checks.evaluation import (
        bundle_backend,
        evaluate,
        format_table,
        save_grid,
        save_json,
        torch_backend,
    )
    from ilf_deploy.core.runtime.bundle import is_bundle

    names = [p.strip() for p in plans.split(",") if p.strip()]
    if not names:
        raise ConfigError("no plans to evaluate")
    output_file(json_out, "--json-out", (".json",), force=force)
    output_file(grid, "--grid", image_suffixes(), force=force)
    with console.status("loading model"):
        if is_bundle(model):
            from ilf_deploy.cli.generate import announce
            from ilf_deploy.engines.backends.auto import AUTO

            runner = bundle_backend(
                model, guidance_scale, variant=variant, device=device, backend=backend or AUTO
            )
            announce(runner.choice, model, backend)
        elif variant is not None:
            raise ConfigError("--variant needs a bundle (ilf-deploy build, then quantize)")
        elif backend not in (None, "onnxruntime", "torch"):
            raise ConfigError(f"{model} is a model, not a bundle: build one with `ilf-deploy build`")
        else:
            runner = torch_backend(model, guidance_scale, device=device)
    with progress() as bar:
        task = bar.add_task(
            "eval", total=n * len(dict.fromkeys([reference, paired_with or reference, *names]))
        )
        report = evaluate(
            runner,
            names,
            n=n,
            reference=reference,
            offset=offset,
            batch_size=batch_size,
            paired_with=paired_with,
            on_samples=lambda spec, count: bar.advance(task, count),
        )
    title = (
        f"{model}{f' ({variant})' if variant else ''}: n={n}"
        f"{f' from prompt {offset}' if offset else ''}, reference {reference}; "
        f"real images: accuracy {report.real_accuracy:.3f}, Fréchet floor {report.real_frechet:.2f}"
    )
    table = eval_table(title, format_table(report))
    out.print(table)
    if json_out is not None:
        save_json(report, json_out)
    if grid is not None:
        save_grid(report, grid)
