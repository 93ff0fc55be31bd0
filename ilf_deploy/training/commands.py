"""`train-feedback`, `train-base` and `eval`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from ..errors import ConfigError

DEFAULT_EVAL_PLANS = "base-20,base-12,base-10,cache-20,ilf-10,ilf-12"


def register(command) -> None:
    from ..cli import console, out, progress

    @command("train-feedback")
    def train_feedback_command(
        model: Annotated[str, typer.Argument(help="Diffusers pipeline directory (PixArt or DiT).")],
        loop: Annotated[
            str | None, typer.Option(help="Inner loop B:E (default: the paper's 8-19 of 28, scaled).")
        ] = None,
        steps: Annotated[int, typer.Option(help="Optimizer steps.")] = 400,
        batch_size: Annotated[int, typer.Option(help="Latents per step.")] = 16,
        lr: Annotated[
            float, typer.Option(help="AdamW learning rate (feedback block and scales only).")
        ] = 5e-4,
        t_post: Annotated[
            str, typer.Option("--t-post", help="t_post rule the student sees (as the plans).")
        ] = "rescale",
        timesteps: Annotated[
            str, typer.Option(help="plan: the ilf plans' feedback steps; uniform.")
        ] = "plan",
        out_dir: Annotated[
            Path | None, typer.Option("--out", help="Where to save (default: MODEL/feedback).")
        ] = None,
        resume: Annotated[bool, typer.Option(help="Continue from the checkpoint in --out.")] = False,
        seed: Annotated[int, typer.Option(help="Seed of data, noise and timesteps.")] = 0,
    ) -> None:
        """Fast Approximate Distillation: the student (backbone + ILF) at t vs the frozen teacher at t/2."""
        from ..loading import load_model
        from ..plan import default_loop, parse_range
        from .feedback import FeedbackTrainConfig, default_out_dir, summary, train_feedback

        with console.status("loading model"):
            loaded = load_model(model)
        chosen = parse_range(loop) if loop else default_loop(loaded.adapter.num_blocks)
        config = FeedbackTrainConfig(
            loop=chosen,
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            t_post=t_post,
            timesteps=timesteps,
            seed=seed,
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
        work: Annotated[Path, typer.Option(help="Checkpoint directory (each stage resumes).")] = Path(
            "/tmp/ilf_train"
        ),
        out_dir: Annotated[Path, typer.Option("--out", help="Pipeline directory to write.")] = Path(
            "default_model"
        ),
        steps: Annotated[int, typer.Option(help="Transformer steps.")] = 3000,
        minutes: Annotated[float | None, typer.Option(help="Stop the transformer stage after this.")] = None,
    ) -> None:
        """Train the shapes text-to-image PixArt (VAE, frozen T5, transformer) from scratch on CPU."""
        from . import base

        stages = ("vae", "latents", "transformer", "save")
        if stage not in (*stages, "all"):
            raise ConfigError(f"unknown stage {stage!r}; choose from {', '.join(stages)}, all")
        work.mkdir(parents=True, exist_ok=True)
        log = work / "train.log"
        run = stages if stage == "all" else (stage,)
        if "vae" in run:
            base.train_vae(work, steps=600, batch=32, lr=2e-3, minutes=None, log=log)
        if "latents" in run:
            base.encode_latents(work, count=8000, log=log)
        if "transformer" in run:
            base.train_transformer(work, steps=steps, batch=48, lr=1e-3, minutes=minutes, log=log)
        if "save" in run:
            console.print(f"saved {base.save_pipeline(work, out_dir)}")

    @command("eval")
    def eval_command(
        model: Annotated[str, typer.Argument(help="A PixArt pipeline directory or a bundle of one.")],
        plans: Annotated[str, typer.Option(help="Comma-separated plans to compare.")] = DEFAULT_EVAL_PLANS,
        n: Annotated[int, typer.Option(help="Prompts (one image each, seed = prompt index).")] = 64,
        reference: Annotated[
            str, typer.Option(help="Plan the fidelity (PSNR, latents) is measured against.")
        ] = "base-20",
        guidance_scale: Annotated[float, typer.Option(help="Classifier-free guidance.")] = 4.5,
        json_out: Annotated[Path | None, typer.Option("--json", help="Write the report as JSON.")] = None,
        grid: Annotated[Path | None, typer.Option(help="Write a PNG grid of samples per plan.")] = None,
    ) -> None:
        """Prompt adherence (attribute classifier), Fréchet distance and fidelity of each plan."""
        from ..evaluation import bundle_backend, evaluate, format_table, save_grid, save_json, torch_backend
        from ..runtime.bundle import is_bundle

        names = [p.strip() for p in plans.split(",") if p.strip()]
        if not names:
            raise ConfigError("no plans to evaluate")
        with console.status("loading model"):
            backend = (bundle_backend if is_bundle(model) else torch_backend)(model, guidance_scale)
        with progress() as bar:
            task = bar.add_task("eval", total=n * len(dict.fromkeys([reference, *names])))
            report = evaluate(
                backend, names, n=n, reference=reference, on_sample=lambda spec, i: bar.advance(task)
            )
        rows = format_table(report)
        table = Table(
            title=f"{model}: n={n}, reference {reference}; real images: accuracy "
            f"{report.real_accuracy:.3f}, Fréchet floor {report.real_frechet:.2f}",
            title_justify="left",
        )
        for column in rows[0]:
            table.add_column(column, justify="left" if column == "plan" else "right")
        for row in rows[1:]:
            table.add_row(*row)
        out.print(table)
        if json_out is not None:
            save_json(report, json_out)
        if grid is not None:
            save_grid(report, grid)
