"""One request contract for every front door: `serve`, the real `tritonserver` and `generate` give
the same verdict on the same request, in the same words (ilf_deploy/core/runtime/request.py).

A table of good and bad requests goes to `serve` (FastAPI TestClient) and to Triton (the real
server on 127.0.0.1 with free ports, stopped by its PID; skipped without it); `generate` refuses
the same bad ones. A bounded schemathesis run (every check, derandomized) holds serve's OpenAPI
document and the server to each other, and Triton's `ilf_requests_total` counts a refused request.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.cli import app as cli
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.request import (
    MAX_SEED,
    MESSAGES,
    NOT_BLANK,
    SPACES,
    RequestContract,
    RequestError,
    Size,
)
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.model.tiny import make_tiny_pipeline
from ilf_deploy.serving.serve import ServeOptions, create_app
from ilf_deploy.serving.triton.repository import ExportOptions, export_repository
from tests.test_triton import SERVER, free_port, needs_server, start_server, stop

GEN = "/v1/images/generations"
PROMPT = "a small red circle on a blue background"
AT_LIMIT = "circle " * 119  # 119 words + </s>: 120 tokens, the tiny model's limit
OVER = "circle " * 120
LIMITS_PAGE = Path(__file__).resolve().parent.parent / "docs" / "serving.md"  # "Request limits"
S, T, G = "serve", "triton", "generate"  # the front doors a row goes to
ALL = (S, T, G)

# (id, request as JSON, verdict: None = accepted, else the message, front doors)
PIXART = [
    ("plain", {"prompt": PROMPT}, None, (S, T)),
    ("all-fields", {"prompt": PROMPT, "seed": 0, "plan": "base-2", "size": "32x32"}, None, (S, T)),
    ("max-seed", {"prompt": PROMPT, "seed": MAX_SEED}, None, (S, T)),
    ("unguided", {"prompt": PROMPT, "guidance_scale": 0.0}, None, ALL),
    ("max-guidance", {"prompt": PROMPT, "guidance_scale": 30.0}, None, (S, T)),
    ("negative", {"prompt": PROMPT, "negative_prompt": "blurry"}, None, (S, T)),
    ("unicode", {"prompt": "ünïcödé 🎨 circle"}, None, (S, T)),
    ("120-tokens", {"prompt": AT_LIMIT}, None, ALL),
    ("n-integral-float", {"prompt": PROMPT, "n": 2.0}, None, (S,)),
    ("seed-integral-float", {"prompt": PROMPT, "seed": 7.0}, None, (S,)),
    ("empty", {"prompt": ""}, "prompt must not be empty", (S, T)),
    ("blank", {"prompt": " \t\u3000"}, "prompt must not be empty", ALL),
    (
        "121-tokens",
        {"prompt": OVER},
        "prompt is 121 tokens long; this model reads at most 120 (longer prompts are refused, not truncated)",
        ALL,
    ),
    ("chars", {"prompt": "x" * 4001}, "prompt is 4001 characters long; at most 4000 are accepted", ALL),
    (
        "negative-chars",
        {"prompt": PROMPT, "negative_prompt": "y" * 4001},
        "negative_prompt is 4001 characters long; at most 4000 are accepted",
        ALL,
    ),
    (
        "negative-tokens",
        {"prompt": PROMPT, "negative_prompt": "circle " * 150},
        "negative_prompt is 151 tokens long; this model reads at most 120 "
        "(longer prompts are refused, not truncated)",
        ALL,
    ),
    ("seed-negative", {"prompt": PROMPT, "seed": -1}, "seed must be >= 0, got -1", ALL),
    ("seed-2^32", {"prompt": PROMPT, "seed": 2**32}, "seed must be <= 4294967295, got 4294967296", ALL),
    (
        "guidance-high",
        {"prompt": PROMPT, "guidance_scale": 30.5},
        "guidance_scale must be in 0..30, got 30.5",
        ALL,
    ),
    (
        "guidance-low",
        {"prompt": PROMPT, "guidance_scale": -0.5},
        "guidance_scale must be in 0..30, got -0.5",
        ALL,
    ),
    (
        "guidance-nan",
        {"prompt": PROMPT, "guidance_scale": math.nan},
        "guidance_scale must be in 0..30, got nan",
        ALL,
    ),
    (
        "plan",
        {"prompt": PROMPT, "plan": "nope"},
        "unknown plan 'nope'; this bundle has: base-2, ilf-4",
        ALL,  # one plan resolver (engines/backends/plans.py): generate says it in the same words
    ),
    (
        "size",
        {"prompt": PROMPT, "size": "64x64"},
        "the bundle was built for 32x32, not 64x64 (width x height)",
        ALL,
    ),
    ("n-high", {"prompt": PROMPT, "n": 5}, "n must be in 1..4, got 5", (S,)),
    ("n-fraction", {"prompt": PROMPT, "n": 1.5}, "n must be an integer, got 1.5", (S,)),
    ("seed-boolean", {"prompt": PROMPT, "seed": True}, "seed must be an integer, got a boolean", (S,)),
    ("seed-string", {"prompt": PROMPT, "seed": "1"}, "seed must be an integer, got a string", (S,)),
    ("size-form", {"prompt": PROMPT, "size": "32"}, "size must be WIDTHxHEIGHT (e.g. 32x32), got '32'", (S,)),
    ("missing-prompt", {"seed": 1}, "prompt is required", (S, T, G)),
    ("unknown", {"prompt": PROMPT, "colour": "red"}, "unknown parameter 'colour'", (S,)),
    (
        "class-label-on-pixart",
        {"prompt": PROMPT, "class_label": 1},
        "class_label does not apply to pixart-alpha models",
        (S, G),
    ),
]
DIT = [
    ("class", {"class_label": 3}, None, (S, T)),
    ("class-high", {"class_label": 1000}, "class_label must be in 0..999, got 1000", ALL),
    ("class-negative", {"class_label": -1}, "class_label must be in 0..999, got -1", ALL),
    ("class-missing", {"seed": 1}, "class_label is required", ALL),
    (
        "negative-on-dit",
        {"class_label": 3, "negative_prompt": "x"},
        "negative_prompt does not apply to dit models",
        (S, G),
    ),
]


def rows(table: list, door: str) -> list:
    return [pytest.param(fields, verdict, id=name) for name, fields, verdict, doors in table if door in doors]


# -- fixtures --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundles(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("contract")
    pixart = make_tiny_pipeline("pixart-alpha", root / "pixart", num_layers=4)
    dit = make_tiny_pipeline("dit", root / "dit", num_layers=2)
    return {
        "pixart": build_bundle(pixart, root / "pixart-bundle", BuildOptions(plans=("base-2", "ilf-4"))),
        "dit": build_bundle(dit, root / "dit-bundle", BuildOptions(plans=("base-2",), copy_model=False)),
    }


@pytest.fixture(scope="module")
def generators(bundles):
    return {name: open_generator(path) for name, path in bundles.items()}


@pytest.fixture(scope="module")
def serve(bundles, generators) -> Iterator[dict[str, TestClient]]:
    apps = {name: create_app(bundles[name], ServeOptions(max_n=4), generators[name]) for name in bundles}
    with TestClient(apps["pixart"]) as pixart, TestClient(apps["dit"]) as dit:
        for client in (pixart, dit):
            deadline = time.monotonic() + 30
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.05)
        yield {"pixart": pixart, "dit": dit}


@pytest.fixture(scope="module")
def triton(bundles, tmp_path_factory):
    if SERVER is None:
        pytest.skip("tritonserver is not installed: `make setup` runs `ilf-deploy install-triton`")
    repo = tmp_path_factory.mktemp("contract-repo")
    export_repository(bundles["pixart"], repo, ExportOptions(name="pixart"))
    export_repository(bundles["dit"], repo, ExportOptions(name="dit"))
    ports = (free_port(), free_port(), free_port())
    log = tmp_path_factory.mktemp("contract-log") / "tritonserver.log"
    command = SERVER.command(repo, *ports, host="127.0.0.1")
    server = start_server(command, SERVER.environment(), log, ["pixart", "dit"], ports)
    import tritonclient.http as http

    client = http.InferenceServerClient(server.http, network_timeout=120)
    yield server, http, client
    client.close()
    stop(server.process)


# -- sending a row -------------------------------------------------------------------------------
def post(client: TestClient, fields: dict[str, Any]):
    """The row as JSON (NaN as Python's json writes it: the server's parser reads it)."""
    return client.post(GEN, content=json.dumps(fields), headers={"content-type": "application/json"})


TRITON_TYPES = {
    "prompt": ("BYTES", object),
    "negative_prompt": ("BYTES", object),
    "plan": ("BYTES", object),
    "class_label": ("INT64", np.int64),
    "seed": ("INT64", np.int64),
    "guidance_scale": ("FP32", np.float32),
    "height": ("INT32", np.int32),
    "width": ("INT32", np.int32),
}


def triton_inputs(http, fields: dict[str, Any]) -> list:
    values = dict(fields)
    if "size" in values:
        width, height = values.pop("size").split("x")
        values.update(height=int(height), width=int(width))
    tensors = []
    for name, value in values.items():
        datatype, dtype = TRITON_TYPES[name]
        array = np.array([[value.encode() if isinstance(value, str) else value]], dtype=dtype)
        tensor = http.InferInput(name, list(array.shape), datatype)
        tensor.set_data_from_numpy(array)
        tensors.append(tensor)
    return tensors


def generate_args(bundle: Path, fields: dict[str, Any], out: Path) -> list[str]:
    options = {"prompt": "--prompt", "negative_prompt": "--negative-prompt", "seed": "--seed"}
    options |= {"guidance_scale": "--guidance-scale", "class_label": "--class-label", "plan": "--plan"}
    args = ["generate", str(bundle), "--plan", "base-2", "--out", str(out)]
    for name, value in fields.items():
        if name == "size":
            width, height = value.split("x")
            args += ["--width", width, "--height", height]
        else:
            args += [options[name], str(value)]
    return args


# -- the table, at every front door ------------------------------------------------------------------
@pytest.mark.parametrize(("fields", "verdict"), rows(PIXART, S))
def test_serve_verdicts(serve, fields, verdict):
    check_serve(serve["pixart"], fields, verdict)


@pytest.mark.parametrize(("fields", "verdict"), rows(DIT, S))
def test_serve_verdicts_dit(serve, fields, verdict):
    check_serve(serve["dit"], fields, verdict)


def check_serve(client: TestClient, fields: dict[str, Any], verdict: str | None) -> None:
    response = post(client, fields)
    if verdict is None:
        assert response.status_code == 200, response.text
        assert len(response.json()["data"]) == int(fields.get("n", 1))
    else:
        assert response.status_code == 400, response.text
        assert response.json()["error"]["message"] == verdict


@needs_server
@pytest.mark.parametrize(("fields", "verdict"), rows(PIXART, T))
def test_triton_verdicts(triton, fields, verdict):
    check_triton(triton, "pixart", fields, verdict)


@needs_server
@pytest.mark.parametrize(("fields", "verdict"), rows(DIT, T))
def test_triton_verdicts_dit(triton, fields, verdict):
    check_triton(triton, "dit", fields, verdict)


def check_triton(triton, model: str, fields: dict[str, Any], verdict: str | None) -> None:
    from tritonclient.utils import InferenceServerException

    _, http, client = triton
    if verdict is None:
        assert client.infer(model, triton_inputs(http, fields)).as_numpy("image").shape == (1, 32, 32, 3)
        return
    with pytest.raises(InferenceServerException) as error:
        client.infer(model, triton_inputs(http, fields))
    assert error.value.status() == "400" and error.value.message() == verdict


@pytest.mark.parametrize(
    ("model", "fields", "verdict"),
    [pytest.param("pixart", *p.values, id=p.id) for p in rows(PIXART, G)]
    + [pytest.param("dit", *p.values, id=f"dit-{p.id}") for p in rows(DIT, G)],
)
def test_generate_verdicts(bundles, tmp_path, model, fields, verdict):
    result = CliRunner().invoke(cli, generate_args(bundles[model], fields, tmp_path / "x.png"))
    if verdict is None:
        assert result.exit_code == 0, result.output
        assert (tmp_path / "x.png").is_file()
    else:  # one line, exit 2: the contract's words, after the option that carried the field
        assert result.exit_code == 2, result.output
        assert verdict in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert not (tmp_path / "x.png").exists()


def test_generate_and_serve_pin_the_bundle_digest(bundles, generators, tmp_path):
    from ilf_deploy.core.runtime.manifest import BundleError

    bundle, other = bundles["pixart"], "sha256:" + "0" * 64
    digest = Bundle.load(bundle, verify_hashes=False).digest
    args = [
        "generate",
        str(bundle),
        "--prompt",
        PROMPT,
        "--plan",
        "base-2",
        "--out",
        str(tmp_path / "x.png"),
        "--force",
    ]
    assert CliRunner().invoke(cli, [*args, "--digest", digest]).exit_code == 0
    refused = CliRunner().invoke(cli, [*args, "--digest", other])
    assert (
        refused.exit_code == 2 and f"has digest {digest}, not the pinned --digest {other}" in refused.output
    )
    assert create_app(bundle, ServeOptions(digest=digest, warmup=False), generators["pixart"])
    with pytest.raises(BundleError, match="not the pinned --digest"):
        create_app(bundle, ServeOptions(digest=other, warmup=False))


def test_invalid_utf8_is_the_same_verdict_as_json_and_bytes(serve, request):
    """JSON carries no bytes: a lone surrogate is its way of sending what is not text."""
    response = serve["pixart"].post(
        GEN, content=b'{"prompt": "\\ud800"}', headers={"content-type": "application/json"}
    )
    assert response.json()["error"]["message"] == "prompt is not valid UTF-8 text"
    if SERVER is None:
        return
    from tritonclient.utils import InferenceServerException

    _, http, client = request.getfixturevalue("triton")
    tensors = triton_inputs(http, {"prompt": PROMPT})
    tensors[0].set_data_from_numpy(np.array([[b"\xff"]], dtype=object))
    with pytest.raises(InferenceServerException) as error:
        client.infer("pixart", tensors)
    assert error.value.message() == "prompt is not valid UTF-8 text"


# -- the contract itself ---------------------------------------------------------------------------
def test_the_contract_decides_defaults_through_the_generator(bundles, generators):
    for name, guidance in (("pixart", 4.5), ("dit", 4.0)):
        contract = RequestContract.for_bundle(Bundle.load(bundles[name]), generators[name], max_n=3)
        fields = {"class_label": 1} if name == "dit" else {"prompt": PROMPT}
        checked = contract.check({**fields, "seed": 9, "n": 3})
        assert [r.seed for r in checked.requests] == [9, 10, 11]
        first = checked.requests[0]
        assert (first.guidance_scale, first.height, first.width) == (guidance, 32, 32)  # Generator.resolve
        assert checked.plan == ("ilf-4" if name == "pixart" else "base-2") and checked.guided
        assert 0 <= contract.check(fields).requests[0].seed <= MAX_SEED  # a random seed
    contract = RequestContract.for_bundle(Bundle.load(bundles["pixart"]), generators["pixart"])
    assert contract.check({"prompt": PROMPT, "size": Size(32, None)}).requests[0].width == 32
    with pytest.raises(RequestError) as error:
        contract.check({"prompt": PROMPT, "size": Size(32, 64)})
    assert error.value.param == "size" and "not 64x32 (width x height)" in error.value.message


def test_prompt_characters_are_counted_before_tokenising(bundles, generators):
    contract = RequestContract.for_bundle(Bundle.load(bundles["pixart"]), generators["pixart"])
    calls = []
    counted = RequestContract(**{**contract.__dict__, "count_tokens": lambda t: calls.append(t) or 1})
    with pytest.raises(RequestError, match="characters long"):
        counted.check({"prompt": "x" * 10_000_000})
    with pytest.raises(RequestError, match="seed"):
        counted.check({"prompt": PROMPT, "seed": -1})  # every cheap check before the tokenizer
    assert calls == []
    counted.check({"prompt": PROMPT, "negative_prompt": "blurry"})
    assert calls == [PROMPT, "blurry"]


def test_the_blank_pattern_is_pythons_whitespace():
    import sys

    spaces = "".join(c for c in map(chr, range(sys.maxunicode + 1)) if c.isspace())
    assert spaces == SPACES
    assert [c for c in spaces + "a\x00\u200b\ufeff" if re.fullmatch(NOT_BLANK, c) is None] == list(spaces)


def test_the_docs_list_every_limit_message():
    """docs/serving.md "Request limits" has one row per verdict, its message as the contract writes it."""
    text = LIMITS_PAGE.read_text()
    for verdict, template in MESSAGES.items():
        shown = re.sub(r"\{(\w+)(![rsa])?(:[^}]*)?\}", r"{\1}", template)
        assert f"`{shown}`" in text, (verdict, shown)


# -- Triton counts a refused request as refused ---------------------------------------------------
@needs_server
def test_triton_counts_a_refused_request_as_refused(triton):
    """In our own `ilf_requests_total` (Triton 2.51 counts a Python model's requests per execution:
    its `nv_inference_request_success` moves for refusals too; docs/triton.md ("Triton Inference Server"))."""
    from tritonclient.utils import InferenceServerException

    server, http, client = triton

    def counts() -> tuple[float, float]:
        return tuple(
            server.metric("ilf_requests_total", f'pixart",outcome="{k}') for k in ("success", "refused")
        )

    def wait_for(expected: tuple[float, float]) -> tuple[float, float]:
        deadline = time.monotonic() + 10
        while counts() != expected and time.monotonic() < deadline:
            time.sleep(0.1)
        return counts()

    success, refused = counts()
    with pytest.raises(InferenceServerException) as error:
        client.infer("pixart", triton_inputs(http, {"prompt": PROMPT, "seed": 2**32}))
    assert error.value.message() == "seed must be <= 4294967295, got 4294967296"
    assert wait_for((success, refused + 1)) == (success, refused + 1)
    client.infer("pixart", triton_inputs(http, {"prompt": PROMPT, "seed": 1}))
    assert wait_for((success + 1, refused + 1)) == (success + 1, refused + 1)
    assert client.is_model_ready("pixart")


# -- serve's OpenAPI document and the server agree ---------------------------------------------------
def test_schemathesis_all_checks_against_serve(bundles, generators):
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from ilf_deploy.core.runtime.request import PROMPT_FORMAT
    from ilf_deploy.model.tokenizer import DEFAULT_VOCAB
    from ilf_deploy.serving.serve.background import background_server

    # What the prompt format means (the model's token limit): words of the vocabulary and others.
    words = st.sampled_from([*DEFAULT_VOCAB[:80], "ünïcödé", "🎨", "zzyzx"])
    schemathesis.openapi.format(PROMPT_FORMAT, st.lists(words, min_size=1, max_size=60).map(" ".join))
    app = create_app(bundles["pixart"], ServeOptions(max_n=2, max_wait_ms=0), generators["pixart"])
    schema = schemathesis.openapi.from_dict(app.openapi())
    operations = [result.ok() for result in schema.get_all_operations()]
    files = "/v1/images/files/{image_id}"  # response_format "url"'s links
    assert {op.path for op in operations} == {GEN, "/v1/models", "/healthz", "/readyz", "/metrics", files}
    calls: dict[int, int] = {}
    started = time.monotonic()
    with background_server(app) as url:
        import httpx

        while httpx.get(f"{url}/readyz").status_code != 200:
            time.sleep(0.05)
        for operation in operations:
            modes = [schemathesis.GenerationMode.POSITIVE]
            if operation.path == GEN:  # the GETs take no input: nothing to make invalid
                modes.append(schemathesis.GenerationMode.NEGATIVE)
            for mode in modes:

                @settings(
                    max_examples=40 if operation.path == GEN else 3,
                    derandomize=True,
                    deadline=None,
                    database=None,
                    suppress_health_check=list(HealthCheck),
                )
                @given(case=operation.as_strategy(mode))
                def call(case) -> None:
                    response = case.call_and_validate(base_url=url, timeout=60)  # every enabled check
                    calls[response.status_code] = calls.get(response.status_code, 0) + 1

                call()
    assert all(code < 500 for code in calls), calls
    assert calls.get(200, 0) >= 20 and calls.get(400, 0) >= 10, calls  # both kinds were exercised
    assert time.monotonic() - started < 60
