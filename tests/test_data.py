"""The shapes dataset: determinism, label/caption consistency, tokenizer coverage."""

from __future__ import annotations

import numpy as np

from ilf_deploy.model.data import ATTRIBUTES, RGB, TEMPLATES, make_batch, make_item, vocabulary, where
from ilf_deploy.model.tokenizer import DEFAULT_VOCAB, build_word_tokenizer


def test_items_are_deterministic_and_seed_dependent():
    a, b = make_batch(range(16)), make_batch(range(16))
    assert np.array_equal(a.images, b.images) and a.captions == b.captions
    image, sample, caption = make_item(5)  # one item alone equals its place in a batch
    assert np.array_equal(image, a.images[5]) and caption == a.captions[5] and sample == a.samples[5]
    other = make_batch(range(16), seed=1)
    assert not np.array_equal(a.images, other.images)


def test_captions_and_labels_agree_with_the_pixels():
    batch = make_batch(range(64))
    assert batch.images.shape == (64, 64, 64, 3) and batch.images.dtype == np.uint8
    for i, (s, caption) in enumerate(zip(batch.samples, batch.captions)):
        for name, names in ATTRIBUTES.items():
            assert names[batch.labels[name][i]] == getattr(s, name)
        for word in (s.shape, s.color, s.size, s.background, where(s.position)):
            assert word in caption
        assert s.color != s.background
        img = batch.images[i].reshape(-1, 3).astype(int)
        corner_colours = {tuple(batch.images[i][y, x]) for y, x in ((0, 0), (0, 63), (63, 0), (63, 63))}
        # The background colour fills most pixels; the shape colour exists.
        bg = np.all(img == RGB[s.background], axis=1).mean()
        fg = np.all(img == RGB[s.color], axis=1).sum()
        assert bg > 0.5 and fg > 20, (caption, bg, fg)
        assert RGB[s.background] in corner_colours or s.size == "large"
        # The shape's centre of mass is in the named third of the image.
        ys, xs = np.nonzero(np.all(batch.images[i] == RGB[s.color], axis=2))
        col, row = ATTRIBUTES["position"].index(s.position) % 3, ATTRIBUTES["position"].index(s.position) // 3
        assert int(xs.mean() // (64 / 3)) == col and int(ys.mean() // (64 / 3)) == row, caption


def test_every_caption_word_is_in_the_tokenizer():
    vocab = set(DEFAULT_VOCAB)
    assert set(vocabulary()) <= vocab
    tok = build_word_tokenizer()
    for caption in make_batch(range(32)).captions:
        assert 2 not in tok.encode(caption).ids  # no <unk>
    assert len(TEMPLATES) >= 2


def test_every_class_occurs():
    batch = make_batch(range(300))
    for name, values in ATTRIBUTES.items():
        assert set(batch.labels[name].tolist()) == set(range(len(values))), name
