"""Quality of step plans on the shapes dataset: prompt adherence, a Fréchet distance and fidelity.

- An attribute classifier (small CNN, trained on `ilf_deploy.model.data`) reads shape, colour, size,
  position and background off each generated image; accuracy against the prompt's attributes is
  the prompt-adherence score.
- The Fréchet distance between the classifier's penultimate features of generated and real images
  (an FID computed with our own feature extractor; only comparable between runs with the same n).
- Fidelity to the baseline (`reference`, base-20 by default) from the same seeds: image PSNR and
  latent RMSE / relative L2.

Generation goes through `EvalBackend` (plan spec -> StepPlan, and (plan, prompt, seed) -> images), so
an ONNX Runtime bundle can be measured the same way as the PyTorch reference runner.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ilf_deploy.core.errors import ConfigError, ModelLoadError, check_at_least
from ilf_deploy.core.files import make_readable, write_report
from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.model.data import ATTRIBUTES, EVAL_SEED, IMAGE_SIZE, Sample, make_batch, to_tensor_range

if TYPE_CHECKING:
    from ilf_deploy.model.loading import LoadedModel

CLASSIFIER_DIR = Path(__file__).parents[1] / "default_model" / "classifier"
CLASSIFIER_WEIGHTS, CLASSIFIER_CONFIG = "classifier.safetensors", "classifier.json"


# -- the attribute classifier ------------------------------------------------------------------


class AttributeClassifier(nn.Module):
    """4 stride-2 convs (64 -> 4 px) + an MLP to `feature_dim` features + one head per attribute.

    No global pooling: position is one of the attributes.
    """

    def __init__(self, width: int = 32, feature_dim: int = 64) -> None:
        super().__init__()
        chans = [3, width, 2 * width, 2 * width, 4 * width]
        layers: list[nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GroupNorm(8, cout), nn.SiLU()]
        self.convs = nn.Sequential(*layers)
        self.features = nn.Sequential(nn.Flatten(), nn.Linear(4 * width * 16, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(v)) for name, v in ATTRIBUTES.items()})
        self.config = {"width": width, "feature_dim": feature_dim}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """images (B, 3, 64, 64) in [-1, 1] -> (features, {attribute: logits})."""
        feats = self.features(self.convs(images))
        return feats, {name: head(feats) for name, head in self.heads.items()}

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, directory / CLASSIFIER_WEIGHTS)
        make_readable(directory / CLASSIFIER_WEIGHTS)
        (directory / CLASSIFIER_CONFIG).write_text(json.dumps(self.config, indent=2) + "\n")

    @classmethod
    def load(cls, directory: Path = CLASSIFIER_DIR) -> AttributeClassifier:
        from safetensors.torch import load_file

        directory = Path(directory)
        if not (directory / CLASSIFIER_WEIGHTS).is_file():
            raise ModelLoadError(f"no attribute classifier at {directory}")
        model = cls(**json.loads((directory / CLASSIFIER_CONFIG).read_text()))
        model.load_state_dict(load_file(directory / CLASSIFIER_WEIGHTS))
        return model.eval().requires_grad_(False)

    @torch.no_grad()
    def predict(self, images: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """uint8 (B, 64, 64, 3) -> (features (B, F), {attribute: predicted class (B,)})."""
        feats, preds = [], {name: [] for name in ATTRIBUTES}
        for start in range(0, len(images), chunk):
            x = to_tensor_range(images[start : start + chunk])
            if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):  # e.g. the 32 px tiny test models
                x = nn.functional.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear")
            f, logits = self(x)
            feats.append(f.numpy())
            for name in ATTRIBUTES:
                preds[name].append(logits[name].argmax(1).numpy())
        return np.concatenate(feats), {k: np.concatenate(v) for k, v in preds.items()}


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Blur + noise, so that the classifier also reads the softer edges of VAE-decoded samples."""
    blur = torch.rand(len(x), 1, 1, 1, generator=gen) < 0.5
    soft = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    x = torch.where(blur, soft, x)
    return x + 0.05 * torch.rand(len(x), 1, 1, 1, generator=gen) * torch.randn(x.shape, generator=gen)


def train_classifier(
    *,
    count: int = 20000,
    steps: int = 1500,
    batch: int = 128,
    lr: float = 2e-3,
    seed: int = 0,
    log: Callable[[str], None] | None = None,
) -> AttributeClassifier:
    """Train on `count` images of the training split (seed 0), fresh augmentation every step."""
    torch.manual_seed(seed)
    data = make_batch(range(count), seed=0)
    images = to_tensor_range(data.images)
    labels = {k: torch.from_numpy(v) for k, v in data.labels.items()}
    model = AttributeClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(count, (batch,), generator=gen)
        _, logits = model(_augment(images[idx], gen))
        loss = sum(nn.functional.cross_entropy(logits[k], labels[k][idx]) for k in ATTRIBUTES)
        opt.zero_grad(set_to_none=True)
        loss.backward()  # type: ignore[union-attr]
        opt.step()
        sched.step()
        if log is not None and step % 100 == 0:
            log(f"classifier step {step} loss {loss.item():.4f}")  # type: ignore[union-attr]
    return model.eval().requires_grad_(False)


def _right(preds: dict[str, np.ndarray], samples: Sequence[Sample]) -> dict[str, np.ndarray]:
    truth = {name: np.array([s.labels()[name] for s in samples]) for name in ATTRIBUTES}
    return {name: preds[name] == truth[name] for name in ATTRIBUTES}


def _every(right: dict[str, np.ndarray]) -> np.ndarray:
    return np.logical_and.reduce(list(right.values()))


def all_right(preds: dict[str, np.ndarray], samples: Sequence[Sample]) -> np.ndarray:
    """Per sample: is every attribute right?"""
    return _every(_right(preds, samples))


def _standard_error(x: np.ndarray) -> float:
    """Of the mean of `x` over independent samples (prompts)."""
    x = x.astype(np.float64)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def paired_difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """mean(a - b) and its standard error over paired samples (same prompt and seed): tighter
    than the two accuracies' own errors, because most prompts come out alike under both plans."""
    diff = a.astype(np.float64) - b.astype(np.float64)
    return float(diff.mean()), _standard_error(diff)


def attribute_accuracy(preds: dict[str, np.ndarray], samples: Sequence[Sample]) -> dict[str, float]:
    """Per-attribute accuracy plus `all` (every attribute right) and `mean` (of the attributes)."""
    right = _right(preds, samples)
    out = {name: float(r.mean()) for name, r in right.items()}
    every = _every(right)
    out["all"] = float(every.mean())
    out["all_se"] = _standard_error(every)  # what a difference between plans must beat
    out["mean"] = float(np.mean([out[name] for name in ATTRIBUTES]))
    return out


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """||μa - μb||² + Tr(Σa + Σb - 2 (Σa Σb)^½) between two feature sets (rows = samples)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((Σa Σb)^½) = Σ sqrt(eig(Σa Σb)); the eigenvalues are real and >= 0 up to rounding.
    eig = np.linalg.eigvals(cov_a @ cov_b)
    tr_sqrt = np.sqrt(np.clip(eig.real, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """PSNR of two uint8 images. Identical images score as if one value differed by one level
    (the finest difference 8 bits can show), so that a mean over images stays finite when an
    adaptive plan leaves some images exactly as the reference made them."""
    mse = float(((a.astype(np.float64) - b.astype(np.float64)) ** 2).mean())
    return 10 * np.log10(255.0**2 / max(mse, 1.0 / a.size))


# -- generation backends -----------------------------------------------------------------------


@dataclass
class Generated:
    image: np.ndarray  # uint8 (H, W, 3)
    latents: np.ndarray | None = None  # final latents (C, h, w), for latent fidelity
    block_forwards: int | None = None  # that ran for this image (adaptive plans decide at run time)


def _generated(gen: Any, latents: Any) -> list[Generated]:
    """A generator's last batch as `Generated`, with the block forwards each image ran."""
    images, host = gen.decode(latents), gen.latents_to_numpy(latents)
    ran = list(gen.last_block_forwards) or [None] * len(images)
    return [Generated(image, lat, count) for image, lat, count in zip(images, host, ran)]


@dataclass
class EvalBackend:
    """What the evaluator needs from a runtime: plans by name, and samples for (prompts, seeds).

    A batch must give what one request at a time gives (each image starts from its own seeded noise)."""

    name: str
    resolve: Callable[[str], StepPlan]
    generate: Callable[[StepPlan, list[str], list[int]], list[Generated]]
    info: dict[str, Any] = field(default_factory=dict)
    choice: str | None = None  # `--backend auto`: which engine it chose, and why (one line)


def torch_backend(
    source: str | Path | LoadedModel,
    guidance_scale: float | None = None,  # None: the model's default (Generator.resolve)
    negative_prompt: str = "",
    device: str = "cpu",
) -> EvalBackend:
    """The PyTorch reference runner (a model directory, or a model already loaded) as an `EvalBackend`."""
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.engines.backends.pytorch import TorchGenerator
    from ilf_deploy.model.loading import LoadedModel, load_model

    model = source if isinstance(source, LoadedModel) else load_model(source)
    if model.architecture == "dit":
        raise ConfigError("eval needs a text-to-image (PixArt) model: the shapes prompts are text")
    gen = TorchGenerator(model, device)

    def generate(plan: StepPlan, prompts: list[str], seeds: list[int]) -> list[Generated]:
        requests = [
            Request(prompt=p, negative_prompt=negative_prompt, guidance_scale=guidance_scale, seed=s)
            for p, s in zip(prompts, seeds)
        ]
        return _generated(gen, gen.generate_batch(plan, requests))

    info = {
        "model": str(model.source),
        "guidance_scale": gen.resolve(Request(guidance_scale=guidance_scale)).guidance_scale,
        "num_blocks": model.adapter.num_blocks,
        "device": device,
    }
    return EvalBackend("torch", model.resolve_plan, generate, info)


def bundle_backend(
    bundle_dir: str | Path | Bundle,
    guidance_scale: float | None = None,  # None: the model's default (Generator.resolve)
    negative_prompt: str = "",
    variant: str | None = None,
    device: str = "cpu",  # the torch backend's; the others choose their own
    backend: str = "onnxruntime",
) -> EvalBackend:
    """A bundle on any registered backend as an `EvalBackend` (its bundled plans only), optionally a
    precision variant."""
    from ilf_deploy.core.runtime.generator import Request
    from ilf_deploy.engines.backends import open_generator

    gen = open_generator(bundle_dir, backend, variant=variant, device=device)
    if gen.facts.architecture == "dit":
        raise ConfigError("eval needs a text-to-image (PixArt) model: the shapes prompts are text")

    def generate(plan: StepPlan, prompts: list[str], seeds: list[int]) -> list[Generated]:
        requests = [
            Request(prompt=p, negative_prompt=negative_prompt, guidance_scale=guidance_scale, seed=s)
            for p, s in zip(prompts, seeds)
        ]
        return _generated(gen, gen.generate_batch(plan, requests))

    guidance = gen.resolve(Request(guidance_scale=guidance_scale)).guidance_scale
    bundle = gen.opened_bundle()  # the one open_generator loaded (hashes checked), or was handed
    info = {"bundle": str(bundle.path), "guidance_scale": guidance, "variant": gen.variant}
    return EvalBackend(gen.backend, lambda spec: bundle_plan(bundle, spec, info), generate, info, gen.choice)


def bundle_plan(bundle: Bundle, spec: str, info: dict[str, Any] | None = None) -> StepPlan:
    """The plan `spec` names (backends.plans: a bundled plan, auto, a plan file, a preset the
    bundle's segments cover); `info["auto_plan"]` says which plan `auto` chose, and why."""
    from ilf_deploy.engines.backends.plans import resolve_bundle_plan

    def say(reason: str) -> None:
        if info is not None:
            info["auto_plan"] = reason

    return resolve_bundle_plan(bundle, spec, say)


# -- the evaluation ------------------------------------------------------------------------------


@dataclass
class PlanResult:
    plan: str
    block_forwards: int
    speedup: float
    seconds_per_image: float
    accuracy: dict[str, float]
    frechet: float
    psnr: float | None = None
    latent_rmse: float | None = None
    latent_rel_l2: float | None = None
    all_right: list[int] = field(default_factory=list, repr=False)  # per prompt, for paired statistics
    delta_all: float | None = None  # `all` accuracy minus the paired plan's, same prompts and seeds
    delta_all_se: float | None = None
    name: str = ""  # the plan's own name, where `plan` (the spec asked for) differs: auto, a file
    block_forwards_ran: float | None = None  # mean per image as run (an adaptive plan's <= the most)


@dataclass
class EvalReport:
    results: list[PlanResult]
    n: int
    reference: str
    real_frechet: float  # real vs real (another split): the floor of the Fréchet distance at this n
    real_accuracy: float  # classifier `all` accuracy on real eval images
    offset: int = 0  # first prompt index (= seed) of the split
    paired_with: str = ""  # the plan `delta_all` is measured against
    info: dict[str, Any] = field(default_factory=dict)
    images: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n": self.n,
            "offset": self.offset,
            "paired_with": self.paired_with,
            "reference": self.reference,
            "real_frechet": self.real_frechet,
            "real_accuracy": self.real_accuracy,
            "info": self.info,
            "results": [r.__dict__ for r in self.results],
        }


def eval_prompts(n: int, offset: int = 0, seed: int = EVAL_SEED) -> list[Sample]:
    """Eval-split prompts `offset`..`offset + n - 1` (disjoint from the training split's seed)."""
    return make_batch(range(offset, offset + n), seed).samples


def _check_eval_options(n: int, offset: int, batch_size: int, plans: Sequence[str]) -> None:
    if n < 2:
        raise ConfigError(f"--n must be >= 2 (the Fréchet distance needs a covariance), got {n}")
    check_at_least("--offset", offset, 0)
    check_at_least("--batch-size", batch_size)
    if not plans:
        raise ConfigError("no plans to evaluate")


def _fidelity_to_reference(result: PlanResult, got: list[Generated], ref: list[Generated]) -> None:
    """PSNR of the images and RMSE / relative L2 of the latents against the reference plan's."""
    result.psnr = float(np.mean([psnr(g.image, r.image) for g, r in zip(got, ref)]))
    pairs = [(g.latents, r.latents) for g, r in zip(got, ref) if g.latents is not None]
    if pairs:
        result.latent_rmse = float(np.mean([np.sqrt(((a - b) ** 2).mean()) for a, b in pairs]))
        result.latent_rel_l2 = float(
            np.mean([np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12) for a, b in pairs])
        )


def _plan_result(
    spec: str, plans: dict[str, StepPlan], reference: str, got: list[Generated], seconds: float
) -> PlanResult:
    """A plan's row before scoring: its block forwards (planned, and as run) and time."""
    plan = plans[spec]
    ran = [g.block_forwards for g in got if g.block_forwards is not None]
    return PlanResult(
        plan=spec,
        block_forwards=plan.block_forwards,
        speedup=plans[reference].block_forwards / (float(np.mean(ran)) if ran else plan.block_forwards),
        seconds_per_image=seconds,
        accuracy={},
        frechet=float("nan"),
        name=plan.name,
        block_forwards_ran=float(np.mean(ran)) if ran else None,
    )


def evaluate(
    backend: EvalBackend,
    plans: Sequence[str],
    *,
    n: int = 64,
    reference: str = "base-20",
    classifier: AttributeClassifier | None = None,
    real_count: int = 2000,
    offset: int = 0,
    batch_size: int = 16,
    paired_with: str | None = None,
    on_samples: Callable[[str, int], None] | None = None,  # (plan, how many just finished)
) -> EvalReport:
    """Generate one image per (plan, prompt i, seed i) for eval-split prompts offset..offset+n-1.

    A different `offset` gives prompts and seeds no earlier run saw: tune on one range, report on
    another."""
    _check_eval_options(n, offset, batch_size, plans)
    classifier = classifier or AttributeClassifier.load()
    paired_with = paired_with or reference
    plan_objs = {spec: backend.resolve(spec) for spec in dict.fromkeys([reference, paired_with, *plans])}
    held = make_batch(range(offset, offset + n), EVAL_SEED)  # = eval_prompts(n, offset), with images
    samples = held.samples
    prompts = [s.caption(0) for s in samples]
    # Real statistics from a split the prompts do not come from, plus a real-vs-real floor.
    real = make_batch(range(real_count), EVAL_SEED + 1)
    real_feats, _real_preds = classifier.predict(real.images)
    held_feats, held_preds = classifier.predict(held.images)
    outputs: dict[str, list[Generated]] = {}
    seconds: dict[str, float] = {}
    for spec, plan in plan_objs.items():
        start = time.perf_counter()
        outputs[spec] = []
        for first in range(0, n, batch_size):  # batched: CPU GEMMs are far faster on many rows
            chunk = prompts[first : first + batch_size]
            seeds = list(range(offset + first, offset + first + len(chunk)))
            outputs[spec] += backend.generate(plan, chunk, seeds)
            if on_samples is not None:
                on_samples(spec, len(chunk))
        seconds[spec] = (time.perf_counter() - start) / n
    scored = {spec: classifier.predict(np.stack([g.image for g in outputs[spec]])) for spec in plan_objs}
    paired = all_right(scored[paired_with][1], samples)
    results = []
    for spec in plans:
        feats, preds = scored[spec]
        result = _plan_result(spec, plan_objs, reference, outputs[spec], seconds[spec])
        result.accuracy, result.frechet = (
            attribute_accuracy(preds, samples),
            frechet_distance(feats, real_feats),
        )
        right = all_right(preds, samples)
        result.all_right = right.astype(int).tolist()
        if spec != paired_with:
            result.delta_all, result.delta_all_se = paired_difference(right, paired)
        if spec != reference:
            _fidelity_to_reference(result, outputs[spec], outputs[reference])
        results.append(result)
    return EvalReport(
        results=results,
        n=n,
        offset=offset,
        reference=reference,
        paired_with=paired_with,
        real_frechet=frechet_distance(held_feats, real_feats),
        real_accuracy=attribute_accuracy(held_preds, samples)["all"],
        info={**backend.info, "backend": backend.name, "prompts": prompts[:4]},
        images={spec: np.stack([g.image for g in outputs[spec]]) for spec in plans},
    )


def plan_quality(
    bundle_dir: str | Path | Bundle,
    backend: str = "auto",
    batch_size: int = 16,
    classifier: AttributeClassifier | None = None,
    on_samples: Callable[[str, int], None] | None = None,
) -> Callable[[dict[str, StepPlan], str, int, int], dict[str, dict[str, float]]]:
    """`eval` as the plan search's quality measure (tuning.QualityFn): every candidate on prompts
    first..first+count-1, paired against the reference plan, on `backend` (auto: tune's winner)."""
    runner = bundle_backend(bundle_dir, backend=backend)

    def measure(
        plans: dict[str, StepPlan], reference: str, first: int, count: int
    ) -> dict[str, dict[str, float]]:
        report = evaluate(
            EvalBackend(runner.name, plans.__getitem__, runner.generate, runner.info),
            list(plans),
            n=count,
            reference=reference,
            paired_with=reference,
            offset=first,
            batch_size=batch_size,
            classifier=classifier,
            on_samples=on_samples,
        )
        return {
            r.plan: {
                "acc": r.accuracy["all"],
                "delta_acc": r.delta_all or 0.0,
                "delta_acc_se": r.delta_all_se or 0.0,
                "frechet": r.frechet,
                "latent_l2": r.latent_rel_l2 or 0.0,
                "block_forwards": r.block_forwards_ran
                if r.block_forwards_ran is not None
                else r.block_forwards,
            }
            for r in report.results
        }

    return measure


def format_table(report: EvalReport) -> list[list[str]]:
    """Rows (header first) for printing: one per plan."""
    header = [
        "plan",
        "block fwd",
        "speedup",
        "s/img",
        "acc all",
        f"Δ acc all vs {report.paired_with}",
        "acc mean",
        "Fréchet",
        "PSNR",
        "latent rel L2",
    ]
    rows = [header]
    for r in report.results:
        ran = r.block_forwards_ran
        rows.append(
            [
                r.plan if r.name in ("", r.plan) else f"{r.plan} = {r.name}",
                str(r.block_forwards)
                if ran in (None, r.block_forwards)
                else f"{ran:.1f} (≤{r.block_forwards})",
                f"{r.speedup:.2f}x",
                f"{r.seconds_per_image:#.3g}",  # 3 significant digits: GPUs take milliseconds
                f"{r.accuracy['all']:.3f} ± {r.accuracy['all_se']:.3f}",
                "-" if r.delta_all is None else f"{r.delta_all:+.3f} ± {r.delta_all_se:.3f}",
                f"{r.accuracy['mean']:.3f}",
                f"{r.frechet:.2f}",
                "-" if r.psnr is None else f"{r.psnr:.2f}",
                "-" if r.latent_rel_l2 is None else f"{r.latent_rel_l2:.3f}",
            ]
        )
    return rows


def save_json(report: EvalReport, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_report(path, report.to_dict())


def save_grid(report: EvalReport, path: Path, columns: int = 8) -> None:
    """One row of the first `columns` samples per plan (same prompts and seeds down each column)."""
    from PIL import Image, ImageDraw

    label_w, pad = 72, 2
    rows = []
    for spec, images in report.images.items():
        tiles = list(images[:columns])
        h, w = tiles[0].shape[:2]
        row = np.full((h, label_w + len(tiles) * (w + pad), 3), 255, np.uint8)
        for j, tile in enumerate(tiles):
            x = label_w + j * (w + pad)
            row[:, x : x + w] = tile
        img = Image.fromarray(row)
        ImageDraw.Draw(img).text((4, h // 2 - 6), spec, fill=(0, 0, 0))
        rows.append(np.asarray(img))
    width = max(r.shape[1] for r in rows)
    grid = np.concatenate(
        [np.pad(r, ((0, pad), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)
