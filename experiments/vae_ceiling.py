"""How much prompt accuracy the default model's VAE alone allows: the attribute classifier on real
eval images and on their VAE reconstructions (encode -> decode, no diffusion).

    python -m experiments.vae_ceiling --n 1024 --offset 200000
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ilf_deploy.checks.evaluation import AttributeClassifier, attribute_accuracy
from ilf_deploy.model.data import EVAL_SEED, make_batch, to_tensor_range
from ilf_deploy.model.loading import load_model


@torch.no_grad()
def reconstruct(vae, images: np.ndarray, chunk: int = 128) -> np.ndarray:
    out = []
    for start in range(0, len(images), chunk):
        x = to_tensor_range(images[start : start + chunk])
        decoded = vae.decode(vae.encode(x).latent_dist.mean).sample
        out.append(((decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).round())
    return np.concatenate(out).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--offset", type=int, default=200000)
    args = parser.parse_args()
    model = load_model(args.model, with_feedback=False)
    classifier = AttributeClassifier.load()
    real = make_batch(range(args.offset, args.offset + args.n), EVAL_SEED)  # the eval split's images
    samples = real.samples  # the prompts eval_prompts(n, offset) gives
    for name, images in (("real", real.images), ("vae reconstruction", reconstruct(model.vae, real.images))):
        accuracy = attribute_accuracy(classifier.predict(images)[1], samples)
        print(f"{name:>18}: " + ", ".join(f"{k} {v:.3f}" for k, v in accuracy.items()))


if __name__ == "__main__":
    main()
