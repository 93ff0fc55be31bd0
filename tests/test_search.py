"""`tune --search-plans` (issue 24): candidates within the bundle's cut points, quality on tuning
prompts that never overlap the reporting ones, a deliberately bad candidate never chosen however
fast, tuning.json schema 2 with the Pareto rows and plot, and `--plan auto` with its clean fallbacks."""

from __future__ import annotations

import json
import shutil

import pytest
from typer.testing import CliRunner

from ilf_deploy.checks.evaluation import AttributeClassifier, bundle_plan, plan_quality
from ilf_deploy.checks.tuning import (
    PLAN_SEARCH_PLOT,
    QualityBudget,
    check_tuning_prompts,
    plan_candidates,
    resolve_bundle_plan,
    search_plans,
    tune,
)
from ilf_deploy.cli import app
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.schemas import problem
from ilf_deploy.engines.backends.auto import TUNING_FILE, choose_plan

BAD = "base-1"  # one step: by far the fastest candidate, and far from the reference's images
OTHERS = ("ilf-6-cache1-4r2", "ilf-6-adapt1-4t0.3m1")


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tuned(tiny_bundles, tmp_path_factory):
    """The tiny PixArt-α bundle (cut points 0, 1, 2, 5, 6), tuned on ONNX Runtime only."""
    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path_factory.mktemp("search") / "bundle")
    tune(path, "ilf-4", budget_s=0.5, include=lambda c: False)  # the reference engine alone
    return path


def candidates(path):
    bundle = Bundle.load(path)
    found = {name: bundle.plan(name) for name in bundle.plan_names}
    found.update({name: resolve_bundle_plan(bundle, name) for name in (BAD, *OTHERS)})
    return found


def fake_quality(plans, reference, first, count):
    """Every plan as good as the reference, but the bad one: far worse on every measure."""
    out = {}
    for name, plan in plans.items():
        good = {"acc": 0.5, "delta_acc": 0.0, "delta_acc_se": 0.01, "frechet": 40.0, "latent_l2": 0.01}
        bad = {"acc": 0.0, "delta_acc": -0.5, "delta_acc_se": 0.05, "frechet": 90.0, "latent_l2": 0.9}
        out[name] = {**(bad if name == BAD else good), "block_forwards": plan.block_forwards}
    out[reference].update(delta_acc=0.0, delta_acc_se=0.0, latent_l2=0.0)
    return out


@pytest.fixture(scope="module")
def searched(tuned):
    search = search_plans(
        tuned, fake_quality, QualityBudget(), "ilf-4", (100_000, 8), candidates(tuned), rounds=2
    )
    return tuned, search


def test_the_search_never_picks_a_candidate_outside_the_budget(searched):
    path, search = searched
    rows = {r["name"]: r for r in search["candidates"]}
    assert set(rows) == {"base-4", "ilf-4", "cache-6", BAD, *OTHERS}
    fastest = min(rows.values(), key=lambda r: r["seconds_per_image"])
    assert fastest["name"] == BAD and not rows[BAD]["ok"] and "Δacc" in rows[BAD]["miss"]
    (chosen,) = [r for r in rows.values() if r["chosen"]]
    assert chosen["ok"] and chosen["name"] != BAD and chosen["name"] == search["chosen"]["name"]
    inside = [r for r in rows.values() if r["ok"]]
    assert chosen["seconds_per_image"] == min(r["seconds_per_image"] for r in inside)
    assert rows[BAD]["pareto"]  # fastest of all: on the front, and still never chosen
    data = json.loads((path / TUNING_FILE).read_text())
    assert data["schema"] == 2 and problem("tuning", data) is None
    assert data["plan_search"]["chosen"]["plan"]["name"] == chosen["name"]
    assert data["plan_search"]["prompts"] == {"offset": 100_000, "n": 8}
    assert (path / PLAN_SEARCH_PLOT).stat().st_size > 1000


def test_eval_is_the_quality_and_the_bad_candidate_stays_out(tuned, tmp_path):
    path = shutil.copytree(tuned, tmp_path / "bundle")
    quality = plan_quality(path, backend="onnxruntime", classifier=AttributeClassifier())
    plans = {name: plan for name, plan in candidates(path).items() if name in ("ilf-4", BAD, OTHERS[1])}
    measured = quality(plans, "ilf-4", 100_000, 4)
    assert measured["ilf-4"]["delta_acc"] == 0 and measured["ilf-4"]["latent_l2"] == 0
    assert measured[BAD]["latent_l2"] > 0.12 and measured[BAD]["block_forwards"] == 6
    assert 0 < measured[OTHERS[1]]["block_forwards"] <= plans[OTHERS[1]].block_forwards
    budget = QualityBudget.parse("acc=none,frechet=none,l2=0.1")
    search = search_plans(path, quality, budget, "ilf-4", (100_000, 4), plans, rounds=1)
    rows = {r["name"]: r for r in search["candidates"]}
    assert not rows[BAD]["ok"] and "latent rel L2" in rows[BAD]["miss"]
    assert search["chosen"]["name"] != BAD


def test_plan_auto_uses_the_search_result(searched, tmp_path):
    path, search = searched
    choice = choose_plan(Bundle.load(path))
    assert choice.plan is not None and choice.plan.name == search["chosen"]["name"]
    assert choice.reason.startswith(f"auto plan: {choice.plan.name} (")
    result = invoke(
        "generate", path, "--plan", "auto", "--prompt", "a red circle", "--out", tmp_path / "a.png"
    )
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert f"auto plan: {choice.plan.name}" in text and f"{choice.plan.name}: " in text
    info = {}
    assert (
        bundle_plan(Bundle.load(path), "auto", info).name == choice.plan.name
        and "auto plan" in info["auto_plan"]
    )


def _edited(path, tmp_path, edit):
    copy = shutil.copytree(path, tmp_path / "copy")
    data = json.loads((copy / TUNING_FILE).read_text())
    edit(data)
    (copy / TUNING_FILE).write_text(json.dumps(data))
    return copy


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda d: d.pop("plan_search"), "holds no plan search"),
        (lambda d: d["fingerprint"].update(cpu="another CPU"), "another machine"),
        (lambda d: d.update(bundle_digest="sha256:" + "0" * 64), "files changed"),
        (lambda d: d["plan_search"]["chosen"].update(plan={"version": 2}), "malformed"),
        (lambda d: d.update(schema=7), "unreadable or from another version"),
    ],
)
def test_plan_auto_falls_back_cleanly(searched, tmp_path, edit, why):
    path = _edited(searched[0], tmp_path, edit)
    choice = choose_plan(Bundle.load(path))
    assert choice.plan is None and choice.reason.startswith("auto plan: ilf-4 (") and why in choice.reason
    result = invoke(
        "generate", path, "--plan", "auto", "--prompt", "a red circle", "--out", tmp_path / "a.png"
    )
    assert result.exit_code == 0, result.output
    assert why in " ".join(result.output.split()) and "ilf-4: 40 block forwards" in result.output


def test_plan_auto_without_any_tuning(tiny_bundles, tiny_dirs, tmp_path):
    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "bundle")
    assert not (path / TUNING_FILE).exists()
    choice = choose_plan(Bundle.load(path))
    assert choice.plan is None and "no tuning.json" in choice.reason
    result = invoke(
        "generate", tiny_dirs["pixart-alpha"], "--plan", "auto", "--prompt", "x", "--out", tmp_path / "b.png"
    )
    assert result.exit_code == 0 and "auto plan: ilf-10" in result.output


def test_candidates_stay_within_the_bundle_cut_points(tuned):
    bundle = Bundle.load(tuned)
    found = plan_candidates(bundle, steps=[6])
    assert {
        "base-4",
        "ilf-4",
        "cache-6",
        "ilf-6-cache1-4r2",
        "ilf-6-adapt1-4t0.1m2",
        "ilf-6-cache2-4r2",
    } <= set(found)
    for plan in found.values():
        assert set(plan.cut_points) <= set(bundle.manifest.cut_points), plan.name
    steps = [json.dumps([s.to_dict() for s in p.steps]) for p in found.values()]
    assert len(set(steps)) == len(steps)  # no plan twice under two names
    assert set(plan_candidates(bundle)) == {"base-4", "ilf-4", "cache-6"}  # ilf-4: feedback on every step
    with pytest.raises(ConfigError, match=r"not in this bundle.*no segment boundary"):
        resolve_bundle_plan(bundle, "base-6-cache3-4r2")


def test_quality_budgets():
    assert QualityBudget.parse("acc=se,frechet=2") == QualityBudget()
    budget = QualityBudget.parse("acc=0.02,frechet=none,l2=0.1")
    assert (budget.acc, budget.frechet, budget.latent_l2) == (0.02, None, 0.1)
    ref = {"frechet": 50.0}
    row = {"delta_acc": -0.015, "delta_acc_se": 0.01, "frechet": 60.0, "latent_l2": 0.05}
    assert budget.miss(row, ref) is None
    assert "Δacc" in QualityBudget().miss(row, ref)  # -0.015 is more than one standard error down
    assert "Fréchet" in QualityBudget(acc=None).miss(row, ref)
    for bad in ("acc=lots", "speed=2", "frechet=-1", "acc"):
        with pytest.raises(ConfigError, match="--quality-budget"):
            QualityBudget.parse(bad)


def test_tuning_prompts_never_overlap_the_reporting_prompts(tuned):
    assert check_tuning_prompts(100_000, 128) == (100_000, 128)
    for first, count in ((199_990, 20), (200_000, 64), (0, 1)):
        with pytest.raises(ConfigError, match="reporting prompts"):
            check_tuning_prompts(first, count)
    result = invoke("tune", tuned, "--search-plans", "--prompt-offset", 200_000)
    assert result.exit_code == 2 and "reporting prompts (200000 on)" in " ".join(result.output.split())


def test_the_search_needs_tune_first(tiny_bundles, tmp_path):
    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "bundle")
    with pytest.raises(ConfigError, match="tune"):
        search_plans(path, fake_quality, prompts=(100_000, 4))


def test_a_confirmed_search_drops_a_candidate_that_was_only_lucky(tuned, tmp_path):
    """`confirm`: the candidates that would beat the reference are measured again on the next tuning
    prompts; the fastest one within budget there too is chosen, and the file is tuning schema 3."""
    path = shutil.copytree(tuned, tmp_path / "bundle")
    plans = candidates(path)
    asked = []

    def quality(found, reference, first, count):
        asked.append((sorted(found), first, count))
        out = fake_quality(found, reference, first, count)
        if first != 100_000:  # the confirming prompts: the fastest good candidate was only lucky
            out[lucky].update(delta_acc=-0.3, frechet=80.0)
        return out

    unconfirmed = search_plans(path, fake_quality, QualityBudget(), "ilf-4", (100_000, 8), plans, rounds=2)
    lucky = unconfirmed["chosen"]["name"]
    assert lucky != "ilf-4"  # a candidate faster than the reference was chosen without confirmation
    search = search_plans(path, quality, QualityBudget(), "ilf-4", (100_000, 8), plans, rounds=2, confirm=6)
    rows = {r["name"]: r for r in search["candidates"]}
    checked = search["confirm"]["checked"]
    assert search["confirm"]["offset"] == 100_008 and search["confirm"]["n"] == 6
    assert asked[-1][1:] == (100_008, 6) and "ilf-4" in asked[-1][0] and BAD not in asked[-1][0]
    assert "Δacc" in checked[lucky] and search["chosen"]["name"] != lucky
    reference_s = rows["ilf-4"]["seconds_per_image"]
    assert set(checked) == {n for n, r in rows.items() if r["ok"] and r["seconds_per_image"] < reference_s}
    chosen = search["chosen"]["name"]
    assert chosen == "ilf-4" or checked[chosen] is None
    data = json.loads((path / TUNING_FILE).read_text())
    assert data["schema"] == 3 and problem("tuning", data) is None
    assert problem("tuning", {**data, "schema": 2}) is not None  # schema 2 cannot hold a confirmation
    assert choose_plan(Bundle.load(path)).plan.name == chosen  # --plan auto reads schema 3
    with pytest.raises(ConfigError, match="reporting prompts"):
        search_plans(path, quality, QualityBudget(), "ilf-4", (199_990, 8), plans, confirm=4)
    result = invoke("tune", path, "--search-plans", "--confirm-prompts", 1)  # refused before any work
    assert result.exit_code == 2 and "2 or more" in " ".join(result.output.split()), result.output
