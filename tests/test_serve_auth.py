"""`ilf-deploy serve` on a shared network: API keys, request ids, structured logs, per-key limits.

One tiny PixArt-α bundle (2 blocks, plan base-2) for the module; servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import hmac
import io
import json
import logging
import re
import secrets
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi.testclient import TestClient

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.model.tiny import make_tiny_pipeline
from ilf_deploy.serving.serve import ServeOptions, auth, create_app
from ilf_deploy.serving.serve.auth import ApiKeys, check_exposure, load_keys
from ilf_deploy.serving.serve.background import background_server
from ilf_deploy.serving.serve.logs import HumanFormatter, JsonFormatter
from tests.test_serve import SlowGenerator, metric, png, wait_ready

GEN = "/v1/images/generations"
ALICE = "alice-0123456789abcdefXYZ"
BOB = "bob-0123456789abcdefXYZ+/="
WRONG = "wrong-0123456789abcdefXYZ"
SECRETS = (ALICE, BOB, WRONG)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-auth")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=2)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-2",)))


@pytest.fixture(scope="module")
def generator(bundle):
    return open_generator(bundle)


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> ApiKeys:
    path = tmp_path_factory.mktemp("keys") / "keys.txt"
    path.write_text(f"# the team's keys\nalice:{ALICE}\n\nbob:{BOB}\n")
    return load_keys(path)


@pytest.fixture(scope="module")
def client(bundle, generator, keys) -> Iterator[TestClient]:
    with TestClient(create_app(bundle, ServeOptions(max_n=2, api_keys=keys), generator)) as test_client:
        wait_ready(test_client)
        yield test_client


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def captured_logs() -> Iterator[dict[str, io.StringIO]]:
    """The package's log lines, formatted both ways, while the test runs."""
    streams = {"json": io.StringIO(), "human": io.StringIO()}
    handlers = []
    for name, formatter in (("json", JsonFormatter()), ("human", HumanFormatter())):
        handler = logging.StreamHandler(streams[name])
        handler.setFormatter(formatter)
        handlers.append(handler)
    logger = logging.getLogger("ilf_deploy")
    level = logger.level
    logger.setLevel(logging.INFO)
    for handler in handlers:
        logger.addHandler(handler)
    try:
        yield streams
    finally:
        for handler in handlers:
            logger.removeHandler(handler)
        logger.setLevel(level)


# -- keys ----------------------------------------------------------------------------------------------
def test_keys_from_file_and_env(tmp_path, keys):
    assert keys.names == ("alice", "bob")
    assert keys.identify(f"Bearer {ALICE}") == "alice" and keys.identify(f"bearer  {BOB} ") == "bob"
    for header in (None, "", "Bearer", f"Bearer {WRONG}", f"Basic {ALICE}", ALICE, f"Bearer {ALICE}x"):
        assert keys.identify(header) is None, header
    assert ALICE not in repr(keys) and ALICE not in repr(ServeOptions(api_keys=keys))

    env = load_keys(None, f"ci:{WRONG}, {ALICE}\n{BOB}")  # commas or newlines; unnamed keys numbered
    assert env.names == ("ci", "key2", "key3") and env.identify(f"Bearer {BOB}") == "key3"
    file = tmp_path / "k"
    file.write_text(f"{ALICE}\n")
    both = load_keys(file, f"ci:{WRONG}")
    assert both.names == ("key1", "ci") and both.identify(f"Bearer {WRONG}") == "ci"
    assert not load_keys(None, None) and not load_keys(None, " ")

    bad = [
        ("short:abc", "shorter than 16"),
        (f"a b:{ALICE}", "key name"),
        (f"x:{ALICE[:-1]}!", "may hold only"),
        (f"x:{ALICE},y:{ALICE}", "repeats"),
        (f"x:{ALICE},x:{BOB}", "used twice"),
    ]
    for value, message in bad:
        with pytest.raises(ConfigError, match=message) as error:
            load_keys(None, value)
        assert ALICE[:-1] not in str(error.value)  # a key, even a mistyped one, is never echoed
    file.write_text("# only a comment\n\n")
    with pytest.raises(ConfigError, match="holds no keys"):
        load_keys(file)
    with pytest.raises(ConfigError, match="cannot read"):
        load_keys(tmp_path / "missing")


def test_keys_are_compared_in_constant_time(keys, monkeypatch):
    assert auth.constant_time_compare in (hmac.compare_digest, secrets.compare_digest)
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return hmac.compare_digest(a, b)

    monkeypatch.setattr(auth, "constant_time_compare", spy)
    assert keys.identify(f"Bearer {ALICE}") == "alice"
    # Every key is compared (no early exit at the match), always as equal-length digests.
    assert len(calls) == len(keys.keys) and all(len(a) == len(b) == 32 for a, b in calls)


def test_exposure_warning_and_require_auth(keys):
    for host in ("127.0.0.1", "127.0.0.2", "localhost", "::1", "[::1]"):
        assert check_exposure(host, ApiKeys(), require_auth=False) is None, host
        assert check_exposure(host, keys, require_auth=True) is None  # plain HTTP, but local
    for host in ("0.0.0.0", "::", "192.168.1.5", "example.com"):
        warning = check_exposure(host, ApiKeys(), require_auth=False, tls=True)
        assert warning is not None and "without API keys" in warning and "\n" not in warning
        plain = check_exposure(host, keys, require_auth=True)  # keys readable on the wire
        assert plain is not None and "plain HTTP" in plain and "--ssl-keyfile" in plain
        assert check_exposure(host, keys, require_auth=True, tls=True) is None
    for host in ("127.0.0.1", "0.0.0.0"):
        with pytest.raises(ConfigError, match="--require-auth"):
            check_exposure(host, ApiKeys(), require_auth=True, tls=True)


# -- every route -------------------------------------------------------------------------------------
def test_every_route_without_a_key_with_a_wrong_key_and_with_the_right_key(client):
    body = {"prompt": "a red circle", "seed": 1}
    routes = [
        ("GET", "/metrics", None, 200),
        ("GET", "/openapi.json", None, 200),
        ("GET", "/v1/models", None, 200),
        ("POST", GEN, body, 200),
        ("GET", "/no-such-page", None, 404),  # unknown paths say nothing to a stranger
    ]
    for method, path, json_body, ok in routes:
        missing = client.request(method, path, json=json_body)
        assert missing.status_code == 401, path
        assert missing.headers["www-authenticate"] == "Bearer"
        assert missing.json() == {
            "error": {
                "message": "missing API key: send the header 'Authorization: Bearer KEY'",
                "type": "invalid_request_error",
                "param": None,
                "code": "missing_api_key",
            }
        }
        wrongs = (
            bearer(WRONG),
            {"Authorization": f"Basic {ALICE}"},
            bearer(ALICE[:-1]),
            {"Authorization": f"Bearer {ALICE[:-1]}é".encode()},  # not ASCII: refused, not a crash
            bearer("x" * 5000),
        )
        for wrong in wrongs:
            refused = client.request(method, path, json=json_body, headers=wrong)
            assert refused.status_code == 401, (path, wrong)
            assert refused.headers["www-authenticate"].startswith("Bearer")
            assert refused.json()["error"]["code"] == "invalid_api_key"
            assert WRONG not in refused.text and ALICE[:-1] not in refused.text
        for key in (ALICE, BOB):
            response = client.request(method, path, json=json_body, headers=bearer(key))
            assert response.status_code == ok, (path, response.text)
    # Probes stay open, with or without a key; so do the pages and their assets (no secret in them:
    # what they call needs the key).
    for path in ("/healthz", "/readyz", "/docs", "/", "/static/swagger-ui.css"):
        assert client.get(path).status_code == 200, path
        assert client.get(path, headers=bearer(WRONG)).status_code == 200
    # Refused before the body is read: a stranger's huge upload is not a 413, it is a 401.
    huge = client.post(GEN, content=b"{}", headers={"content-length": str(10**9)})
    assert huge.status_code == 401
    # The OpenAPI schema says so (and /docs offers "Authorize").
    schema = client.get("/openapi.json", headers=bearer(ALICE)).json()
    assert schema["components"]["securitySchemes"]["bearer"] == {"type": "http", "scheme": "bearer"}
    assert schema["paths"][GEN]["post"]["security"] == [{"bearer": []}]
    assert "401" in schema["paths"][GEN]["post"]["responses"]
    assert "security" not in schema["paths"]["/healthz"]["get"]
    text = client.get("/metrics", headers=bearer(BOB)).text
    assert metric(text, "ilf_requests_total", endpoint=GEN, key="alice", status="200") >= 1
    assert metric(text, "ilf_requests_total", endpoint=GEN, key="bob", status="200") >= 1
    assert metric(text, "ilf_requests_total", endpoint=GEN, status="401") >= 4  # no key label: no key
    assert ALICE not in text and BOB not in text


def test_openai_sdk_style_client(bundle, generator, keys):
    """As the OpenAI Python SDK calls it: base_url .../v1, `Authorization: Bearer KEY`, JSON body."""
    with background_server(create_app(bundle, ServeOptions(api_keys=keys, warmup=False), generator)) as url:
        with httpx.Client(base_url=f"{url}/v1", headers=bearer(ALICE), timeout=60) as openai_like:
            (model,) = openai_like.get("/models").json()["data"]
            response = openai_like.post(
                "/images/generations",
                json={
                    "model": model["id"],
                    "prompt": "a small red circle",
                    "n": 1,
                    "size": "32x32",
                    "response_format": "b64_json",
                },
            )
            assert response.status_code == 200, response.text
            assert png(response.json()["data"][0]["b64_json"]).shape == (32, 32, 3)
        with httpx.Client(base_url=f"{url}/v1", timeout=60) as anonymous:
            assert anonymous.get("/models").status_code == 401


# -- request ids ---------------------------------------------------------------------------------------
def test_request_id_round_trip(client):
    headers = bearer(ALICE)
    given = "client-id 42/abc:xyz"
    ok = client.post(GEN, json={"prompt": "a cat"}, headers={**headers, "X-Request-ID": given})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == given
    bad = client.post(GEN, json={"prompt": "a cat", "n": 0}, headers={**headers, "X-Request-ID": "r-400"})
    assert bad.status_code == 400 and bad.headers["x-request-id"] == "r-400"
    denied = client.get("/v1/models", headers={"X-Request-ID": "r-401"})
    assert denied.status_code == 401 and denied.headers["x-request-id"] == "r-401"
    too_big = client.post(
        GEN, content=b"{}", headers={**headers, "X-Request-ID": "r-413", "content-length": str(10**9)}
    )
    assert too_big.status_code == 413 and too_big.headers["x-request-id"] == "r-413"
    # None given, or an invalid one (too long, not printable ASCII): the server makes one.
    made = {client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    long_id = client.get("/healthz", headers={"X-Request-ID": "x" * 129}).headers["x-request-id"]
    exactly = client.get("/healthz", headers={"X-Request-ID": "y" * 128}).headers["x-request-id"]
    not_ascii = client.get("/healthz", headers={"X-Request-ID": "café".encode()}).headers["x-request-id"]
    for rid in (*made, long_id, not_ascii):
        assert re.fullmatch(r"[0-9a-f]{32}", rid), rid
    assert len(made) == 3 and exactly == "y" * 128


# -- logs ------------------------------------------------------------------------------------------------
def test_json_log_lines_parse_and_never_hold_a_key(client, captured_logs):
    rid = "trace-json-1"
    body = {"prompt": "a blue square", "n": 2, "seed": 3, "size": "32x32"}
    assert client.post(GEN, json=body, headers={**bearer(ALICE), "X-Request-ID": rid}).status_code == 200
    assert (
        client.post(GEN, json=body, headers={**bearer(WRONG), "X-Request-ID": "trace-401"}).status_code == 401
    )
    assert client.get("/healthz", headers={"X-Request-ID": "trace-probe"}).status_code == 200
    client.get("/v1/%0Aforged INFO line", headers=bearer(BOB))  # a newline in the path: no forged line

    text = captured_logs["json"].getvalue()
    lines = [json.loads(line) for line in text.splitlines()]  # every line is one JSON object
    for secret in SECRETS:
        assert secret not in text and secret not in captured_logs["human"].getvalue()
    (access,) = [
        line
        for line in lines
        if line["logger"] == "ilf_deploy.serving.serve.access" and line["request_id"] == rid
    ]
    assert access["key"] == "alice" and access["status"] == 200 and access["method"] == "POST"
    assert access["path"] == GEN and access["plan"] == "base-2" and access["size"] == "32x32"
    assert access["n"] == 2 and access["queue_wait_s"] >= 0 and access["engine_s"] > 0
    assert access["duration_s"] >= access["engine_s"] and access["level"] == "info"
    batches = [
        line
        for line in lines
        if line["logger"] == "ilf_deploy.serving.serve.batch" and rid in line["request_ids"]
    ]
    assert batches and sum(batch["n"] for batch in batches) == 2
    for batch in batches:
        assert batch["keys"] == ["alice"] and batch["status"] == "ok" and batch["plan"] == "base-2"
        assert batch["size"] == "32x32" and batch["engine_s"] > 0 and batch["queue_wait_s"] >= 0
    (denied,) = [line for line in lines if line.get("request_id") == "trace-401"]
    assert denied["status"] == 401 and denied["key"] is None and "API key" in denied["error"]
    (probe,) = [line for line in lines if line.get("request_id") == "trace-probe"]
    assert probe["path"] == "/healthz" and probe["status"] == 200

    human = captured_logs["human"].getvalue().splitlines()
    (line,) = [line for line in human if f"request_id={rid}" in line]
    assert f"POST {GEN} 200" in line and "key=alice" in line and "plan=base-2" in line and "n=2" in line
    assert not any(line.startswith("forged") for line in human)  # the %0A stayed inside its line


def test_log_lines_inside_a_request_carry_its_id(bundle, generator, keys, captured_logs):
    class Broken(SlowGenerator):
        def generate_batch(self, plan, requests, latents=None, on_step=None):
            raise RuntimeError("engine on fire")

    app = create_app(bundle, ServeOptions(api_keys=keys, warmup=False), Broken(generator))
    with TestClient(app) as broken:
        response = broken.post(
            GEN, json={"prompt": "a cat"}, headers={**bearer(BOB), "X-Request-ID": "r-500"}
        )
    assert response.status_code == 500 and response.headers["x-request-id"] == "r-500"
    assert "engine on fire" in response.json()["error"]["message"]
    lines = [json.loads(line) for line in captured_logs["json"].getvalue().splitlines()]
    (batch,) = [line for line in lines if line["logger"] == "ilf_deploy.serving.serve.batch"]
    assert batch["status"] == "error" and batch["request_ids"] == ["r-500"] and batch["keys"] == ["bob"]
    assert batch["level"] == "error" and "engine on fire" in batch["exception"]
    (access,) = [line for line in lines if line["logger"] == "ilf_deploy.serving.serve.access"]
    assert access["request_id"] == "r-500" and access["status"] == 500 and access["level"] == "warning"


# -- per-key limits --------------------------------------------------------------------------------------
def test_per_key_limit_throttles_one_key_and_serves_the_others(bundle, generator, keys):
    gate = threading.Event()
    slow = SlowGenerator(generator, gate=gate)  # alice's first image holds the engine until the gate opens
    options = ServeOptions(max_n=1, max_inflight_per_key=1, api_keys=keys, warmup=False)

    async def until(http: httpx.AsyncClient, name: str, value: float) -> None:
        deadline = time.monotonic() + 20
        while metric((await http.get("/metrics", headers=bearer(BOB))).text, name) < value:
            assert time.monotonic() < deadline, f"{name} never reached {value}"
            await asyncio.sleep(0.02)

    async def scenario(url: str) -> tuple[httpx.Response, ...]:
        body = {"prompt": "a cat", "plan": "base-2"}
        async with httpx.AsyncClient(base_url=url, timeout=20) as http:
            first = asyncio.create_task(http.post(GEN, json=body, headers=bearer(ALICE)))
            await until(http, "ilf_queue_wait_seconds_count", 1)  # alice's image is in the engine
            throttled = await http.post(GEN, json=body, headers={**bearer(ALICE), "X-Request-ID": "r-429"})
            other = asyncio.create_task(http.post(GEN, json=body, headers=bearer(BOB)))
            await until(http, "ilf_queue_depth", 1)  # bob's image was admitted, alice's refused
            again = await http.post(GEN, json=body, headers=bearer(ALICE))
            gate.set()
            done = await asyncio.gather(first, other)
            return throttled, again, *done, await http.post(GEN, json=body, headers=bearer(ALICE))

    with background_server(create_app(bundle, options, slow)) as url:
        throttled, again, first, other, later = asyncio.run(scenario(url))
        text = httpx.get(f"{url}/metrics", headers=bearer(BOB)).text
    assert throttled.status_code == 429 and int(throttled.headers["retry-after"]) >= 1
    assert throttled.headers["x-request-id"] == "r-429"
    assert throttled.json()["error"]["type"] == "rate_limit_error"
    assert "at most 1" in throttled.json()["error"]["message"]
    assert again.status_code == 429  # still throttled while bob's image waits its turn
    assert first.status_code == 200 and other.status_code == 200  # bob was served meanwhile
    assert later.status_code == 200  # alice's slot came back when her request finished
    assert metric(text, "ilf_rejected_images_total", key="alice") == 2
    assert metric(text, "ilf_rejected_images_total", key="bob") == 0
    assert metric(text, "ilf_requests_total", endpoint=GEN, key="alice", status="429") == 2
    assert metric(text, "ilf_requests_total", endpoint=GEN, key="alice", status="200") == 2
    assert metric(text, "ilf_requests_total", endpoint=GEN, key="bob", status="200") == 1


def test_per_key_limit_options_are_checked(bundle, generator, keys):
    with pytest.raises(ConfigError, match="needs API keys"):
        create_app(bundle, ServeOptions(max_inflight_per_key=4, warmup=False), generator)
    with pytest.raises(ConfigError, match="--max-n"):
        create_app(bundle, ServeOptions(max_n=4, max_inflight_per_key=2, api_keys=keys), generator)


# -- the CLI ---------------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch):
    """The serve command with run_server recorded instead of listening; logging restored afterwards."""
    from typer.testing import CliRunner

    from ilf_deploy.cli import app
    from ilf_deploy.serving.serve import server

    names = ("ilf_deploy", "uvicorn", "uvicorn.error", "uvicorn.access", "uvicorn.asgi")
    saved = {
        n: (logging.getLogger(n).handlers[:], logging.getLogger(n).level, logging.getLogger(n).propagate)
        for n in names
    }
    runs: list[dict] = []
    monkeypatch.setattr(server, "run_server", lambda app, **kwargs: runs.append({"app": app, **kwargs}))
    monkeypatch.delenv(auth.ENV_VAR, raising=False)
    runner = CliRunner()
    try:
        yield lambda *args, env=None: (runner.invoke(app, ["serve", *map(str, args)], env=env), runs)
    finally:
        for n, (handlers, level, propagate) in saved.items():
            logger = logging.getLogger(n)
            logger.handlers[:], logger.level, logger.propagate = handlers, level, propagate


def test_serve_command_keys_warning_and_errors(cli, bundle, tmp_path):
    result, runs = cli(bundle, "--host", "0.0.0.0")
    assert result.exit_code == 0, result.output
    assert "without API keys" in result.output and "WARNING" in result.output
    (run,) = runs
    assert run["host"] == "0.0.0.0" and run["port"] == 8000 and run["log_level"] == "info"
    assert TestClient(run["app"]).get("/v1/models").status_code == 200  # open, as before

    key_file = tmp_path / "keys"
    key_file.write_text(f"alice:{ALICE}\n")
    result, runs = cli(bundle, "--host", "0.0.0.0", "--api-key-file", key_file, "--log-format", "json")
    assert result.exit_code == 0 and "without API keys" not in result.output, result.output
    client = TestClient(runs[-1]["app"])
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers=bearer(ALICE)).status_code == 200

    assert "plain HTTP" in result.output  # keys, but no TLS on a reachable address
    (line,) = [json.loads(line) for line in result.output.splitlines() if line.strip()]  # --log-format json
    assert line["level"] == "warning" and "plain HTTP" in line["message"]
    assert runs[-1]["ssl_keyfile"] is None and runs[-1]["ssl_certfile"] is None

    pem = tmp_path / "tls.pem"
    pem.write_text("not checked until uvicorn loads it")
    result, runs = cli(
        bundle, "--host", "0.0.0.0", "--require-auth", "--ssl-keyfile", pem, "--ssl-certfile", pem,
        env={auth.ENV_VAR: f"ci:{BOB}"},
    )  # fmt: skip
    assert result.exit_code == 0 and "WARNING" not in result.output, result.output
    assert runs[-1]["ssl_keyfile"] == runs[-1]["ssl_certfile"] == str(pem)
    assert TestClient(runs[-1]["app"]).get("/v1/models", headers=bearer(BOB)).status_code == 200

    key_file.write_text(f"alice:{ALICE[:8]}\n")
    for args, message in [
        (["--require-auth"], "--require-auth"),
        (["--api-key-file", tmp_path / "none"], "cannot read"),
        (["--api-key-file", key_file], "shorter than 16"),
        (["--log-format", "xml"], "--log-format"),
        (["--max-inflight-per-key", "8"], "needs API keys"),
        (["--ssl-keyfile", key_file], "go together"),
        (["--ssl-keyfile", tmp_path / "no.pem", "--ssl-certfile", key_file], "no such file"),
    ]:
        count = len(runs)
        result, runs = cli(bundle, *args)
        assert result.exit_code == 2 and message in result.output, (args, result.output)
        assert "Traceback" not in result.output and len(runs) == count  # never started
        assert ALICE[:8] not in result.output
    help_text = cli("--help")[0].output
    assert "--api-key-file" in help_text and "--require-auth" in help_text
    assert not re.search(r"--api-key(?![-\w])", help_text)  # no key on the command line, where `ps` shows it


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--api-key-file", "keys.txt"], {}, "--api-key-file"),
        (["--require-auth"], {}, "--require-auth"),
        ([], {"ILF_API_KEYS": "k" * 20}, "ILF_API_KEYS"),
        (["--max-inflight-per-key", "8"], {}, "--max-inflight-per-key"),
    ],
)
def test_triton_server_refuses_security_options_it_cannot_honour(bundle, tmp_path, args, env, named):
    from typer.testing import CliRunner

    from ilf_deploy.cli import app

    (tmp_path / "keys.txt").write_text("alice:" + "a" * 24 + "\n")
    args = [a if a != "keys.txt" else str(tmp_path / "keys.txt") for a in args]
    result = CliRunner().invoke(app, ["serve", str(bundle), "--server", "triton", *args], env=env)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and named in lines[0] and "no API keys" in lines[0], result.output
