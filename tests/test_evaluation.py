"""The evaluator on a tiny model (table/JSON/grid), and the committed default model + classifier."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from ilf_deploy.data import EVAL_SEED, make_batch
from ilf_deploy.errors import ConfigError
from ilf_deploy.evaluation import (
    CLASSIFIER_DIR,
    AttributeClassifier,
    attribute_accuracy,
    evaluate,
    format_table,
    frechet_distance,
    psnr,
    save_grid,
    save_json,
    torch_backend,
)

DEFAULT_MODEL = CLASSIFIER_DIR.parent


def test_frechet_and_psnr_basics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(a, a + 3.0)
    assert shifted == pytest.approx(4 * 9.0, rel=1e-6)  # same covariance: |Δμ|²
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert math.isinf(psnr(img, img)) and psnr(img, 255 - img) < 10


def test_eval_on_a_tiny_model_writes_table_json_and_grid(tiny_dirs, tmp_path):
    backend = torch_backend(tiny_dirs["pixart-alpha"])
    classifier = AttributeClassifier()  # untrained is enough to exercise the pipeline
    plans = ["base-4", "ilf-4", "cache-4"]
    report = evaluate(backend, plans, n=3, reference="base-4", classifier=classifier, real_count=50)
    by_plan = {r.plan: r for r in report.results}
    assert list(by_plan) == plans
    assert by_plan["base-4"].psnr is None and by_plan["base-4"].speedup == 1.0
    for spec in ("ilf-4", "cache-4"):
        r = by_plan[spec]
        assert r.block_forwards == backend.resolve(spec).block_forwards
        assert np.isfinite(r.psnr) and r.latent_rel_l2 > 0  # differs from, but compared to, base-4
    for r in report.results:
        assert 0 <= r.accuracy["all"] <= r.accuracy["mean"] <= 1 and np.isfinite(r.frechet)
    rows = format_table(report)
    assert len(rows) == 4 and rows[0][0] == "plan"
    save_json(report, tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["n"] == 3 and [r["plan"] for r in data["results"]] == plans
    save_grid(report, tmp_path / "g.png", columns=3)
    grid = Image.open(tmp_path / "g.png")
    assert grid.height >= 3 * 32 and grid.width >= 3 * 32
    with pytest.raises(ConfigError, match="--n"):
        evaluate(backend, plans, n=1, classifier=classifier)


def test_default_model_loads_and_classifier_reads_real_data():
    from ilf_deploy.loading import load_model

    model = load_model(DEFAULT_MODEL)
    assert model.architecture == "pixart-alpha" and model.default_image_size == 64
    assert model.feedback is not None and model.feedback.scales.abs().sum() > 0
    classifier = AttributeClassifier.load()
    held = make_batch(range(300), EVAL_SEED + 3)
    _, preds = classifier.predict(held.images)
    acc = attribute_accuracy(preds, held.samples)
    assert acc["mean"] > 0.95 and acc["all"] > 0.8, acc


def test_default_model_draws_what_the_prompt_says():
    """The embedded model is trained: far above chance (~0.25 mean accuracy) with and without ILF."""
    report = evaluate(torch_backend(DEFAULT_MODEL), ["base-20", "ilf-10"], n=16, real_count=200)
    for result in report.results:
        assert result.accuracy["mean"] > 0.6, (result.plan, result.accuracy)
    assert report.results[1].psnr > 20  # ILF-10 stays close to the 20-step images
