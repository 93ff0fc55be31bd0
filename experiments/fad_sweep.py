"""Sweep Fast Approximate Distillation settings for the default model's feedback (issue 4).

Each variant trains a feedback module from scratch on `--device` and is scored on dev prompts
(`--offset`, never the held-out range the README reports) by `ilf_deploy.checks.evaluation.evaluate`:
ILF-10's accuracy against base-12 (paired, same prompts and seeds) and its Fréchet distance.

    python -m experiments.fad_sweep --device cuda --n 2048 --json out/sweep.json [VARIANT ...]

Written for a GPU (a variant is about a minute there); on 2 CPU cores use one variant and small n.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from ilf_deploy.build.training.feedback import FeedbackTrainConfig, train_feedback
from ilf_deploy.checks.evaluation import AttributeClassifier, evaluate, torch_backend
from ilf_deploy.model.loading import load_model

# The committed recipe (Makefile FEEDBACK_RECIPE) and the changes each variant makes to it.
RECIPE = FeedbackTrainConfig(loop=(3, 5), steps=800, batch_size=32, lr=1e-3, t_post="uniform")
VARIANTS: dict[str, dict[str, Any]] = {
    "recipe": {},
    "recipe-seed1": {"seed": 1},
    "guided": {"guidance": 4.5},
    "distill-only": {"recon_weight": 0.0},
    "recon-only": {"distill_weight": 0.0},
    "dropout-0.5": {"caption_dropout": 0.5},
    "loop-2:4": {"loop": (2, 4)},
    "loop-4:6": {"loop": (4, 6)},
    "rescale": {"t_post": "rescale"},
    "anneal": {"t_post": "anneal"},
    "batch-128": {"batch_size": 128},
    "uniform-t": {"timesteps": "uniform"},
    "steps-3000": {"steps": 3000},
    "lr-3e-4": {"lr": 3e-4},
    "guided-3000": {"guidance": 4.5, "steps": 3000},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("variants", nargs="*", default=list(VARIANTS), help="names from VARIANTS")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--offset", type=int, default=100000, help="dev prompts (README reports 200000+)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, help="override every variant's FAD steps (smoke tests)")
    parser.add_argument("--no-baselines", action="store_true", help="skip scoring base-12 and base-10")
    parser.add_argument("--json", type=Path, default=Path("out/fad_sweep.json"))
    args = parser.parse_args()
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {', '.join(VARIANTS)}")

    classifier = AttributeClassifier.load()
    rows: list[dict[str, Any]] = []

    def score(model, plans: list[str]) -> dict[str, dict[str, Any]]:
        backend = torch_backend(model, device=args.device)
        report = evaluate(
            backend,
            plans,
            n=args.n,
            offset=args.offset,
            reference="base-12",
            batch_size=args.batch_size,
            classifier=classifier,
        )
        return {
            r.plan: {
                "acc_all": r.accuracy["all"],
                "acc_mean": r.accuracy["mean"],
                "delta_vs_base12": r.delta_all,
                "delta_se": r.delta_all_se,
                "frechet": r.frechet,
                "block_forwards": r.block_forwards,
            }
            for r in report.results
        }

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"n": args.n, "offset": args.offset, "rows": rows}, indent=2) + "\n")

    if not args.no_baselines:
        start = time.perf_counter()
        baselines = score(load_model(args.model, with_feedback=False), ["base-12", "base-10"])
        rows.append({"variant": "baselines", "scores": baselines, "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
        save()
    for name in args.variants:
        start = time.perf_counter()
        config = replace(RECIPE, device=args.device, **VARIANTS[name])
        if args.steps is not None:
            config = replace(config, steps=args.steps)
        model = load_model(args.model, with_feedback=False)
        with tempfile.TemporaryDirectory() as tmp:
            feedback, state = train_feedback(model, config, Path(tmp))
        model.feedback = feedback
        trained = time.perf_counter() - start
        scores = score(model, ["ilf-10", "ilf-12"])
        rows.append(
            {
                "variant": name,
                "config": {k: v for k, v in asdict(config).items() if k != "device"},
                "loss_last": sum(state.losses[-20:]) / len(state.losses[-20:]),
                "scores": scores,
                "train_seconds": trained,
                "seconds": time.perf_counter() - start,
            }
        )
        print(json.dumps({k: rows[-1][k] for k in ("variant", "scores", "train_seconds")}), flush=True)
        save()


if __name__ == "__main__":
    main()
