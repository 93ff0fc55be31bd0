"""Composed and adaptive plans at run time (issue 24): what a feedback step refreshes, the block
forwards that ran, adaptive decisions per image whatever the batch, on numpy and torch arrays, and
`build`/`verify`/`generate`/`bench` on a bundle of such plans."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from ilf_deploy.cli import app
from ilf_deploy.core.plan import CacheSpec, Op, Step, StepPlan, compose_plan, ilf_plan
from ilf_deploy.core.runtime import cache as cache_module
from ilf_deploy.core.runtime.cache import CacheState, mix, take
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.core.runtime.loop import denoise
from ilf_deploy.core.schedulers import PIXART_SCHEDULER_CONFIG, scheduler_coefficients
from ilf_deploy.core.schemas import problem
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.engines.backends.pytorch import TorchGenerator

LOOP = (2, 4)  # the tiny models' feedback loop (6 blocks)
PROMPTS = ["a small red circle at the top left", "a big blue square on green", "a yellow triangle"]
REQUESTS = [Request(prompt=p, seed=i) for i, p in enumerate(PROMPTS)]


def composed(threshold=None, max_reuse=2, every=3, steps=6, feedback="first1,last1"):
    spec = CacheSpec(1, 4, "cache", every, threshold=threshold, max_reuse=max_reuse)
    return compose_plan(steps, 6, [spec], loop=LOOP, feedback=feedback, t_post="uniform")


@pytest.fixture(scope="module")
def torch_gen(tiny_models):
    return TorchGenerator(tiny_models["pixart-alpha"])


@pytest.fixture(scope="module")
def ort_gen(tiny_bundles):
    return open_generator(tiny_bundles["pixart-alpha"], "onnxruntime")  # cut points 0, 1, 2, 5, 6


def run(gen, plan, requests=REQUESTS):
    latents = gen.latents_to_numpy(gen.generate_batch(plan, requests))
    return latents, list(gen.last_block_forwards)


@pytest.mark.parametrize("engine", ["torch_gen", "ort_gen"])
def test_composed_plans_run_what_they_say(engine, request):
    gen = request.getfixturevalue(engine)
    ilf = ilf_plan(6, 6, LOOP, "first1,last1", "uniform")
    every_step = composed(every=1)  # refreshed on every step: the ILF plan, op for op
    want, counts = run(gen, ilf)
    got, got_counts = run(gen, every_step)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert counts == got_counts == [ilf.block_forwards] * 3
    # an adaptive op that may always reuse reuses at most max_reuse times in a row: the fixed plan
    # that refreshes every (max_reuse + 1)-th step, the feedback steps refreshing too
    fixed, adaptive = composed(every=3), composed(threshold=1e9, max_reuse=2)
    want, counts = run(gen, fixed)
    got, got_counts = run(gen, adaptive)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert counts == got_counts == [fixed.block_forwards] * 3 and fixed.block_forwards < ilf.block_forwards
    # a threshold of 0 never reuses (the probe always moves): as many block forwards as refreshing
    _, counts = run(gen, composed(threshold=0.0))
    assert counts == [composed(threshold=0.0).block_forwards] * 3 == [ilf.block_forwards] * 3


def first_changes(gen, plan):
    """The per-image probe changes an adaptive plan's first adaptive op sees."""
    seen = []
    original = cache_module.CacheState.change

    def spy(self, hidden, reference):
        seen.append(original(self, hidden, reference))
        return seen[-1]

    cache_module.CacheState.change = spy
    try:
        run(gen, plan)
    finally:
        cache_module.CacheState.change = original
    return seen[0]


@pytest.mark.parametrize("engine", ["torch_gen", "ort_gen"])
def test_adaptive_decisions_are_per_image_and_independent_of_the_batch(engine, request):
    gen = request.getfixturevalue(engine)
    one_decision = composed(threshold=1e9, steps=2, feedback="first1")  # a feedback step, then one choice
    changes = first_changes(gen, one_decision)
    threshold = (min(changes) + max(changes)) / 2  # far from every image's change: no rounding flips it
    assert all(abs(c - threshold) > 1e-3 * threshold for c in changes)
    reused = [c <= threshold for c in changes]
    _, counts = run(gen, composed(threshold=threshold, steps=2, feedback="first1"))
    assert counts == [10 + (2 if r else 6) for r in reused] and len(set(counts)) == 2  # 10: the ILF step
    for plan in (composed(threshold=threshold, steps=2, feedback="first1"), composed(threshold=threshold)):
        together, counts = run(gen, plan)
        for i, one in enumerate(REQUESTS):
            alone, (count,) = run(gen, plan, [one])
            assert count == counts[i]
            np.testing.assert_allclose(together[i : i + 1], alone, rtol=1e-4, atol=1e-3)  # sums reorder
            again, (count_again,) = run(gen, plan, [one])
            np.testing.assert_array_equal(again, alone)  # deterministic per image
            assert count_again == count


class RowSegments:
    """Fake segments on numpy rows: every block multiplies by 1.1 and adds 0.1·t, row by row, so a
    batch and its images alone must agree bit for bit."""

    latent_channels, num_blocks, loop = 1, 3, None

    def __init__(self):
        self.timings, self.rows_run = {}, []

    def context(self, inputs):
        return {"shift": inputs["shift"]}

    def conditioning(self, timestep, context):
        return {**context, "t": np.full(context["shift"].shape, timestep / 1000, np.float64)}

    def embed(self, latents, cond):
        return {"hidden": latents.reshape(latents.shape[0], -1).astype(np.float64)}

    def blocks(self, start, end, state, cond):
        hidden = state["hidden"]
        self.rows_run.append(hidden.shape[0])
        for _ in range(start, end + 1):
            hidden = hidden * 1.1 + 0.1 * cond["t"][:, None] + cond["shift"][:, None]
        return {"hidden": hidden}

    def final(self, state, cond, height, width):
        hidden = state["hidden"]
        return hidden.reshape(hidden.shape[0], 1, height, width)

    def concat(self, arrays):
        return np.concatenate(arrays)


def row_plan(threshold, max_reuse):
    coefficients = scheduler_coefficients(PIXART_SCHEDULER_CONFIG, 6)
    adaptive = Op("cache_adaptive", 1, 2, "t", "c", threshold, max_reuse)
    steps = tuple(
        Step(i, float(k.timestep), None, (Op("blocks", 0, 0), adaptive), "t", k)
        for i, k in enumerate(coefficients)
    )
    return StepPlan("rows", 3, "DPMSolverMultistepScheduler", steps)


@pytest.mark.parametrize("guided", [False, True])
def test_adaptive_batches_split_exactly_on_numpy_rows(guided):
    rng = np.random.default_rng(0)
    latents = rng.standard_normal((4, 1, 2, 2)) * np.array([1, 5, 0.2, 3])[:, None, None, None]
    shift = rng.standard_normal(8 if guided else 4) * 0.5
    scale = 3.0 if guided else 1.0
    probe = CacheState(4, guided)
    seen = []
    probe.change = lambda h, r: seen.append(CacheState.change(probe, h, r)) or seen[-1]
    denoise(RowSegments(), row_plan(1e9, 2), latents, {"shift": shift}, scale, cache=probe)
    plan = row_plan(float(np.median(seen[0])), 2)  # half the images reuse at the first choice
    seg = RowSegments()
    cache = CacheState(4, guided)
    together = denoise(seg, plan, latents, {"shift": shift}, scale, cache=cache)
    assert len(set(cache.block_forwards)) > 1 and any(0 < r < (8 if guided else 4) for r in seg.rows_run)
    for i in range(4):
        rows = [i, 4 + i] if guided else [i]
        one = CacheState(1, guided)
        alone = denoise(RowSegments(), plan, latents[i : i + 1], {"shift": shift[rows]}, scale, cache=one)
        np.testing.assert_array_equal(together[i : i + 1], alone)
        assert one.block_forwards == [cache.block_forwards[i]]


def test_take_and_mix_keep_the_batch_order():
    seg = RowSegments()
    whole, part = np.arange(6.0)[:, None], -np.arange(1.0, 4.0)[:, None]
    assert take(seg, whole, [0, 1, 4]).ravel().tolist() == [0, 1, 4]
    assert mix(seg, [0, 1, 4], part, whole).ravel().tolist() == [-1, -2, 2, 3, -3, 5]
    assert mix(seg, [5], part[:1], whole).ravel().tolist() == [0, 1, 2, 3, 4, -1]
    state = CacheState(3, True)
    assert state.rows([0, 2]) == [0, 2, 3, 5]


# -- a bundle of composed and adaptive plans: build, verify, generate, bench --------------------

PLANS = ("base-4", "ilf-6", "ilf-6-cache1-4r2", "ilf-6-adapt1-4t0.3m1")


@pytest.fixture(scope="module")
def composed_bundle(tiny_dirs, tmp_path_factory):
    from ilf_deploy.build.export.build import BuildOptions, build_bundle

    return build_bundle(
        tiny_dirs["pixart-alpha"], tmp_path_factory.mktemp("composed") / "bundle", BuildOptions(plans=PLANS)
    )


def test_build_exports_the_cut_points_composed_plans_need(composed_bundle):
    manifest = json.loads((composed_bundle / "manifest.json").read_text())
    assert manifest["cut_points"] == [0, 1, 2, 5, 6]  # cache 1-4 and loop 2-4
    for name in PLANS:
        data = json.loads((composed_bundle / "plans" / f"{name}.json").read_text())
        assert problem("plan", data) is None
        assert data["version"] == (2 if name.count("-") > 1 else 1), name


def test_verify_passes_on_composed_and_adaptive_plans(composed_bundle, tmp_path):
    report = tmp_path / "verify.json"
    result = CliRunner().invoke(app, ["verify", str(composed_bundle), "--json-out", str(report)])
    assert result.exit_code == 0, result.output
    checked = " ".join(c["name"] for c in json.loads(report.read_text()) if c["kind"] == "end-to-end")
    assert all(name in checked for name in PLANS), checked


def test_generate_and_bench_report_the_block_forwards_that_ran(composed_bundle, tmp_path):
    plan = "ilf-6-adapt1-4t0.3m1"
    result = CliRunner().invoke(
        app,
        [
            "generate",
            str(composed_bundle),
            "--plan",
            plan,
            "--prompt",
            PROMPTS[0],
            "--out",
            str(tmp_path / "a.png"),
        ],
    )
    assert result.exit_code == 0, result.output
    gen = open_generator(composed_bundle, "onnxruntime")
    _, (ran,) = run(
        gen, gen_plan := StepPlan.load(composed_bundle / "plans" / f"{plan}.json"), [Request(PROMPTS[0])]
    )
    assert f"{plan}: {ran} block forwards (at most {gen_plan.block_forwards})" in " ".join(
        result.output.split()
    )
    bench = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        [
            "bench",
            str(composed_bundle),
            "--plans",
            f"ilf-6,{plan}",
            "--runs",
            "1",
            "--warmup",
            "0",
            "--prompt",
            PROMPTS[0],
            "--json-out",
            str(bench),
        ],
    )
    assert result.exit_code == 0, result.output
    rows = {row["plan"]: row for row in json.loads(bench.read_text())["plans"]}
    assert rows["ilf-6"]["block_forwards"] == 4 * 10 + 2 * 6 and rows[plan]["block_forwards"] == ran


def test_serve_counts_the_block_forwards_that_ran(composed_bundle):
    from fastapi.testclient import TestClient

    from ilf_deploy.serving.serve import ServeOptions, create_app

    plan = "ilf-6-adapt1-4t0.3m1"
    with TestClient(create_app(composed_bundle, ServeOptions(warmup=False))) as client:
        response = client.post(
            "/v1/images/generations", json={"prompt": PROMPTS[0], "plan": plan, "seed": 0, "n": 2}
        )
        assert response.status_code == 200, response.text
        metrics = client.get("/metrics").text
    gen = open_generator(composed_bundle, "onnxruntime")
    _, counts = run(
        gen,
        StepPlan.load(composed_bundle / "plans" / f"{plan}.json"),
        [Request(PROMPTS[0], seed=0), Request(PROMPTS[0], seed=1)],
    )
    line = next(x for x in metrics.splitlines() if x.startswith("ilf_block_forwards_total") and plan in x)
    assert float(line.split()[-1]) == sum(counts)
