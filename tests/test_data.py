"""The shapes dataset: deterministic, captions agree with labels, every word is in the vocabulary."""

from __future__ import annotations

import numpy as np

from ilf_deploy.data import ATTRIBUTES, IMAGE_SIZE, RGB, make_batch, make_item, vocabulary
from ilf_deploy.tokenizer import DEFAULT_VOCAB


def test_items_are_deterministic_and_seeds_differ():
    a, b = make_item(5, seed=0), make_item(5, seed=0)
    assert np.array_equal(a[0], b[0]) and a[1:] == b[1:]
    assert not np.array_equal(make_item(5, seed=1)[0], a[0]) or make_item(5, seed=1)[1] != a[1]
    batch = make_batch(range(16))
    assert batch.images.shape == (16, IMAGE_SIZE, IMAGE_SIZE, 3) and batch.images.dtype == np.uint8
    assert len(set(batch.captions)) > 8


def test_captions_and_pixels_agree_with_the_labels():
    batch = make_batch(range(200))
    for image, caption, sample in zip(batch.images, batch.captions, batch.samples, strict=True):
        for name in ("shape", "color", "size", "background"):
            assert getattr(sample, name) in caption, (name, caption)
        # Both colours are really drawn (anti-aliasing adds blends between them).
        colours = {tuple(p) for p in image.reshape(-1, 3)}
        assert tuple(RGB[sample.color]) in colours and tuple(RGB[sample.background]) in colours
        assert sample.color != sample.background
    for name, values in ATTRIBUTES.items():
        seen = set(batch.labels[name].tolist())
        assert seen == set(range(len(values))), name  # every class occurs in 200 items


def test_vocabulary_is_covered_by_the_word_tokenizer():
    missing = [w for w in vocabulary() if w not in DEFAULT_VOCAB]
    assert not missing
