"""Train the evaluation's attribute classifier and write it to ilf_deploy/default_model/classifier.

python scripts/train_classifier.py [--steps 1500] [--out ilf_deploy/default_model/classifier]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ilf_deploy.checks.evaluation import CLASSIFIER_DIR, attribute_accuracy, train_classifier
from ilf_deploy.model.data import EVAL_SEED, make_batch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--count", type=int, default=20000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=CLASSIFIER_DIR)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = train_classifier(count=args.count, steps=args.steps, log=print)
    held = make_batch(range(2000), EVAL_SEED + 2)
    _, preds = model.predict(held.images)
    print("held-out accuracy", attribute_accuracy(preds, held.samples))
    model.save(args.out)
    print("saved", args.out)


if __name__ == "__main__":
    main()
