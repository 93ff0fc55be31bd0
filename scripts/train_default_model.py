"""Train the embedded default model (ilf_deploy/default_model) on CPU, stage by stage.

    python scripts/train_default_model.py all --work /tmp/ilf_train --out ilf_deploy/default_model

Each stage checkpoints into --work and resumes from there, so a killed run loses at most 100 steps.
The feedback and the evaluation classifier are trained by `ilf-deploy train-feedback` and
`scripts/train_classifier.py`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ilf_deploy.training import base

STAGES = ("vae", "latents", "transformer", "save")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=(*STAGES, "all"))
    p.add_argument("--work", type=Path, default=Path("/tmp/ilf_train"))
    p.add_argument("--out", type=Path, default=Path("ilf_deploy/default_model"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--vae-batch", type=int, default=16)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-minutes", type=float, default=None)
    p.add_argument("--latents", type=int, default=20000)
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--minutes", type=float, default=None, help="stop the transformer stage after this long")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.work / "train.log"
    stages = STAGES if args.stage == "all" else (args.stage,)
    if "vae" in stages:
        base.train_vae(
            args.work,
            steps=args.vae_steps,
            batch=args.vae_batch,
            lr=args.vae_lr,
            minutes=args.vae_minutes,
            log=log,
        )
    if "latents" in stages:
        base.encode_latents(args.work, count=args.latents, log=log)
    if "transformer" in stages:
        base.train_transformer(
            args.work, steps=args.steps, batch=args.batch, lr=args.lr, minutes=args.minutes, log=log
        )
    if "save" in stages:
        print(base.save_pipeline(args.work, args.out))


if __name__ == "__main__":
    main()
