"""The evaluator on a tiny model (table/JSON/grid), and the committed default model + classifier."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from ilf_deploy.checks.evaluation import (
    CLASSIFIER_DIR,
    AttributeClassifier,
    EvalBackend,
    Generated,
    attribute_accuracy,
    eval_prompts,
    evaluate,
    format_table,
    frechet_distance,
    paired_difference,
    psnr,
    save_grid,
    save_json,
    torch_backend,
)
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.model.data import EVAL_SEED, make_batch

DEFAULT_MODEL = CLASSIFIER_DIR.parent


def test_frechet_and_psnr_basics():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(500, 4))
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    shifted = frechet_distance(a, a + 3.0)
    assert shifted == pytest.approx(4 * 9.0, rel=1e-6)  # same covariance: |Δμ|²
    img = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    assert psnr(img, 255 - img) < 10
    one_level = img.copy()
    one_level[0, 0, 0] ^= 1  # one value one level off: the finest difference 8 bits show
    finest = 10 * math.log10(255**2 * img.size)
    assert psnr(img, img) == pytest.approx(psnr(img, one_level)) == pytest.approx(finest)


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


def test_offset_picks_later_prompts_and_their_seeds(tiny_dirs):
    tiny = torch_backend(tiny_dirs["pixart-alpha"])
    seen: list[tuple[str, int]] = []

    def generate(plan, prompts, seeds):
        seen.extend(zip(prompts, seeds))
        return [Generated(np.zeros((64, 64, 3), np.uint8)) for _ in prompts]

    backend = EvalBackend("recording", tiny.resolve, generate)
    report = evaluate(
        backend,
        ["base-4"],
        n=3,
        reference="base-4",
        classifier=AttributeClassifier(),
        real_count=20,
        offset=5,
        batch_size=2,
    )
    expected = [s.caption(0) for s in eval_prompts(8)[5:]]
    assert seen == list(zip(expected, [5, 6, 7])) and report.offset == 5
    assert report.to_dict()["offset"] == 5
    with pytest.raises(ConfigError, match="--offset"):
        evaluate(backend, ["base-4"], n=3, classifier=AttributeClassifier(), offset=-1)


def test_batched_samples_are_the_one_at_a_time_samples(tiny_dirs):
    backend = torch_backend(tiny_dirs["pixart-alpha"])
    plan = backend.resolve("ilf-4")
    prompts = [s.caption(0) for s in eval_prompts(3)]
    together = backend.generate(plan, prompts, [0, 1, 2])
    alone = [backend.generate(plan, [p], [i])[0] for i, p in enumerate(prompts)]
    for a, b in zip(together, alone):
        np.testing.assert_allclose(a.latents, b.latents, rtol=1e-4, atol=1e-3)  # float sums reorder
        assert np.abs(a.image.astype(int) - b.image.astype(int)).max() <= 1
    assert not np.allclose(together[0].latents, together[1].latents)  # different seeds and prompts


def test_accuracy_standard_error_is_that_of_a_proportion():
    samples = make_batch(range(4), EVAL_SEED).samples
    truth = {name: np.array([s.labels()[name] for s in samples]) for name in samples[0].labels()}
    preds = {name: v.copy() for name, v in truth.items()}
    name = next(iter(preds))
    preds[name][2:] = preds[name][2:] + 1  # samples 2 and 3 wrong: `all` = 0.5
    acc = attribute_accuracy(preds, samples)
    assert acc["all"] == 0.5
    assert acc["all_se"] == pytest.approx(math.sqrt(4 * 0.25 / 3) / 2)  # sample std (ddof 1) / sqrt(n)
    delta, se = paired_difference(np.array([1, 1, 0, 0]), np.array([1, 0, 0, 0]))
    assert delta == 0.25 and se == pytest.approx(0.5 / 2)  # std of [0, 1, 0, 0] (ddof 1) / sqrt(4)


def test_default_model_loads_and_classifier_reads_real_data():
    from ilf_deploy.model.loading import load_model

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


def test_eval_command_on_a_bundle(tiny_bundles, tmp_path):
    from typer.testing import CliRunner

    from ilf_deploy.cli import app

    report, grid = tmp_path / "eval.json", tmp_path / "grid.png"
    args = ["eval", str(tiny_bundles["pixart-alpha"]), "--plans", "base-4,ilf-4", "--reference", "base-4"]
    args += ["--n", "3", "--offset", "7", "--batch-size", "2", "--json-out", str(report), "--grid", str(grid)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "from prompt 7" in result.output and "±" in result.output
    data = json.loads(report.read_text())
    assert data["n"] == 3 and data["offset"] == 7 and data["info"]["backend"] == "onnxruntime"
    assert [r["plan"] for r in data["results"]] == ["base-4", "ilf-4"] and grid.is_file()
    assert "Δ acc all vs base-4" in result.output
    base, ilf = data["results"]
    assert base["delta_all"] is None and len(ilf["all_right"]) == 3
    assert ilf["delta_all"] == pytest.approx(np.mean(ilf["all_right"]) - np.mean(base["all_right"]))
    bad = CliRunner().invoke(app, [*args[:2], "--n", "3", "--batch-size", "0"])
    assert bad.exit_code == 2 and "--batch-size" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, [*args[:2], "--n", "3", "--device", "cuda"])
    assert bad.exit_code == 2 and "for the torch backend" in bad.output and "Traceback" not in bad.output
