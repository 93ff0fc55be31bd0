"""Step plans: the papers' block-forward counts, semantics of the builders, JSON, bad input."""

import json

import numpy as np
import pytest

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.plan import (
    CacheSpec,
    StepPlan,
    baseline_plan,
    block_caching_plan,
    block_caching_schedule,
    cache_plan,
    check_block_range,
    compose_plan,
    default_cache_range,
    default_loop,
    delta_dit_plan,
    ilf_plan,
    parse_range,
    parse_step_set,
    post_timestep,
    predicted_speedup,
    preset_name,
    resolve_plan,
)
from ilf_deploy.core.plan.model import key_groups
from ilf_deploy.core.schedulers import DIT_SCHEDULER_CONFIG
from ilf_deploy.core.schemas import problem


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
    with pytest.raises(ConfigError, match="no such plan file"):
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


# -- composed plans (issue 24): ILF feedback steps with a Δ-cache on the other steps -------------


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        # 28 blocks, loop 8-19: feedback steps 0,1,8,9 (28 + 13 each); of plain steps 2..7 the cache
        # is 1, 2 steps old on 2, 3 (reuse), 3 on 4 (refresh), then reuse 5, 6 and refresh 7
        (
            lambda: compose_plan(10, 28, [CacheSpec(5, 22, "c", 3)], loop=(8, 19), feedback="first2,last2"),
            260,
        ),
        # the embedded default model's shape: 8 blocks, loop 3-5, cache-20's range 1-5
        (lambda: resolve_plan("ilf-10-cache1-5r3", 8, loop=(3, 5)), 76),  # 4·12 + 4·3 + 2·8
        (lambda: resolve_plan("ilf-10-cache1-5r2", 8, loop=(3, 5)), 81),  # 4·12 + 3·3 + 3·8
        (lambda: resolve_plan("ilf-12-cache1-5r2", 8, loop=(3, 5)), 92),  # 4·12 + 4·3 + 4·8
        (lambda: resolve_plan("ilf-12-cache1-5r3", 8, loop=(3, 5)), 82),  # 4·12 + 6·3 + 2·8
        (lambda: resolve_plan("ilf-10-cache3-5r3", 8, loop=(3, 5)), 84),  # 4·12 + 4·5 + 2·8
        (lambda: resolve_plan("base-12-cache1-5r2", 8), 66),  # = cache_plan(12, 8, (1, 5), 2)
        # an adaptive plan counts its most (every adaptive op refreshing): ILF-10's 96
        (lambda: resolve_plan("ilf-10-adapt1-5t0.1m2", 8, loop=(3, 5)), 96),
        # Δ-DiT with feedback: deep 2-7 / shallow 0-5 both contain the loop (see the structure test)
        (lambda: delta_dit_plan(10, 8, 6, None, 2, feedback="first2,last2", loop=(3, 5)), 78),
    ],
)
def test_composed_block_forward_counts(build, expected):
    plan = build()
    assert plan.block_forwards == expected
    assert plan.to_dict()["block_forwards"] == expected


def test_composition_without_the_other_method_is_that_method():
    ilf = ilf_plan(10, 8, (3, 5), "first2,last2", "uniform")
    alone = compose_plan(10, 8, [], loop=(3, 5), feedback="first2,last2", t_post="uniform")
    assert alone.steps == ilf.steps
    cache = cache_plan(20, 8, (1, 5), 3)
    plain = compose_plan(20, 8, [CacheSpec(1, 5, "cache", 3)])
    assert plain.steps == cache.steps
    assert resolve_plan("base-20-cache1-5r3", 8).steps == cache.steps


def _ops(step):
    return [(op.kind, op.start, op.end, op.time, op.key) for op in step.ops]


def test_a_feedback_step_refreshes_the_cache_of_the_range_it_recomputes():
    plan = resolve_plan("ilf-10-cache1-5r3", 8, loop=(3, 5), t_post="uniform")
    # the cached range 1-5 contains the loop 3-5: the feedback step stores one Δ across the plain
    # blocks 1-2 and the inner loop (second pass included), under one key
    assert _ops(plan.steps[1]) == [
        ("blocks", 0, 0, "t", None),
        ("cache_refresh", 1, 2, "t", "cache"),
        ("ilf", 3, 5, "t", "cache"),
        ("blocks", 6, 7, "t_post", None),
    ]
    assert key_groups(plan.steps[1].ops)[0][0] == "cache"
    assert [(o.start, o.end) for o in key_groups(plan.steps[1].ops)[0][1]] == [(1, 2), (3, 5)]
    # the next plain steps reuse that Δ over the whole range; the third refreshes it
    assert _ops(plan.steps[2]) == [
        ("blocks", 0, 0, "t", None),
        ("cache_reuse", 1, 5, "t", "cache"),
        ("blocks", 6, 7, "t", None),
    ]
    kinds = [next(op.kind for op in s.ops if op.key) for s in plan.steps]
    assert kinds[2:8] == ["cache_reuse", "cache_reuse", "cache_refresh"] * 2
    assert plan.version == 2 and plan.cut_points == [0, 1, 3, 6, 8]


def test_ranges_that_meet_the_loop_at_its_edges():
    before = compose_plan(6, 8, [CacheSpec(1, 2, "c", 3)], loop=(3, 5), feedback="first1,last1")
    assert _ops(before.steps[0])[1:3] == [("cache_refresh", 1, 2, "t", "c"), ("ilf", 3, 5, "t", None)]
    assert before.version == 1  # nothing a version-1 reader cannot run
    after = compose_plan(6, 8, [CacheSpec(6, 7, "c", 3)], loop=(3, 5), feedback="first1,last1")
    # after the loop a feedback step runs at t_post, so its refresh stores the t_post Δ
    assert _ops(after.steps[0])[-1] == ("cache_refresh", 6, 7, "t_post", "c")
    assert _ops(after.steps[1])[-1] == ("cache_reuse", 6, 7, "t", "c")
    exact = compose_plan(6, 8, [CacheSpec(3, 5, "c", 2)], loop=(3, 5), feedback="first1,last1")
    assert _ops(exact.steps[0])[1] == ("ilf", 3, 5, "t", "c") and exact.version == 2
    for partial in [(4, 7), (2, 4), (4, 4)]:
        with pytest.raises(ConfigError, match="overlaps the ILF loop 3:5 in part"):
            compose_plan(6, 8, [CacheSpec(*partial, "c", 2)], loop=(3, 5), feedback="first1,last1")
    with pytest.raises(ConfigError, match="overlap on step 0"):
        compose_plan(6, 8, [CacheSpec(1, 3, "a"), CacheSpec(3, 5, "b")])


def test_delta_dit_and_block_caching_compose_with_feedback():
    plan = delta_dit_plan(10, 8, 6, None, 2, feedback="first2,last2", loop=(3, 5), t_post="uniform")
    assert _ops(plan.steps[0])[1:] == [
        ("cache_refresh", 2, 2, "t", "deep"),
        ("ilf", 3, 5, "t", "deep"),
        ("cache_refresh", 6, 7, "t_post", "deep"),
    ]
    assert _ops(plan.steps[8])[0:2] == [
        ("cache_refresh", 0, 2, "t", "shallow"),
        ("ilf", 3, 5, "t", "shallow"),
    ]
    with pytest.raises(ConfigError, match="in part"):  # deep 5-7 cuts the loop
        delta_dit_plan(10, 8, 3, None, 2, feedback="first2,last2", loop=(3, 5))
    changes = np.full((10, 8), 0.3)
    blocks = block_caching_plan(changes, 0.5, feedback="first2,last2", loop=(3, 5), t_post="uniform")
    assert blocks.feedback_steps == [0, 1, 8, 9] and blocks.loop == (3, 5)
    # every block recomputes on feedback steps; the loop's blocks are one cached range
    loop_ops = [op for s in blocks.steps for op in s.ops if op.start == 3]
    assert all((op.start, op.end) == (3, 5) for op in loop_ops)
    assert block_caching_schedule(changes, 0.5, forced=[1])[1].all()


def test_plan_versions_and_the_compatibility_rule(tmp_path):
    adaptive = resolve_plan("ilf-10-adapt1-5t0.1m2", 8, loop=(3, 5))
    data = json.loads(adaptive.to_json())
    assert data["version"] == 2 and problem("plan", data) is None
    assert StepPlan.from_dict(data) == adaptive
    assert resolve_plan("ilf-10", 8, loop=(3, 5)).to_dict()["version"] == 1  # old plans stay version 1
    for version in (4, 0, True):
        with pytest.raises(ConfigError, match=r"this tool reads 1, 2, 3.*rebuild"):
            StepPlan.from_dict({**data, "version": version})
    old = {**data, "version": 1}  # a version-1 plan cannot carry the new op: the schema says so
    with pytest.raises(ConfigError, match="malformed"):
        StepPlan.from_dict(old)
    # version 1 never stored the inner loop's Δ: a key on an ilf op is read as no key, and two
    # consecutive ops sharing a key (a version-2 range) are refused rather than read otherwise
    composed = json.loads(resolve_plan("ilf-10-cache3-5r3", 8, loop=(3, 5)).to_json())
    assert composed["version"] == 2
    with pytest.raises(ConfigError, match="reuse of key 'cache' before any refresh"):
        StepPlan.from_dict({**composed, "version": 1})
    grouped = json.loads(resolve_plan("ilf-10-cache1-5r3", 8, loop=(3, 5)).to_json())
    with pytest.raises(ConfigError, match="covers blocks 1:5 here and 1:2 elsewhere"):
        StepPlan.from_dict({**grouped, "version": 1})  # without the ilf key, 1-2 alone is refreshed
    split = cache_plan(4, 8, (1, 5), 2).to_dict()
    split["steps"][0]["ops"][1:2] = [
        {"op": "cache_refresh", "start": 1, "end": 2, "key": "cache"},
        {"op": "cache_refresh", "start": 3, "end": 5, "key": "cache"},
    ]
    assert StepPlan.from_dict({**split, "version": 2}).version == 2
    with pytest.raises(ConfigError, match="version 1 plans cannot say"):
        StepPlan.from_dict(split)


def test_adaptive_ops_carry_their_rule():
    data = resolve_plan("ilf-10-adapt1-5t0.1m2", 8, loop=(3, 5)).to_dict()
    op = data["steps"][3]["ops"][1]
    assert op == {
        "op": "cache_adaptive",
        "start": 1,
        "end": 5,
        "time": "t",
        "key": "cache",
        "threshold": 0.1,
        "max_reuse": 2,
    }
    for field, value, message in [("threshold", None, "threshold"), ("max_reuse", 0, "max_reuse")]:
        bad = json.loads(json.dumps(data))
        bad["steps"][3]["ops"][1][field] = value
        with pytest.raises(ConfigError, match=message):
            StepPlan.from_dict(bad)
    bad = json.loads(json.dumps(data))
    bad["steps"][3]["ops"][0]["threshold"] = 0.1  # only adaptive ops have one
    with pytest.raises(ConfigError, match="malformed"):
        StepPlan.from_dict(bad)


def test_a_key_covers_one_range():
    data = cache_plan(6, 8, (1, 5), 2).to_dict()
    data["steps"][1]["ops"] = [
        {"op": "blocks", "start": 0, "end": 0},
        {"op": "cache_reuse", "start": 1, "end": 4, "key": "cache"},
        {"op": "blocks", "start": 5, "end": 7},
    ]
    with pytest.raises(ConfigError, match="covers blocks 1:4 here and 1:5 elsewhere"):
        StepPlan.from_dict(data)


def test_composed_presets_and_their_names():
    plan = resolve_plan("ilf-10-adapt1-5t0.05m3", 8, loop=(3, 5))
    spec = plan.settings["caches"][0]
    assert plan.name == "ilf-10-adapt1-5t0.05m3" and spec["threshold"] == 0.05 and spec["max_reuse"] == 3
    assert (
        preset_name(10, True, CacheSpec(1, 5, "cache", threshold=1e-7, max_reuse=2))
        == "ilf-10-adapt1-5t0.0000001m2"
    )
    for bad in ("cache-20-cache1-5r3", "ilf-10-cache1-5", "ilf-10-adapt1-5t0.1"):
        with pytest.raises(ConfigError, match="unknown plan"):
            resolve_plan(bad, 8)


def test_cli_composed_plan(tmp_path):
    from typer.testing import CliRunner

    from ilf_deploy.cli import app

    out = tmp_path / "p.json"
    args = ["plan", "--model", "default", "--steps", "10", "--feedback", "first2,last2", "--cache", "1:5"]
    result = CliRunner().invoke(app, [*args, "--refresh-every", "3", "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (
        json.loads(result.output)["block_forwards"] == 76 and StepPlan.load(out).name == "ilf-10-cache1-5r3"
    )
    result = CliRunner().invoke(app, [*args, "--adaptive", "0.1"])
    assert result.exit_code == 0 and "at most 96 block forwards" in " ".join(result.output.split())
    result = CliRunner().invoke(app, [*args, "--delta-dit", "3"])
    assert result.exit_code == 2 and "choose one caching method" in result.output
