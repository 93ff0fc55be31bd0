"""Step plans: the papers' block-forward counts, semantics of the builders, JSON, bad input."""

import json

import numpy as np
import pytest

from ilf_deploy.errors import ConfigError
from ilf_deploy.plan import (
    StepPlan,
    baseline_plan,
    block_caching_plan,
    block_caching_schedule,
    cache_plan,
    check_block_range,
    default_cache_range,
    default_loop,
    delta_dit_plan,
    ilf_plan,
    parse_range,
    parse_step_set,
    post_timestep,
    predicted_speedup,
    resolve_plan,
)
from ilf_deploy.schedulers import DIT_SCHEDULER_CONFIG


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (lambda: baseline_plan(20, 28), 560),
        (lambda: baseline_plan(12, 28), 336),
        (lambda: ilf_plan(10, 28, (8, 19), "first2,last2"), 332),  # 28·10 + 13·4
        (lambda: ilf_plan(12, 28, (8, 19), "first2,last2"), 388),  # skip the inner 8 steps
        (lambda: ilf_plan(12, 28, (0, 5), "all"), 420),
        (lambda: cache_plan(20, 28, (5, 22), 3), 326),  # inner 18 refreshed every 3rd step
        (lambda: cache_plan(20, 28, (5, 22), 2), 380),  # every other step
    ],
)
def test_papers_block_forward_counts(build, expected):
    plan = build()
    assert plan.block_forwards == expected
    assert plan.to_dict()["block_forwards"] == expected


def test_paper_defaults_scale_to_depth():
    assert default_loop(28) == (8, 19)
    assert default_cache_range(28) == (5, 22)
    start, end = default_loop(8)
    assert 0 <= start < end < 8


def test_ilf_step_structure():
    plan = ilf_plan(10, 28, (8, 19), "first2,last2", "rescale")
    assert plan.feedback_steps == [0, 1, 8, 9]
    step = plan.steps[0]
    assert [(op.kind, op.start, op.end, op.time) for op in step.ops] == [
        ("blocks", 0, 7, "t"),
        ("ilf", 8, 19, "t"),
        ("blocks", 20, 27, "t_post"),
    ]
    assert step.final_time == "t_post" and step.block_forwards == 28 + 13
    assert plan.steps[4].t_post is None and plan.steps[4].block_forwards == 28
    assert plan.cut_points == [0, 8, 20, 28]


def test_t_post_modes_follow_equations_4_and_5():
    # t=999 -> next 899, n=28, m=12
    gap_scale = 100 * 28 / 12
    assert post_timestep("none", 999, 899, 28, 12, True) == 999
    assert post_timestep("uniform", 999, 899, 28, 12, True) == pytest.approx(949)
    assert post_timestep("rescale", 999, 899, 28, 12, True) == pytest.approx(999 - gap_scale)
    # anneal: first step as eq. 4, later steps eq. 5 with a floor of 10
    assert post_timestep("anneal", 999, 899, 28, 12, True) == pytest.approx(999 - gap_scale)
    assert post_timestep("anneal", 500, 400, 28, 12, False) == pytest.approx(500 - gap_scale * 0.5)
    assert post_timestep("anneal", 20, 19, 28, 12, False) == pytest.approx(10)
    assert post_timestep("rescale", 100, 0, 28, 12, False) == 0.0  # clamped, never negative
    with pytest.raises(ConfigError):
        post_timestep("bogus", 1, 0, 28, 12, True)


def test_ilf_plan_uses_plan_t_post():
    plan = ilf_plan(10, 28, (8, 19), "all", "uniform")
    for step in plan.steps:
        gap = step.timestep - step.coefficients.prev_timestep
        assert step.t_post == pytest.approx(step.timestep - gap / 2)


def test_step_sets():
    assert parse_step_set("first2,last2", 10) == [0, 1, 8, 9]
    assert parse_step_set("0,1,8,9", 10) == [0, 1, 8, 9]
    assert parse_step_set("all", 3) == [0, 1, 2]
    assert parse_step_set("none", 3) == []
    with pytest.raises(ConfigError, match="only 10"):
        parse_step_set("first6,last6", 10)
    with pytest.raises(ConfigError, match="out of range"):
        parse_step_set("0,12", 10)
    with pytest.raises(ConfigError):
        parse_step_set("middle", 10)


@pytest.mark.parametrize(
    ("loop", "message"), [((20, 30), "out of range"), ((-1, 3), "out of range"), ((9, 8), "starts after")]
)
def test_bad_loops(loop, message):
    with pytest.raises(ConfigError, match=message):
        ilf_plan(10, 28, loop)


def test_more_feedback_steps_than_steps():
    with pytest.raises(ConfigError):
        ilf_plan(3, 28, (8, 19), "first2,last2")


def test_cache_plan_refresh_pattern():
    plan = cache_plan(7, 28, (5, 22), 3)
    kinds = [next(op.kind for op in s.ops if op.start == 5) for s in plan.steps]
    assert kinds == ["cache_refresh", "cache_reuse", "cache_reuse"] * 2 + ["cache_refresh"]


def test_delta_dit_caches_deep_then_shallow():
    plan = delta_dit_plan(10, 28, num_cached=21, boundary=4, refresh_every=2)
    early, late = plan.steps[1].ops, plan.steps[5].ops
    assert [(op.kind, op.start, op.end) for op in early] == [("blocks", 0, 6), ("cache_reuse", 7, 27)]
    assert [(op.kind, op.start, op.end) for op in late] == [("cache_reuse", 0, 20), ("blocks", 21, 27)]
    assert plan.steps[4].ops[0].kind == "cache_refresh"  # a new stage starts with a refresh
    assert plan.block_forwards == 28 * 10 - 21 * 5  # reused on steps 1, 3 (deep) and 5, 7, 9 (shallow)


def test_block_caching_schedule_equation_7():
    changes = np.array([[0, 0], [0.2, 0.6], [0.2, 0.6], [0.2, 0.6], [0.5, 0.1]])
    refresh = block_caching_schedule(changes, delta=0.5)
    # block 0: 0.2, 0.4 (keep), 0.6 > 0.5 -> refresh at step 3; then 0.5 <= 0.5 keep
    assert refresh[:, 0].tolist() == [True, False, False, True, False]
    # block 1: every step exceeds 0.5 -> always recomputed
    assert refresh[:, 1].tolist() == [True, True, True, True, False]


def test_block_caching_plan_groups_identical_schedules():
    changes = np.zeros((6, 4))
    changes[:, :2] = 0.3  # blocks 0-1 share a schedule
    changes[:, 2:] = 1.0  # blocks 2-3 always recompute
    plan = block_caching_plan(changes, delta=0.5)
    step2 = plan.steps[2].ops
    assert [(op.kind, op.start, op.end) for op in step2] == [("cache_refresh", 0, 1), ("blocks", 2, 3)]
    assert plan.steps[1].ops[0].kind == "cache_reuse"
    assert plan.block_forwards == 6 * 4 - 2 * 3


def test_json_round_trip_and_version(tmp_path):
    plan = ilf_plan(10, 28, (8, 19))
    path = tmp_path / "plan.json"
    plan.save(path)
    assert StepPlan.load(path) == plan
    data = json.loads(path.read_text())
    data["version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="version"):
        StepPlan.load(path)


def test_malformed_plan_is_refused():
    data = baseline_plan(4, 8).to_dict()
    data["steps"][1]["ops"][0]["end"] = 5  # leaves blocks 6-7 uncovered
    with pytest.raises(ConfigError, match="cover"):
        StepPlan.from_dict(data)


def test_presets_and_files(tmp_path):
    assert resolve_plan("base-20").block_forwards == 560
    assert resolve_plan("ilf-10").block_forwards == 332
    assert resolve_plan("cache-20").block_forwards == 326
    assert resolve_plan("ilf-10", 8, loop=(2, 5)).loop == (2, 5)
    ddim = resolve_plan("base-10", 8, DIT_SCHEDULER_CONFIG)
    assert ddim.scheduler == "DDIMScheduler"
    path = tmp_path / "p.json"
    baseline_plan(5, 8).save(path)
    assert resolve_plan(str(path), 8).num_steps == 5
    with pytest.raises(ConfigError, match="8 blocks"):
        resolve_plan(str(path), 28)
    with pytest.raises(ConfigError, match="unknown plan"):
        resolve_plan("turbo-3")
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_plan(str(tmp_path / "missing.json"))


def test_predicted_speedup():
    assert predicted_speedup(resolve_plan("ilf-10")) == pytest.approx(560 / 332)


# -- the one block-range check: its messages name the option, field or op that is out of range ----


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: cache_plan(10, 8, (3, 99)),
            "cache range 3:99: block 99 is out of range (the model has blocks 0..7)",
        ),
        (lambda: cache_plan(10, 8, (-1, 3)), "cache range -1:3: block -1 is out of range"),
        (lambda: cache_plan(10, 8, (5, 3)), "cache range 5:3 is empty"),
        (lambda: ilf_plan(10, 8, (2, 8)), "loop 2:8: block 8 is out of range (the model has blocks 0..7)"),
        (lambda: ilf_plan(10, 8, (5, 3)), "loop 5:3 is empty"),
        (
            lambda: check_block_range(0, 1, 0, "--cache"),
            "--cache 0:1: block 0 is out of range (the model has no blocks)",
        ),
        (lambda: parse_range("3:99", "--cache", 8), "--cache 3:99: block 99 is out of range"),
    ],
)
def test_range_errors_name_the_range(build, message):
    with pytest.raises(ConfigError) as info:
        build()
    assert message in str(info.value)
    assert "loop" not in str(info.value) or message.startswith("loop")  # a cache range is no loop


def test_plan_validation_uses_the_range_check():
    data = cache_plan(4, 8, (2, 5)).to_dict()
    data["steps"][1]["ops"][1]["end"] = 99
    with pytest.raises(
        ConfigError, match=r"plan 'cache-4' step 1 cache_reuse 2:99: block 99 is out of range"
    ):
        StepPlan.from_dict(data)
    data = ilf_plan(4, 8, (2, 5)).to_dict()
    data["loop"] = [2, 9]
    with pytest.raises(ConfigError, match=r"plan 'ilf-4' loop 2:9: block 9 is out of range \(the model has"):
        StepPlan.from_dict(data)
    data = baseline_plan(2, 8).to_dict()
    data["steps"][0]["ops"] = [{"op": "blocks", "start": 0, "end": 3}, {"op": "blocks", "start": 4, "end": 2}]
    with pytest.raises(ConfigError, match=r"plan 'base-2' step 0 blocks 4:2 is empty"):
        StepPlan.from_dict(data)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ("--model", "default", "--cache", "3:99"),
            "--cache 3:99: block 99 is out of range (the model has blocks 0..7)",
        ),
        (("--blocks", "8", "--cache", "5:3"), "--cache 5:3 is empty"),
        (("--blocks", "8", "--cache", "5-3"), "--cache '5-3' is not of the form B:E"),
        (
            ("--blocks", "8", "--loop", "2:8"),
            "--loop 2:8: block 8 is out of range (the model has blocks 0..7)",
        ),
    ],
)
def test_cli_range_errors_name_the_option(args, message):
    from typer.testing import CliRunner

    from ilf_deploy.cli import app

    result = CliRunner().invoke(app, ["plan", "--steps", "6", *args])
    assert result.exit_code == 2, result.output
    text = result.output.strip()
    assert "Traceback" not in text and len(text.splitlines()) == 1, text
    assert message in text
