"""`tune` never trades accuracy for nothing, and `--budget-s` bounds the whole command (issue 33),
with faked timings: a fake clock that only the fake engines and checks below move."""

from __future__ import annotations

import shutil
import types

import numpy as np
import pytest

from ilf_deploy.checks import tuning
from ilf_deploy.checks.tuning import MAX_ROUNDS, Candidate, choose_winner
from ilf_deploy.engines.compare import LOSSY_SPEEDUP, budget


def timed(backend: str, precision: str, ms: float, variant: str | None = None) -> Candidate:
    limits = None if (backend, precision) == ("onnxruntime", "fp32") else budget(backend, precision)
    return Candidate(backend, variant, limits, times=[ms / 1000])


def test_exact_and_lossy_budgets():
    assert budget("openvino", "fp32").exact and budget("torch", "fp32").exact
    for precision in ("bf16", "int8-dynamic", "int8-qdq", "int8-ov", "fp8-qdq", "fp16"):
        assert not budget("openvino", precision).exact, precision
    assert pytest.approx(1.10) == LOSSY_SPEEDUP


@pytest.mark.parametrize(
    ("lossy_ms", "chosen"),
    [
        (35.7, "onnxruntime fp32"),  # the case: OpenVINO bf16 1.00x faster than ORT fp32
        (33.0, "onnxruntime fp32"),  # 1.08x: under the margin
        (35.8 / 1.11, "openvino bf16"),  # over it
        (10.0, "openvino bf16"),
    ],
)
def test_a_lossy_candidate_wins_only_by_the_margin(lossy_ms, chosen):
    found = [timed("onnxruntime", "fp32", 35.8), timed("openvino", "bf16", lossy_ms, "bf16")]
    winner, reason = choose_winner(found)
    assert winner.label == chosen
    gain = f"{35.8 / lossy_ms:.2f}x"
    assert gain in reason and f"{LOSSY_SPEEDUP:.2f}x" in reason
    assert ("only" in reason) == (chosen == "onnxruntime fp32")


def test_the_margin_is_over_the_fastest_exact_candidate():
    found = [
        timed("onnxruntime", "fp32", 40.0),
        timed("openvino", "fp32", 30.0),  # exact and faster than the reference
        timed("openvino", "int8-ov", 28.0, "int8_ov"),  # 1.07x of 30: not enough
    ]
    winner, reason = choose_winner(found)
    assert winner.label == "openvino fp32" and "openvino int8_ov" in reason
    found[2].times = [0.025]  # 1.2x of 30
    assert choose_winner(found)[0].label == "openvino int8_ov"
    found[2].error = "did not open"  # never chosen, however fast
    assert choose_winner(found)[0].label == "openvino fp32"


def test_without_lossy_candidates_the_fastest_exact_wins():
    found = [timed("onnxruntime", "fp32", 40.0), timed("openvino", "fp32", 30.0)]
    winner, reason = choose_winner(found)
    assert winner.label == "openvino fp32" and "no lossy candidate" in reason


# -- --budget-s over the whole command ----------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def perf_counter(self) -> float:
        return self.now


class FakeGenerator:
    """Each denoising step costs `step_s` on the fake clock."""

    def __init__(self, clock: FakeClock, step_s: float) -> None:
        self.clock, self.step_s = clock, step_s

    def generate_latents(self, plan, request):
        self.clock.now += self.step_s * plan.num_steps
        return np.zeros(1)

    def latents_to_numpy(self, latents):
        return latents


@pytest.fixture
def faked(tiny_bundles, tmp_path, monkeypatch):
    """tune() on a copy of the tiny bundle with 8 lossy candidates; opening an engine costs 1 s,
    a fidelity check (a whole plan run) 3 s, a step 0.2 s on the fake clock."""
    clock = FakeClock()
    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "bundle")
    found = [Candidate("onnxruntime", None, None)]
    found += [Candidate("openvino", f"v{i}", budget("openvino", "int8-ov")) for i in range(8)]

    def open_engine(bundle, backend, variant, **options):
        clock.now += 1.0
        return FakeGenerator(clock, 0.2)

    def run_reference(bundle, plan, request, generator):
        clock.now += 3.0
        return types.SimpleNamespace(name=plan)

    def compare(generator, reference, segments, limits):
        clock.now += 3.0
        return []

    monkeypatch.setattr(tuning, "time", clock)
    monkeypatch.setattr(tuning, "candidates", lambda bundle: [Candidate(**vars(c)) for c in found])
    monkeypatch.setattr(tuning, "open_bundle_generator", open_engine)
    monkeypatch.setattr(tuning, "run_reference", run_reference)
    monkeypatch.setattr(tuning, "compare_to_reference", compare)
    return path


@pytest.mark.parametrize("budget_s", [12.0, 20.0, 30.0])  # all checks: about 36 s
def test_budget_bounds_the_whole_command(faked, budget_s):
    report = tuning.tune(faked, "ilf-4", budget_s=budget_s)
    assert report["seconds"] <= budget_s * 1.10, report["seconds"]
    skipped = [c for c in report["candidates"] if c["error"] and c["error"].startswith("skipped")]
    checked = [c for c in report["candidates"] if c["rounds"]]
    assert len(skipped) + len(checked) == 9 and checked[0]["label"] == "onnxruntime fp32"
    assert skipped and "--budget-s" in skipped[0]["error"]
    assert report["budget_s"] == budget_s and report["winner"]["reason"]


def test_a_large_budget_checks_everything_and_times_every_round(faked):
    report = tuning.tune(faked, "ilf-4", budget_s=10_000)
    assert all(c["error"] is None and c["rounds"] == MAX_ROUNDS for c in report["candidates"])
    assert report["seconds"] < 10_000


def test_a_tiny_budget_still_checks_the_reference_and_times_it_once(faked):
    report = tuning.tune(faked, "ilf-4", budget_s=1)
    reference, *others = report["candidates"]
    assert reference["rounds"] == 1 and all(c["error"].startswith("skipped") for c in others)
    assert report["winner"]["label"] == "onnxruntime fp32"
    # the table says why once (it read "skipped: skipped: its check ...")
    from rich.console import Console

    from ilf_deploy.cli.tables import tune_table

    console = Console(width=250, record=True)
    console.print(tune_table("tune", report))
    text = console.export_text()
    assert "skipped: its check" in text and "skipped: skipped" not in text, text
