"""One plan spec, one plan: generate, serve (a request's `plan` and `--default-plan`), batch and the
Triton model resolve every spec form through backends.plans, to the same plan data or the same
one-line refusal (issue 34: "the same plan spec gives the same plan at every front door")."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ilf_deploy.cli import app as cli
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.plan import resolve_plan
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.engines.backends.plans import PlanError, resolve_bundle_plan

PROMPT = "a small red circle"
FILE = "@file"  # the table's stand-in for a plan JSON file of the bundle (written by the fixture)
WRONG_DEPTH = "@wrong-depth"  # a plan file for an 8-block model (the bundle's has 6)

# Every form that names a plan: bundled names, `auto` (no tuning.json here: the default plan), a
# plan file, presets (plain, ILF, caching; composed fixed and adaptive; upper case reads the same).
GOOD = [
    "base-4",
    "ilf-4",
    "cache-6",
    "auto",
    FILE,
    "base-2",
    "ilf-6",
    "ILF-5",
    "ilf-4-cache1-4r2",
    "ilf-4-adapt1-4t0.1m2",
    "base-3-cache1-4r2",
]
# Specs every front door refuses, and the one line it says.
BAD = {
    "nope": "unknown plan 'nope'; this bundle has: base-4, ilf-4, cache-6",
    "cache-6-cache1-4r2": "unknown plan 'cache-6-cache1-4r2'; this bundle has: base-4, ilf-4, cache-6",
    "missing.json": "plan 'missing.json': no such plan file",
    "base-0": "plan 'base-0': steps must be >= 1, got 0",
    "base-4-cache0-2r2": "as a preset, it cuts the model at block(s) [3] where this bundle",
    WRONG_DEPTH: "it is for 8 blocks; this model has 6",
    # longer than a file name may be: refused as unknown, never an OSError from the filesystem
    "x" * 256: f"unknown plan {'x' * 256!r}; this bundle has: base-4, ilf-4, cache-6",
}


@pytest.fixture(scope="module")
def bundle(tmp_path_factory) -> Path:
    """A 6-block PixArt bundle: cut points 0, 1, 2, 5, 6 (cache-6's range 1-4, ILF loop 2-4)."""
    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.model.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("plan-resolution")
    model = make_tiny_pipeline("pixart-alpha", root / "model", seed=7, num_layers=6)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-4", "ilf-4", "cache-6")))


@pytest.fixture(scope="module")
def files(bundle, tmp_path_factory) -> dict[str, str]:
    """The table's file stand-ins -> real paths: a plan of the bundle, and one for another depth."""
    root = tmp_path_factory.mktemp("plan-files")
    plan = dataclasses.replace(resolve_bundle_plan(Bundle.load(bundle), "ilf-5"), name="from-file")
    (root / "plan.json").write_text(json.dumps(plan.to_dict()))
    (root / "deep.json").write_text(json.dumps(resolve_plan("base-4", 8).to_dict()))
    return {FILE: str(root / "plan.json"), WRONG_DEPTH: str(root / "deep.json")}


@pytest.fixture(scope="module")
def generator(bundle):
    return open_generator(bundle)


def real(spec: str, files: dict[str, str]) -> str:
    return files.get(spec, spec)


def data(plan) -> str:
    return json.dumps(plan.to_dict(), sort_keys=True)


# -- the front doors, each as it resolves a spec: (plan data) or raises with its one line ------------
def at_generate(bundle: Path, spec: str) -> str:
    """generate's own resolver (cli/generate.open_source), the one `generate --plan` calls."""
    from ilf_deploy.cli.generate import open_source

    _, resolve, _ = open_source(str(bundle), "onnxruntime")
    return data(resolve(spec, (32, 32)))


def at_serve_request(client: TestClient, spec: str) -> str:
    """A request's `plan`: the HTTP path's check, then the plan the batcher runs for it."""
    state = client.app.state.ilf
    response = client.post("/v1/images/generations", json={"prompt": PROMPT, "plan": spec, "seed": 0})
    if response.status_code != 200:
        raise ConfigError(response.json()["error"]["message"])
    checked, _ = state.check({"prompt": PROMPT, "plan": spec})
    return data(state.plans[checked.plan])


def at_serve_default(bundle: Path, generator, spec: str) -> str:
    from ilf_deploy.serving.serve.app import create_app
    from ilf_deploy.serving.serve.state import ServeOptions

    state = create_app(bundle, ServeOptions(default_plan=spec, warmup=False), generator).state.ilf
    return data(state.plans[state.contract.default_plan])


def at_triton(generator, spec: str) -> str:
    from ilf_deploy.serving.triton.model import Engine

    engine = Engine(generator)
    row = engine.rows(
        0,
        {
            "prompt": np.array([[PROMPT.encode()]], dtype=object),
            "plan": np.array([[spec.encode()]], dtype=object),
        },
    )[0]
    return data(engine.plans[row.key.plan])


def at_batch(bundle: Path, specs: list[str], tmp_path: Path, default: str | None = None) -> dict[str, Any]:
    """Each spec as one row of a local batch: its plan as the worker runs it, or the row's error."""
    from ilf_deploy.serving.scale.batch import prepare
    from ilf_deploy.serving.scale.options import BatchOptions
    from ilf_deploy.serving.scale.worker import BatchWorker

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": PROMPT, "plan": s, "seed": 0}) + "\n" for s in specs))
    prepared = prepare(BatchOptions(bundle, prompts, tmp_path / "out", plan=default, backend="onnxruntime"))
    try:
        worker = BatchWorker(bundle, generator=prepared.generator, plans=prepared.plans)
        found: dict[str, Any] = {specs[w["index"]]: data(worker.plan(w["plan"])) for w in prepared.jobs}
    finally:
        prepared.results.close()
    for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines():
        row = json.loads(line)
        found[specs[row["index"]]] = ConfigError(row["error"])
    return found


def outcome(call, *args) -> Any:
    try:
        return call(*args)
    except ConfigError as exc:  # PlanError, and the HTTP/CLI wrappers' one line
        return exc


def message(value: Any) -> str:
    assert isinstance(value, ConfigError), value
    text = getattr(value, "message", str(value))
    assert "\n" not in text
    return text


@pytest.fixture(scope="module")
def client(bundle, generator):
    from ilf_deploy.serving.serve.app import create_app
    from ilf_deploy.serving.serve.state import ServeOptions

    with TestClient(create_app(bundle, ServeOptions(warmup=False), generator)) as client:
        yield client


# -- the table at every front door ------------------------------------------------------------------------
@pytest.mark.parametrize("spec", GOOD)
def test_a_good_spec_is_the_same_plan_at_every_front_door(bundle, files, generator, client, tmp_path, spec):
    path = real(spec, files)
    expected = data(resolve_bundle_plan(Bundle.load(bundle), path))
    assert at_generate(bundle, path) == expected
    assert at_serve_default(bundle, generator, path) == expected
    assert at_batch(bundle, [path], tmp_path)[path] == expected
    if spec == FILE:  # a request body may not make a server read its files; the command line may
        assert_no_files_from_requests(client, generator, path)
    else:
        assert at_serve_request(client, path) == expected
        assert at_triton(generator, path) == expected


@pytest.mark.parametrize("spec", list(BAD), ids=lambda spec: spec[:24])
def test_a_bad_spec_is_the_same_one_line_refusal_at_every_front_door(
    bundle, files, generator, client, tmp_path, spec
):
    path = real(spec, files)
    with pytest.raises(PlanError) as resolver:
        resolve_bundle_plan(Bundle.load(bundle), path)
    said = resolver.value.message
    assert BAD[spec] in said and "\n" not in said
    assert message(outcome(at_generate, bundle, path)) == said
    assert message(outcome(at_serve_default, bundle, generator, path)) == f"--default-plan: {said}"
    assert message(at_batch(bundle, [path], tmp_path)[path]) == said
    if path.endswith(".json"):
        assert_no_files_from_requests(client, generator, path)
    else:
        assert message(outcome(at_serve_request, client, path)) == said
        assert message(outcome(at_triton, generator, path)) == said


def assert_no_files_from_requests(client: TestClient, generator, path: str) -> None:
    said = f"plan {path!r}: plan files are read from the command line only, not from a request"
    assert message(outcome(at_serve_request, client, path)) == said
    assert message(outcome(at_triton, generator, path)) == said


def test_generate_runs_a_composed_preset_and_refuses_a_bad_spec_in_one_line(bundle, tmp_path):
    def generate(spec: str, out: str):
        args = ["generate", str(bundle), "--prompt", PROMPT, "--plan", spec, "--out", str(tmp_path / out)]
        return CliRunner().invoke(cli, args)

    good = generate("ilf-4-cache1-4r2", "a.png")
    assert good.exit_code == 0 and "ilf-4-cache1-4r2:" in good.output, good.output
    bad = generate("base-4-cache0-2r2", "b.png")
    assert bad.exit_code == 2 and len(bad.output.strip().splitlines()) == 1, bad.output
    assert (
        "--plan: plan 'base-4-cache0-2r2': not in this bundle (it has: base-4, ilf-4, cache-6); "
        "as a preset, it cuts" in bad.output
    )
    assert not (tmp_path / "b.png").exists()


def test_batch_default_plan_takes_every_form_and_workers_run_the_drivers_plan(bundle, files, tmp_path):
    """--plan auto / a file / a preset: rows without a plan get it, resolved once by the driver."""
    from ilf_deploy.serving.scale.batch import prepare
    from ilf_deploy.serving.scale.options import BatchOptions

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"prompt": PROMPT, "seed": 0}) + "\n")
    for spec in ("auto", files[FILE], "ilf-4-adapt1-4t0.1m2"):
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        prepared = prepare(BatchOptions(bundle, prompts, out, plan=spec, backend="onnxruntime"))
        prepared.results.close()
        assert [w["plan"] for w in prepared.jobs] == [spec]
        assert prepared.plans[spec] == resolve_bundle_plan(Bundle.load(bundle), spec).to_dict()


def test_generate_plan_auto_reads_the_bundle_once(bundle, tmp_path, loads):
    """`generate --plan auto` used to parse the manifest up to 5 times: now the engine's load is all."""
    args = ["generate", str(bundle), "--prompt", PROMPT, "--plan", "auto", "--out", str(tmp_path / "x.png")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "auto plan: ilf-4 (no tuning.json" in result.output and "ilf-4: " in result.output
    assert loads == [bundle]
