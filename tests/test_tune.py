"""`ilf-deploy tune` and `--backend auto`: a valid tuning.json, a failing variant never chosen, the
winner used only on the machine that measured it, ONNX Runtime fp32 (with a message) otherwise."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from collections.abc import Callable

import numpy as np
import onnx
import pytest
from onnx import helper
from typer.testing import CliRunner

from ilf_deploy.checks import tuning
from ilf_deploy.checks.tuning import (
    GIB,
    Candidate,
    MemoryGauge,
    candidates,
    pick_winner,
    timing_plan,
    tune,
    weight_bytes,
)
from ilf_deploy.cli import app
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.files import strict_json
from ilf_deploy.core.runtime.bundle import Bundle, rewrite_manifest
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.core.schemas import problem
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.engines.backends.auto import TUNING_FILE, choose
from ilf_deploy.engines.backends.machine import cpu_has_int8_dot, fingerprint
from ilf_deploy.engines.compare import Check, Limit, Metrics, budget

BROKEN = "broken"


def add_broken_variant(path) -> None:
    """A deliberately wrong and fast variant: every block segment returns its input (no block runs),
    registered as an int8-qdq variant (so OpenVINO, which reads Q/DQ ONNX, gets it too)."""
    bundle = Bundle.load(path)
    segments = {}
    (path / "onnx" / BROKEN).mkdir()
    for name, spec in bundle.manifest.segments.items():
        if not spec.blocks:
            continue
        model = onnx.load(str(bundle.segment_path(name)))
        graph = helper.make_graph(
            [helper.make_node("Identity", ["hidden"], ["hidden_out"])],
            name,
            list(model.graph.input),
            list(model.graph.output),
        )
        skipped = helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
        onnx.save(skipped, str(path / "onnx" / BROKEN / f"{name}.onnx"))
        segments[name] = {**spec.to_dict(), "file": f"onnx/{BROKEN}/{name}.onnx"}

    def mutate(manifest):
        manifest.setdefault("variants", {})[BROKEN] = {
            "mode": "int8-qdq",
            "segments": segments,
            "quantized_layers": {},
            "calibration": None,
            "tools": {},
        }
        manifest["files"].update({s["file"]: "" for s in segments.values()})

    rewrite_manifest(path, mutate)


@pytest.fixture(scope="module")
def tuned(tiny_bundles, tmp_path_factory):
    """The tiny PixArt-α bundle with a broken variant, tuned (torch left out: it is slow and fp32)."""
    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path_factory.mktemp("tune") / "bundle")
    add_broken_variant(path)
    report = tune(path, "ilf-4", budget_s=60, include=lambda c: c.backend != "torch")
    return path, report


def test_tune_writes_a_valid_tuning_json(tuned):
    path, report = tuned
    data = json.loads((path / TUNING_FILE).read_text())
    assert data == json.loads(json.dumps(strict_json(report)))  # an exact segment's SNR: "inf"
    assert data["schema"] == 1 and data["plan"] == "ilf-4" and data["fingerprint"] == fingerprint()
    assert problem("tuning", data) is None
    # a tiny model: every engine fits at once, all timed together (Room), as before there was a choice
    assert data["timed"]["memory"]["mode"] == "interleaved" and data["timed"]["memory"]["groups"] == 1
    assert data["fingerprint"]["cores"] >= 1 and data["fingerprint"]["versions"]["onnxruntime"]
    labels = [c["label"] for c in data["candidates"]]
    assert labels[0] == "onnxruntime fp32" and f"onnxruntime {BROKEN}" in labels
    for candidate in data["candidates"]:
        if candidate["error"] is None:
            assert candidate["ms_per_step"] > 0 and candidate["rounds"] >= 1, candidate
    reference = data["candidates"][0]
    assert reference["speedup"] == pytest.approx(1.0) and reference["ok"]
    winner = next(c for c in data["candidates"] if c["label"] == data["winner"]["label"])
    assert winner["ok"] and winner["ms_per_step"] == min(
        c["ms_per_step"] for c in data["candidates"] if c["ok"] and c["ms_per_step"]
    )
    # tuning.json describes this machine, not the bundle: not hashed, the bundle still verifies
    bundle = Bundle.load(path)
    assert TUNING_FILE not in bundle.manifest.files
    assert not list(path.glob(f".{TUNING_FILE}*"))  # written atomically: no temporary left


def test_tune_never_picks_a_variant_beyond_its_budget(tuned):
    _, report = tuned
    broken = [c for c in report["candidates"] if c["variant"] == BROKEN]
    assert broken and all(not c["ok"] for c in broken)
    for candidate in broken:
        if candidate["error"] is None:  # timed all the same (the table shows what it would gain)
            assert candidate["ms_per_step"] > 0
            assert any(not f["ok"] and f["kind"] == "end-to-end" for f in candidate["fidelity"])
    assert report["winner"]["variant"] != BROKEN


def test_the_winner_is_the_fastest_within_budget():
    fidelity = [Check("end-to-end", "ilf-4", Metrics(5.0, 0.9, 0.5, 1.0), Limit("rel_l2", 0.05))]
    found = [
        Candidate("onnxruntime", None, None, times=[0.010, 0.012]),
        Candidate("onnxruntime", BROKEN, budget("onnxruntime", "int8-qdq"), fidelity=fidelity, times=[0.001]),
        Candidate("openvino", None, budget("openvino", "fp32"), times=[0.008, 0.009, 0.020]),
        Candidate("openvino", "int8_ov", budget("openvino", "int8-ov"), error="did not open"),
    ]
    assert pick_winner(found).label == "openvino fp32"  # median 9 ms; broken 1 ms is out of budget
    found[2].times = [0.05]
    assert pick_winner(found).label == "onnxruntime fp32"


def test_timing_plan_is_the_first_steps_up_to_a_feedback_step(tiny_bundles):
    plan = Bundle.load(tiny_bundles["pixart-alpha"]).plan("ilf-4")
    timed = timing_plan(plan)
    assert timed.steps[-1].feedback and not any(s.feedback for s in timed.steps[:-1])
    assert timed.steps == plan.steps[: timed.num_steps]
    # a plan without feedback: its first step (each step costs the same; all of them made a round
    # of full-depth Flux a minute long, and the budget then skipped the last candidate)
    base = Bundle.load(tiny_bundles["pixart-alpha"]).plan("base-4")
    assert not any(s.feedback for s in base.steps)
    assert timing_plan(base).steps == base.steps[:1]


@pytest.mark.parametrize("spec", ["base-4", "ilf-4"])
def test_tune_on_a_size_dependent_schedule(mmdit_bundles, spec, tmp_path):
    """Flux's plans carry a schedule per image size: the timed steps are cut at every size (a
    timed prefix once kept one size's full schedule and `generate` refused the plan)."""
    path = tmp_path / "flux"
    shutil.copytree(mmdit_bundles["flux"], path)
    plan = timing_plan(Bundle.load(path).plan(spec))
    assert plan.schedules and all(len(t) == plan.num_steps for t in plan.schedules.values())
    report = tune(path, spec, budget_s=120, include=lambda c: c.backend == "openvino" and c.variant is None)
    timed = [c for c in report["candidates"] if c["ms_per_step"]]
    assert len(timed) == 2 and report["timed"]["steps"] == 1, report["candidates"]


def test_candidates_cover_the_installed_engines(tuned):
    path, _ = tuned
    found = {c.label: c for c in candidates(Bundle.load(path))}
    assert "onnxruntime fp32" in found and f"onnxruntime {BROKEN}" in found
    assert {"torch fp32", "torch bf16"} <= set(found)  # the bundle carries its torch model
    assert found["torch bf16"].options == {"dtype": "bf16"}
    # and compiled (torch.compile per block), each with the one budget table's row for its precision
    assert found["torch bf16 compiled"].options == {"dtype": "bf16", "compile": True}
    assert found["torch fp32 compiled"].options == {"compile": True}
    assert found["torch bf16 compiled"].budget == budget("torch", "bf16")
    assert found["torch fp32 compiled"].budget == budget("torch", "fp32")
    found = {(c.backend, c.variant): c for c in candidates(Bundle.load(path))}
    if ("openvino", None) in found and found[("openvino", None)].error is None:
        assert ("openvino", BROKEN) in found  # Q/DQ ONNX: OpenVINO reads it too


def test_candidates_are_checked_likeliest_winner_first(tuned):
    """A budget too short for every check leaves out the last candidates: those are the least likely
    to win (the order every tune table measured so far gives; the timing still decides)."""

    def make(backend, mode, **options):
        return Candidate(backend, mode, budget(backend, mode), precision=mode, options=options)

    shuffled = [
        make("torch", "fp32"),
        make("onnxruntime", "fp8-qdq"),
        make("openvino", "fp32"),
        make("torch", "bf16", dtype="bf16"),
        make("onnxruntime", "int8-dynamic"),
        make("torch", "bf16", dtype="bf16", compile=True),
        make("openvino", "bf16"),
        make("onnxruntime", "fp32"),
        make("openvino", "int8-ov"),
        make("openvino", "int8-ov", precision="bf16"),
    ]
    order = [c.label for c in tuning.likeliest_first(shuffled, bf16=True)]
    assert order == [
        "openvino int8-ov +bf16",
        "openvino int8-ov",
        "onnxruntime int8-dynamic",
        "openvino bf16",
        "torch bf16",
        "torch bf16 compiled",
        "openvino fp32",
        "onnxruntime fp32",
        "torch fp32",
        "onnxruntime fp8-qdq",
    ], order
    # without bf16 hardware, bf16 is emulated: after fp32 (the mixed int8 candidate then is not made)
    order = [c.label for c in tuning.likeliest_first(shuffled[:-1], bf16=False)]
    assert order[:2] == ["openvino int8-ov", "onnxruntime int8-dynamic"], order
    assert order.index("openvino bf16") > order.index("torch fp32"), order
    # without 8-bit dot products (AVX2 only) int8 is no faster than fp32: after it, before emulation
    order = [c.label for c in tuning.likeliest_first(shuffled[:-1], bf16=False, int8_dot=False)]
    assert order[:3] == ["openvino fp32", "onnxruntime fp32", "torch fp32"], order
    assert order[3:5] == ["openvino int8-ov", "onnxruntime int8-dynamic"], order
    # the real list: the reference first, int8 before fp32 where this CPU has 8-bit dot products
    found = candidates(Bundle.load(tuned[0]))
    assert found[0].label == "onnxruntime fp32" and found[0].budget is None
    int8_fp32 = [c for c in found[1:] if c.precision == "fp32" or c.precision.startswith("int8")]
    tiers = [c.precision.startswith("int8") for c in int8_fp32]
    assert tiers == sorted(tiers, reverse=cpu_has_int8_dot()) and any(tiers), [c.label for c in found]


def test_tune_runs_the_compiled_torch_engine_and_auto_opens_it(tiny_bundles, tmp_path):
    """The compiled torch bf16 candidate really compiles (Inductor, cached in the bundle), is checked
    against its budget and timed; as the winner, its options go through tuning.json to `auto`."""
    import torch

    from ilf_deploy.engines.backends.pytorch import COMPILE_CACHE_DIR

    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "bundle")
    compiled_bf16 = lambda c: c.options == {"dtype": "bf16", "compile": True}  # noqa: E731
    report = tune(path, "ilf-4", budget_s=120, include=compiled_bf16)
    assert [c["label"] for c in report["candidates"]] == ["onnxruntime fp32", "torch bf16 compiled"]
    row = report["candidates"][1]
    assert row["error"] is None and row["ms_per_step"] > 0, row
    assert row["options"] == {"dtype": "bf16", "compile": True}
    assert row["budget"] == budget("torch", "bf16").to_dict() and row["ok"], row["fidelity"]
    assert any((path / COMPILE_CACHE_DIR).iterdir())  # Inductor's code, cached in the bundle

    data = json.loads((path / TUNING_FILE).read_text())
    winner = {k: row[k] for k in ("backend", "variant", "options", "label")}
    write(path, {**data, "winner": winner})
    generator = open_generator(path, "auto")
    assert generator.choice.startswith("auto: torch bf16 compiled (")
    assert generator.segments.dtype == torch.bfloat16
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in generator.model.adapter.blocks)
    # without `compile` in the winner's options, auto opens the eager engine: the options matter
    eager = {**row, "options": {"dtype": "bf16"}, "label": "torch bf16"}
    write(path, {**data, "candidates": [*data["candidates"], eager], "winner": eager})
    generator = open_generator(path, "auto")
    assert generator.choice.startswith("auto: torch bf16 (")
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in generator.model.adapter.blocks)


def write(path, data) -> None:
    (path / TUNING_FILE).write_text(json.dumps(data))


def test_auto_uses_the_winner_here_and_falls_back_elsewhere(tuned, tmp_path):
    source, report = tuned
    path = shutil.copytree(source, tmp_path / "bundle")
    ok = [c for c in report["candidates"] if c["ok"] and c["ms_per_step"]]
    pick = ok[-1]  # any candidate within budget (the last is not the reference where there are more)
    write(path, {**report, "winner": {"backend": pick["backend"], "variant": pick["variant"]}})
    generator = open_generator(path, "auto")
    assert (generator.backend, generator.variant) == (pick["backend"], pick["variant"])
    assert generator.choice.startswith(f"auto: {pick['label']} (")

    elsewhere = {**report["fingerprint"], "cpu": "Some Other CPU", "cores": 96}
    write(path, {**report, "fingerprint": elsewhere, "winner": {"backend": pick["backend"]}})
    generator = open_generator(path, "auto")
    assert (generator.backend, generator.variant) == ("onnxruntime", None)
    assert "another machine" in generator.choice and "Some Other CPU" in generator.choice

    newer = {**report["fingerprint"], "versions": {**report["fingerprint"]["versions"], "onnxruntime": "0.1"}}
    write(path, {**report, "fingerprint": newer})
    assert "onnxruntime 0.1 there" in choose(Bundle.load(path)).reason

    # a hand-edited winner that failed its budget is not used either
    write(path, {**report, "winner": {"backend": "onnxruntime", "variant": BROKEN}})
    assert open_generator(path, "auto").variant is None

    # options travel with the winner: torch bf16 (a candidate record within budget, as tune writes it)
    torch_bf16 = {
        "backend": "torch",
        "variant": None,
        "options": {"dtype": "bf16"},
        "label": "torch bf16",
        "ms_per_step": 1.0,
        "ok": True,
    }
    write(path, {**report, "candidates": [*report["candidates"], torch_bf16], "winner": torch_bf16})
    generator = open_generator(path, "auto")
    assert generator.backend == "torch" and str(generator.segments.dtype) == "torch.bfloat16"
    assert generator.choice.startswith("auto: torch bf16 (")

    (path / TUNING_FILE).write_text("{not json")
    assert "unreadable" in choose(Bundle.load(path)).reason
    (path / TUNING_FILE).unlink()
    generator = open_generator(path, "auto")
    assert generator.backend == "onnxruntime" and "no tuning.json" in generator.choice
    # --variant with the default backend (auto): the variant on its own engine (issue 33)
    generator = open_generator(path, "auto", variant=BROKEN)
    assert generator.backend == "onnxruntime" and f"onnxruntime {BROKEN}" in generator.choice
    with pytest.raises(ConfigError, match="not a variant of the bundle"):
        open_generator(path, "auto", variant="int3")


def test_auto_notices_a_bundle_changed_since_tune(tuned, tmp_path):
    source, report = tuned
    path = shutil.copytree(source, tmp_path / "bundle")
    ok = [c for c in report["candidates"] if c["ok"]]
    write(path, {**report, "winner": {"backend": ok[-1]["backend"], "variant": ok[-1]["variant"]}})
    assert choose(Bundle.load(path)).tuned
    rewrite_manifest(path, lambda m: m["files"].update({"plans/base-4.json": ""}))  # re-hashed: same
    assert choose(Bundle.load(path)).tuned
    (path / "plans" / "base-4.json").write_text((path / "plans" / "base-4.json").read_text() + " ")
    rewrite_manifest(path, lambda m: m["files"].update({"plans/base-4.json": ""}))
    assert "changed since" in choose(Bundle.load(path)).reason


def test_cli_tune_and_auto(tuned, tmp_path):
    source, _ = tuned
    path = shutil.copytree(source, tmp_path / "bundle")
    (path / TUNING_FILE).unlink()
    runner = CliRunner()
    args = ["generate", str(path), "--plan", "ilf-4", "--prompt", "a cat", "--latents-out"]
    # the default is auto; without a tuning.json it runs ONNX Runtime fp32 and says nothing new
    result = runner.invoke(app, [*args, str(tmp_path / "a.npy")])
    assert result.exit_code == 0 and "auto:" not in result.output, result.output
    explicit = runner.invoke(app, [*args, str(tmp_path / "b.npy"), "--backend", "onnxruntime"])
    assert explicit.exit_code == 0, explicit.output
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))

    result = runner.invoke(app, ["tune", str(path), "--plans", "ilf-4", "--budget-s", "120", "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads((path / TUNING_FILE).read_text())
    assert printed["winner"]["variant"] != BROKEN
    torch_bf16 = next(c for c in printed["candidates"] if c["label"] == "torch bf16")
    assert torch_bf16["ms_per_step"] and torch_bf16["fidelity"][-1]["kind"] == "end-to-end"
    result = runner.invoke(app, ["tune", str(path), "--plans", "ilf-4", "--budget-s", "120"])
    assert result.exit_code == 0 and "beyond budget" in result.output and "winner" in result.output

    data = json.loads((path / TUNING_FILE).read_text())
    write(path, {**data, "fingerprint": {**data["fingerprint"], "cpu": "Some Other CPU"}})
    result = runner.invoke(app, [*args, str(tmp_path / "c.npy"), "--backend", "auto"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("auto:")]
    assert len(lines) == 1 and "onnxruntime fp32" in lines[0] and "another machine" in lines[0]
    # the default says so too once a tuning.json exists
    result = runner.invoke(app, [*args, str(tmp_path / "d.npy")])
    assert result.exit_code == 0 and "auto: onnxruntime fp32" in result.output
    result = runner.invoke(app, ["tune", str(path), "--budget-s", "0"])
    assert result.exit_code == 2 and "--budget-s" in result.output


def test_timed_generation_is_deterministic_per_request(tiny_bundles):
    """tune times generate_latents on one request: the same request gives the same latents."""
    generator = open_generator(tiny_bundles["pixart-alpha"])
    plan = timing_plan(generator.bundle.plan("ilf-4"))
    request = Request(prompt="x", seed=1)
    np.testing.assert_array_equal(
        generator.generate_latents(plan, request), generator.generate_latents(plan, request)
    )


class OpenEngines:
    """Counts the engines `tune` opens and holds (until they are garbage: dropping the last reference
    is what closes an engine), and plays a machine of `total` bytes on which the process takes 1 GiB
    and each open engine `charge(bundle, backend, variant)` bytes (default 1 GiB)."""

    def __init__(self, monkeypatch, total: float = 0.0, charge=lambda *engine: GIB) -> None:
        self.open = self.most = self.opened = 0
        self.resident = self.peak = GIB
        self.gauge = FakeMemory(self, int(total))
        real = tuning.open_bundle_generator

        def opening(bundle, backend, variant, **options):
            generator = real(bundle, backend, variant, **options)
            size = int(charge(bundle, backend, variant))
            self.open += 1
            self.opened += 1
            self.most = max(self.most, self.open)
            self.resident += size
            self.peak = max(self.peak, self.resident)
            weakref.finalize(generator, self.closed, size)
            return generator

        monkeypatch.setattr(tuning, "open_bundle_generator", opening)

    def closed(self, size: int) -> None:
        self.open -= 1
        self.resident -= size


class FakeMemory(MemoryGauge):
    def __init__(self, engines: OpenEngines, total: int) -> None:
        self.engines, self.total_bytes = engines, total

    def total(self) -> int:
        return self.total_bytes

    def available(self) -> int:
        return self.total_bytes - self.engines.resident

    def resident(self) -> int:
        return self.engines.resident


NO_COMPILE = lambda c: c.backend != "torch" or c.options == {}  # noqa: E731 (torch fp32 eager: fast)


def proportional(path) -> Callable[..., float]:
    """Each engine takes memory in proportion to the files it loads, the reference 1 GiB."""
    scale = GIB / weight_bytes(Bundle.load(path), Candidate("onnxruntime", None, None))
    return lambda bundle, backend, variant: scale * weight_bytes(bundle, Candidate(backend, variant, None))


def test_tune_keeps_what_memory_holds_open_and_times_the_rest_in_groups(tuned, tmp_path, monkeypatch):
    """Room for 2 GiB of candidates beside the process, the reference (1 GiB each) and the 1 GiB kept
    free: the OpenVINO fp32 engine takes 1 GiB, the broken variants 0.74, torch 0.93. They are timed
    in groups of at most 3 engines, each with the reference, the closed ones given back."""
    pytest.importorskip("openvino")  # enough candidates for groups of 3
    # the same candidates in the same order on every CPU: the groups follow the check order, int8
    # (the broken variants) first as where the CPU has 8-bit dot products; no OpenVINO bf16 (made
    # only where the CPU has bf16)
    monkeypatch.setattr(tuning, "cpu_has_int8_dot", lambda: True)
    path = shutil.copytree(tuned[0], tmp_path / "bundle")
    total = 5 * GIB
    engines = OpenEngines(monkeypatch, total=total, charge=proportional(path))
    include = lambda c: NO_COMPILE(c) and c.label != "openvino bf16"  # noqa: E731
    report = tune(path, "ilf-4", budget_s=120, include=include, memory=engines.gauge)
    assert engines.most == 3 and engines.opened == 5, (engines.most, engines.opened)
    assert engines.peak <= total - GIB  # never into the margin
    gc.collect()
    assert engines.open == 0  # nothing kept an engine once tune returned
    data = json.loads((path / TUNING_FILE).read_text())
    assert data == json.loads(json.dumps(strict_json(report))) and problem("tuning", data) is None
    memory = data["timed"]["memory"]
    assert memory["mode"] == "groups" and memory["most_open"] == 3 and memory["max_open"] is None
    assert memory["groups"] == 2 and memory["largest_engine_bytes"] == GIB
    reference, *rows = data["candidates"]
    assert all(row["error"] is None and row["ms_per_step"] for row in rows), rows  # all timed
    groups = {g: [r for r in rows if r["group"] == g] for g in range(1, memory["groups"] + 1)}
    assert [len(members) for members in groups.values()] == [2, 2]  # the broken ones, then fp32
    # the closed group gave back what its engines took
    took = [sum(r["resident_bytes"] for r in groups[g]) for g in (1,)]
    assert memory["released_bytes"] == pytest.approx(took, abs=2)
    assert reference["rounds"] >= memory["groups"]  # timed in every group
    # each speedup is against the reference timed beside it, not its median over all groups
    assert any(row["speedup"] != pytest.approx(reference["ms_per_step"] / row["ms_per_step"]) for row in rows)
    winner = next(c for c in data["candidates"] if c["label"] == data["winner"]["label"])
    assert winner["ok"] and winner["ms_per_step"]


def test_tune_skips_what_does_not_fit_beside_the_reference(tiny_bundles, tmp_path, monkeypatch):
    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "bundle")
    engines = OpenEngines(monkeypatch, total=3 * GIB)  # nothing left beside the reference
    report = tune(path, "ilf-4", budget_s=60, include=NO_COMPILE, memory=engines.gauge)
    assert engines.opened == 1  # the reference only
    reference, *others = report["candidates"]
    assert reference["ms_per_step"] and report["winner"]["label"] == "onnxruntime fp32"
    assert others and all("would not fit beside the reference" in c["error"] for c in others), others
    assert problem("tuning", report) is None


def test_a_small_engine_fits_where_a_large_one_does_not(tiny_bundles, tmp_path, monkeypatch):
    """Memory is estimated per engine from the files it loads: the broken variant (Identity blocks:
    no block weights) fits beside the reference where the torch model (more weights) does not."""
    monkeypatch.setattr(tuning, "cpu_has_int8_dot", lambda: True)  # the broken (int8) variant first
    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "bundle")
    add_broken_variant(path)
    bundle = Bundle.load(path)
    found = {c.label: c for c in candidates(bundle)}
    weights = {label: weight_bytes(bundle, found[label]) for label in found}
    reference = weights["onnxruntime fp32"]
    small, large = (GIB * weights[label] / reference for label in (f"onnxruntime {BROKEN}", "torch fp32"))
    assert 0 < small < large, weights  # in GiB, the reference taking 1
    free = GIB + (small + large) / 2  # the 1 GiB margin, and room for the small one only
    engines = OpenEngines(monkeypatch, total=2 * GIB + free, charge=proportional(path))
    labels = {"onnxruntime fp32", f"onnxruntime {BROKEN}", "torch fp32"}
    report = tune(path, "ilf-4", budget_s=60, include=lambda c: c.label in labels, memory=engines.gauge)
    rows = {c["label"]: c for c in report["candidates"]}
    assert rows[f"onnxruntime {BROKEN}"]["ms_per_step"] and rows[f"onnxruntime {BROKEN}"]["group"] == 1
    assert "would not fit beside the reference" in rows["torch fp32"]["error"], rows["torch fp32"]
    assert engines.opened == 2 and report["timed"]["memory"]["groups"] == 2


def test_cli_tune_max_open(tuned, tmp_path, monkeypatch):
    """`--max-open 2`: the reference and one candidate at a time, whatever the memory."""
    path = shutil.copytree(tuned[0], tmp_path / "bundle")
    engines = OpenEngines(monkeypatch)
    runner = CliRunner()
    args = ["tune", str(path), "--plans", "ilf-4", "--budget-s", "120", "--max-open"]
    result = runner.invoke(app, [*args, "1"])
    assert result.exit_code == 2 and "--max-open must be >= 2" in result.output, result.output
    monkeypatch.setattr(tuning, "candidates", lambda b: [c for c in candidates(b) if NO_COMPILE(c)])
    result = runner.invoke(app, [*args, "2"])
    assert result.exit_code == 0, result.output
    assert engines.most == 2 and engines.opened >= 3
    memory = json.loads((path / TUNING_FILE).read_text())["timed"]["memory"]
    assert memory["max_open"] == 2 and memory["most_open"] == 2 and memory["mode"] == "groups"
    assert f"timed in {memory['groups']} groups of at most 2 engines" in result.output


def test_cli_tune_backends_checks_only_those_engines_besides_the_reference(tuned, tmp_path):
    """`--backends onnxruntime`: the reference and ONNX Runtime's variants, no other engine opened;
    an unknown name is a one-line usage error before any work."""
    path = shutil.copytree(tuned[0], tmp_path / "bundle")
    runner = CliRunner()
    args = ["tune", str(path), "--plans", "ilf-4", "--budget-s", "120", "--backends"]
    result = runner.invoke(app, [*args, "onnxruntime", "--json"])
    assert result.exit_code == 0, result.output
    found = json.loads(result.stdout)["candidates"]
    assert {c["backend"] for c in found} == {"onnxruntime"} and len(found) >= 2  # + its int8 variants
    assert found[0]["label"] == "onnxruntime fp32"
    for bad in ("tensorrtx", ","):
        result = runner.invoke(app, [*args, bad])
        assert result.exit_code == 2 and "--backends" in result.output and "choose from" in result.output
        assert "Traceback" not in result.output
