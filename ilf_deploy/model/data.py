"""A deterministic captioned-shapes dataset: 64×64 RGB images of one coloured shape on a plain
background, with the attributes kept as integer labels (for training the evaluation classifier).

Item `i` of a dataset with seed `s` is drawn from `numpy.random.default_rng([s, i])`, so any item
can be regenerated alone and every run sees the same data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle", "diamond")
COLORS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("white", "black", "gray", "blue", "yellow")
SIZES = ("small", "large")
POSITIONS = (
    "top left",
    "top",
    "top right",
    "left",
    "center",
    "right",
    "bottom left",
    "bottom",
    "bottom right",
)
# Every labelled attribute and its class names, in the classifier's head order.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "color": COLORS,
    "size": SIZES,
    "position": POSITIONS,
    "background": BACKGROUNDS,
}
RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 215, 40),
    "purple": (140, 60, 190),
    "orange": (245, 135, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
}
_RADIUS = {"small": 8.0, "large": 14.0}
_GRID = (16.0, 32.0, 48.0)  # 3×3 position grid centres in pixels
_SUPERSAMPLE = 4  # anti-aliased edges: render at 4× and box-filter down
# Several phrasings so that the text encoder sees word order vary; the first is the canonical one.
TEMPLATES = (
    "a {size} {color} {shape} {where} on a {background} background",
    "{size} {color} {shape} {where}, {background} background",
    "a {color} {shape}, {size}, {where} on a {background} background",
)


@dataclass(frozen=True)
class Sample:
    shape: str
    color: str
    size: str
    position: str
    background: str

    def labels(self) -> dict[str, int]:
        return {name: ATTRIBUTES[name].index(getattr(self, name)) for name in ATTRIBUTES}

    def caption(self, template: int = 0) -> str:
        return TEMPLATES[template].format(where=where(self.position), **asdict(self))


def where(position: str) -> str:
    if position == "center":
        return "in the center"
    if position in ("left", "right"):
        return f"on the {position}"
    return f"at the {position}"


def draw_sample(rng: np.random.Generator) -> Sample:
    color = COLORS[rng.integers(len(COLORS))]
    backgrounds = [b for b in BACKGROUNDS if b != color]  # the shape must stay visible
    return Sample(
        shape=SHAPES[rng.integers(len(SHAPES))],
        color=color,
        size=SIZES[rng.integers(len(SIZES))],
        position=POSITIONS[rng.integers(len(POSITIONS))],
        background=backgrounds[rng.integers(len(backgrounds))],
    )


def shape_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of `shape` centred at (cx, cy) with 'radius' r, (size, size)."""
    n = size * _SUPERSAMPLE
    coords = (np.arange(n) + 0.5) / _SUPERSAMPLE
    x, y = np.meshgrid(coords - cx, coords - cy)
    if shape == "circle":
        inside = x**2 + y**2 <= r**2
    elif shape == "square":  # same area as the circle
        half = r * 0.886
        inside = (np.abs(x) <= half) & (np.abs(y) <= half)
    elif shape == "diamond":
        inside = np.abs(x) + np.abs(y) <= r * 1.25
    elif shape == "triangle":  # upright, centroid at the centre
        h = r * 1.6
        top, bottom = -h * 2 / 3, h / 3
        half_width = (y - top) / h * (h / np.sqrt(3)) * 1.15
        inside = (y >= top) & (y <= bottom) & (np.abs(x) <= half_width)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return inside.reshape(size, _SUPERSAMPLE, size, _SUPERSAMPLE).mean(axis=(1, 3))


def render(sample: Sample, rng: np.random.Generator) -> np.ndarray:
    """uint8 (64, 64, 3); rng jitters the position and size a little."""
    col, row = POSITIONS.index(sample.position) % 3, POSITIONS.index(sample.position) // 3
    cx, cy = (_GRID[col] + rng.uniform(-3, 3), _GRID[row] + rng.uniform(-3, 3))
    r = _RADIUS[sample.size] * rng.uniform(0.9, 1.1)
    mask = shape_mask(sample.shape, cx, cy, r)[..., None]
    fg, bg = np.array(RGB[sample.color], np.float32), np.array(RGB[sample.background], np.float32)
    return (mask * fg + (1 - mask) * bg).round().astype(np.uint8)


def make_item(index: int, seed: int = 0) -> tuple[np.ndarray, Sample, str]:
    """(image, sample, caption) of item `index`; the caption template is drawn too."""
    rng = np.random.default_rng([seed, index])
    sample = draw_sample(rng)
    template = int(rng.integers(len(TEMPLATES)))
    return render(sample, rng), sample, sample.caption(template)


@dataclass
class Batch:
    images: np.ndarray  # uint8 (B, 64, 64, 3)
    captions: list[str]
    labels: dict[str, np.ndarray]  # attribute -> int64 (B,)
    samples: list[Sample]


def make_batch(indices: Sequence[int], seed: int = 0) -> Batch:
    items = [make_item(i, seed) for i in indices]
    samples = [s for _, s, _ in items]
    labels = {name: np.array([s.labels()[name] for s in samples], np.int64) for name in ATTRIBUTES}
    return Batch(np.stack([im for im, _, _ in items]), [c for _, _, c in items], labels, samples)


def to_tensor_range(images: np.ndarray):
    """uint8 (B, H, W, 3) -> float tensor (B, 3, H, W) in [-1, 1] (the VAE's range)."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def vocabulary() -> list[str]:
    """Every word the captions use (for checking tokenizer coverage)."""
    words = {w for t in TEMPLATES for w in t.replace(",", " ").split() if "{" not in w}
    for names in ATTRIBUTES.values():
        for name in names:
            words.update(name.split())
    words.update(w for p in POSITIONS for w in where(p).split())
    return sorted(words | {","})


# Seeds of the data splits: the base model and classifier train on TRAIN_SEED, evaluation's
# real-data statistics use EVAL_SEED.
TRAIN_SEED, EVAL_SEED = 0, 1
