"""`bench` times the text encoder on a cold prompt (issue 33): the runs reuse the cached prompt
embedding, so the stage table has a row for what a new prompt costs, outside the latency."""

from __future__ import annotations

from ilf_deploy.checks.bench import COLD_PROMPT, bench_plans
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.engines.backends import open_generator


def test_the_cold_prompt_row(tiny_bundles):
    path = tiny_bundles["pixart-alpha"]
    generator = open_generator(path, "onnxruntime")
    plan = Bundle.load(path).plan("ilf-4")
    (result,) = bench_plans(generator, [plan], Request("a red circle", seed=0), runs=2, warmup=1)
    calls, seconds = result.stages[COLD_PROMPT]
    assert calls == 1 and seconds > 0
    assert "text_encoder" not in result.stages  # the measured runs encode nothing: the cache
    generator.segments.timings.clear()
    generator.encode_prompt("another prompt")
    assert len(generator.segments.timings["text_encoder"]) == 1  # what the row times: one encoder call


def test_no_row_for_class_conditional_models(tiny_bundles):
    path = tiny_bundles["dit"]
    generator = open_generator(path, "onnxruntime")
    plan = Bundle.load(path).plan(Bundle.load(path).default_plan)
    (result,) = bench_plans(generator, [plan], Request("", class_label=1, seed=0), runs=1, warmup=1)
    assert COLD_PROMPT not in result.stages and result.stages
