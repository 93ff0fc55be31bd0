"""One comparator (ilf_deploy.engines.compare): the metrics, the budget table, the result row, the recorder,
and `verify`, `verify-variant` and `tune` all producing that one row (issue: "One comparator")."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from jsonschema import Draft202012Validator
from typer.testing import CliRunner

from ilf_deploy.build.quantization.calibration import DEFAULT_CLASS_LABELS, DEFAULT_PROMPTS
from ilf_deploy.build.quantization.quantize import quantize_bundle, verify_variant
from ilf_deploy.checks.tuning import tune
from ilf_deploy.checks.verify.bundle import verify_bundle
from ilf_deploy.cli import app
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle, BundleError
from ilf_deploy.core.runtime.manifest import VARIANT_ENGINES
from ilf_deploy.core.schemas import problem, schema
from ilf_deploy.engines.compare import (
    ANY_ENGINE,
    BUDGETS,
    HELD_OUT_PROMPT,
    Check,
    Limit,
    Metrics,
    MissingBudget,
    ShapeMismatch,
    TrajectoryRecorder,
    budget,
    compare_latents,
    compare_segment,
    compare_to_reference,
    held_out_request,
    metrics,
    reference_generator,
    run_reference,
)

WRONG_DIGEST = "sha256:" + "0" * 64


def check_schema():
    """The tuning schema's candidate `fidelity` row, on its own."""
    defs = schema("tuning")["$defs"]
    return Draft202012Validator({"$ref": "#/$defs/check", "$defs": defs})


def assert_rows(rows, limits=None):
    assert rows and all(isinstance(r, Check) for r in rows)
    for row in rows:
        assert row.kind in ("segment", "end-to-end")
        assert row.ok == row.limit.passes(row.metrics)
        check_schema().validate(json.loads(json.dumps(row.to_dict())))
        if limits is not None:
            assert row.limit == (limits.segment if row.kind == "segment" else limits.end_to_end)


# -- metrics ----------------------------------------------------------------------------------------


def test_metrics_of_a_known_error():
    want = np.array([3.0, 4.0])  # |want| = 5
    got = np.array([3.0, 4.5])  # |got - want| = 0.5
    m = metrics(got, want)
    assert m.rel_l2 == pytest.approx(0.1)
    assert m.snr_db == pytest.approx(20.0)  # 10 log10(25 / 0.25)
    assert m.max_abs == pytest.approx(0.5)
    assert m.cosine == pytest.approx((9 + 18) / (5 * math.hypot(3, 4.5)))


def test_metrics_of_equal_arrays_and_of_nan():
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    same = metrics(x, x.copy())
    assert same == Metrics(float("inf"), pytest.approx(1.0), 0.0, 0.0)
    zeros = metrics(np.zeros(3), np.zeros(3))
    assert zeros == Metrics(float("inf"), 1.0, 0.0, 0.0)  # an all-zero output matched exactly
    assert metrics(np.ones(3), np.zeros(3)).cosine == 0.0
    broken = metrics(np.full_like(x, np.nan), x)
    for limit in (Limit("snr_db", 0.0), Limit("cosine", -1.0), Limit("rel_l2", 1e9), Limit("max_abs", 1e9)):
        assert not limit.passes(broken), limit  # NaN never passes


def test_a_shape_mismatch_names_both_shapes():
    with pytest.raises(ShapeMismatch, match=r"segment x: .*\(2, 3\).*\(3, 2\)"):
        metrics(np.zeros((2, 3)), np.zeros((3, 2)), "segment x")


def test_worst_takes_each_metric_at_its_worst():
    worst = Metrics.worst([Metrics(40.0, 0.99, 0.01, 0.2), Metrics(30.0, 0.999, 0.03, 0.1)])
    assert worst == Metrics(30.0, 0.99, 0.03, 0.2)
    with pytest.raises(ValueError):
        Metrics.worst([])


def test_limits_know_their_direction():
    m = Metrics(30.0, 0.99, 0.05, 1.0)
    assert Limit("snr_db", 30.0).passes(m) and not Limit("snr_db", 30.1).passes(m)
    assert Limit("rel_l2", 0.05).passes(m) and not Limit("rel_l2", 0.049).passes(m)
    assert str(Limit("snr_db", 25)) == "SNR ≥ 25 dB" and str(Limit("rel_l2", 1e-4)) == "rel L2 ≤ 0.0001"
    assert Limit("snr_db", 25.0).to_dict() == {"metric": "snr_db", "at_least": 25.0}
    assert Limit("max_abs", 1.0).to_dict() == {"metric": "max_abs", "at_most": 1.0}
    with pytest.raises(ConfigError, match="unknown metric 'psnr'"):
        Limit("psnr", 1.0)


# -- budgets ----------------------------------------------------------------------------------------


def test_budget_lookup_own_row_then_any_engine():
    assert budget("tensorrt", "fp16") == BUDGETS[("tensorrt", "fp16")]
    assert budget("tensorrt", "fp16").segment == Limit("snr_db", 30.0)
    assert budget("openvino", "fp32") is BUDGETS[(ANY_ENGINE, "fp32")]
    assert budget("onnxruntime", "fp32").segment == Limit("rel_l2", 1e-4)  # parity: 80 dB
    assert budget("tensorrt", "fp32") != budget("onnxruntime", "fp32")  # TF32
    assert budget("onnxruntime", "fp8-qdq").segment.bound < budget("onnxruntime", "int8-qdq").segment.bound
    assert str(budget("onnxruntime", "int8-qdq")) == "segments SNR ≥ 30 dB, end-to-end latents rel L2 ≤ 0.05"


def test_a_missing_budget_is_one_error_not_a_default():
    with pytest.raises(MissingBudget, match="no fidelity budget for onnxruntime int4") as error:
        budget("onnxruntime", "int4")
    assert isinstance(error.value, ConfigError) and "\n" not in str(error.value)


def test_every_variant_mode_has_a_budget_on_every_engine_that_runs_it():
    for mode, engines in VARIANT_ENGINES.items():
        for engine in engines:
            assert budget(engine, mode).end_to_end.metric == "rel_l2"
    for engine in ("onnxruntime", "openvino", "tensorrt", "torch"):
        budget(engine, "fp32"), budget(engine, "fp16")


# -- the result row and the held-out request --------------------------------------------------------


def test_check_row():
    limit = Limit("snr_db", 30.0)
    row = Check("segment", "blocks_00_03", Metrics(35.0, 0.999, 0.02, 0.1), limit, 4, "trajectory", "32x32")
    assert row.ok and row.label == "segment (trajectory)" and row.snr_db == 35.0 and row.rel_l2 == 0.02
    assert row.to_dict() == {
        "kind": "segment",
        "name": "blocks_00_03",
        "inputs": "trajectory",
        "size": "32x32",
        "samples": 4,
        "metrics": {"snr_db": 35.0, "cosine": 0.999, "rel_l2": 0.02, "max_abs": 0.1},
        "limit": {"metric": "snr_db", "at_least": 30.0},
        "ok": True,
    }
    check_schema().validate(row.to_dict())
    e2e = compare_latents("ilf-4", np.ones(4) * 1.1, np.ones(4), Limit("rel_l2", 0.05))
    assert e2e.kind == "end-to-end" and e2e.label == "end-to-end" and not e2e.ok
    with pytest.raises(ValueError, match="check kind"):
        Check("segment (random)", "x", e2e.metrics, e2e.limit)


def test_held_out_request_per_architecture(tiny_bundles):
    pixart = held_out_request(Bundle.load(tiny_bundles["pixart-alpha"]))
    assert pixart.prompt == HELD_OUT_PROMPT and pixart.class_label is None
    assert pixart.prompt not in DEFAULT_PROMPTS  # held out: not a calibration prompt
    dit_bundle = Bundle.load(tiny_bundles["dit"])
    dit = held_out_request(dit_bundle)
    assert dit.prompt == "" and dit.class_label is not None
    classes = dit_bundle.model.num_classes
    assert dit.class_label not in {c % classes for c in DEFAULT_CLASS_LABELS}
    assert held_out_request(dit_bundle, class_label=0).class_label == 0


# -- the comparator ---------------------------------------------------------------------------------


def test_recorder_and_comparator_on_the_reference_itself(tiny_bundles):
    bundle = Bundle.load(tiny_bundles["pixart-alpha"])
    reference = run_reference(bundle, "ilf-4", max_samples=2)
    recorder = reference.recorder
    assert reference.name == "ilf-4" and reference.request == held_out_request(bundle)
    assert "text_encoder" not in recorder.inputs and "feedback" in recorder.inputs
    for name in recorder.inputs:
        samples = recorder.feeds(name)
        assert 1 <= len(samples) <= 2, name  # a uniform sample of its calls
        assert set(samples[0]) == set(bundle.segment_spec(name).input_names)
    candidate = reference_generator(bundle)  # the same engine: equal to the last bit
    limits = budget("onnxruntime", "fp32")
    rows = compare_to_reference(candidate, reference, list(recorder.inputs), limits)
    assert_rows(rows, limits)
    assert all(r.ok and r.rel_l2 == 0.0 for r in rows) and rows[-1].kind == "end-to-end"
    assert [r.name for r in rows[:-1]] == list(recorder.inputs)


def test_compare_segment_scores_every_output_and_needs_samples():
    def reference(name, feeds):
        return {"a": feeds["x"], "b": feeds["x"] * 2}

    def candidate(name, feeds):
        return {"a": feeds["x"], "b": feeds["x"] * 2.2}  # only the second output is off

    samples = [{"x": np.ones(3)}, {"x": np.full(3, 2.0)}]
    row = compare_segment("seg", candidate, reference, samples, Limit("rel_l2", 0.05), "random")
    assert row is not None and row.samples == 2 and row.rel_l2 == pytest.approx(0.1) and not row.ok
    assert compare_segment("seg", candidate, reference, [], Limit("rel_l2", 0.05)) is None


def test_recorder_keeps_all_feeds_when_asked(tiny_bundles):
    bundle = Bundle.load(tiny_bundles["dit"])
    recorder = TrajectoryRecorder(bundle, 1, segments=["final"], all_feeds=True)
    recorder("final", {"hidden": np.ones(2), "extra": np.zeros(1)})
    recorder("embed", {"latents": np.ones(2)})  # not asked for
    assert list(recorder.inputs) == ["final"] and set(recorder.feeds("final")[0]) == {"hidden", "extra"}
    with pytest.raises(ConfigError, match="max samples"):
        TrajectoryRecorder(bundle, 0)


# -- every caller produces the one row --------------------------------------------------------------


def test_verify_produces_checks_and_refuses_a_wrong_digest(tiny_bundles, tmp_path):
    bundle = Bundle.load(tiny_bundles["dit"])
    rows = verify_bundle(bundle)
    assert_rows(rows, budget("onnxruntime", "fp32"))
    assert {r.label for r in rows} == {"segment (random)", "segment (trajectory)", "end-to-end"}
    report = tmp_path / "verify.json"
    runner = CliRunner()
    result = runner.invoke(
        app, ["verify", str(bundle.path), "--json-out", str(report), "--digest", bundle.digest]
    )
    assert result.exit_code == 0, result.output
    assert "rel L2 ≤ 0.0001" in " ".join(result.output.split()) and "within tolerance" in result.output
    rows = json.loads(report.read_text())
    assert rows and all(r["ok"] for r in rows)
    for row in rows:
        check_schema().validate(row)
    result = runner.invoke(app, ["verify", str(bundle.path), "--digest", WRONG_DIGEST])
    assert result.exit_code == 2 and len(result.output.strip().splitlines()) == 1
    assert "not the pinned --digest" in result.output


@pytest.fixture(scope="module")
def dynamic(tiny_bundles, tmp_path_factory):
    """The tiny PixArt-α bundle with an int8-dynamic variant (no calibration needed)."""
    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path_factory.mktemp("compare") / "bundle")
    quantize_bundle(path, "int8-dynamic", "cpu")
    return path


def test_verify_variant_produces_checks(dynamic, tmp_path):
    bundle = Bundle.load(dynamic)
    rows = verify_variant(bundle, "cpu", "ilf-4")
    assert_rows(rows, budget("onnxruntime", "int8-dynamic"))
    assert {r.name for r in rows if r.kind == "segment"} == set(bundle.variant_spec("cpu").segments)
    assert rows[-1].kind == "end-to-end" and rows[-1].name == "ilf-4" and rows[-1].rel_l2 > 0
    runner = CliRunner()
    report = tmp_path / "rows.json"
    args = ["verify-variant", str(dynamic), "--variant", "cpu", "--plan", "ilf-4", "--json-out", str(report)]
    result = runner.invoke(app, [*args, "--digest", bundle.digest])
    assert result.exit_code == 0, result.output
    assert "budget: segments SNR ≥ 30 dB" in " ".join(result.output.split())
    assert [r["name"] for r in json.loads(report.read_text())] == [r.name for r in rows]
    result = runner.invoke(app, [*args, "--force", "--digest", WRONG_DIGEST])  # the report exists
    assert result.exit_code == 2 and "not the pinned --digest" in result.output
    result = runner.invoke(app, ["verify-engines", str(dynamic), "--digest", WRONG_DIGEST])
    assert result.exit_code == 2 and "not the pinned --digest" in result.output


def test_tune_produces_checks_in_a_valid_tuning_json(dynamic):
    bundle = Bundle.load(dynamic)
    report = tune(dynamic, "ilf-4", budget_s=60, include=lambda c: c.backend == "onnxruntime")
    assert problem("tuning", report) is None
    reference, variant = report["candidates"]
    assert reference["budget"] is None and reference["fidelity"] == []
    assert (
        variant["variant"] == "cpu" and variant["budget"] == budget("onnxruntime", "int8-dynamic").to_dict()
    )
    assert variant["fidelity"][-1]["kind"] == "end-to-end" and variant["ok"]
    assert report["request"]["prompt"] == HELD_OUT_PROMPT
    broken = json.loads(json.dumps(report))
    broken["candidates"][1]["fidelity"][0]["metrics"] = {"snr": 1.0}
    assert problem("tuning", broken) is not None  # the rows' shape is part of the schema
    with pytest.raises(BundleError, match="not the pinned --digest"):
        tune(dynamic, "ilf-4", budget_s=0.1, include=lambda c: False, digest=WRONG_DIGEST)
    result = CliRunner().invoke(app, ["tune", str(dynamic), "--digest", WRONG_DIGEST])
    assert result.exit_code == 2 and "not the pinned --digest" in result.output
    assert bundle.digest == Bundle.load(dynamic).digest  # tune writes tuning.json, not the bundle
