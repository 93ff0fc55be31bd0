"""Triton, `serve` and `batch` on Ray for the families after PixArt/DiT: SD3, Flux.1-dev, Sana
(issues 29, 30).

tests/test_triton.py and tests/test_ray.py run every feature of those front doors on PixArt and DiT;
this module runs each family through them once, on the shared tiny bundles (tests/conftest.py:
`mmdit_bundles`, `sana_bundle`), against the image the engine computes directly (ONNX Runtime, the
backend both front doors are given here):

- Triton: one real server for the module with a model per family; a request at the bundle's second
  size (SD3 and Sana with a negative prompt, Flux-dev with its embedded guidance scale) equals the
  engine's image within 1 per pixel, a request of two rows at the default size (the default plan)
  within float rounding; a size the bundle was not built for (off the packing grid included) and a
  negative prompt on Flux-dev are HTTP 400s in one line, and the model stays up.
- serve (OpenAI API) on SD3 and Flux-dev (Sana's: tests/test_sana_bundles.py): the same image and
  refusals.
- Ray: `ilf-deploy batch --ray-address` on a one-node cluster in the Ray sandbox
  (tests/support/ray_sandbox.py) makes every row of a Flux and a Sana bundle once, on Ray actors, the
  refused row an error row; two rows' PNGs are the engine's images, and every row's PNG is the
  local `batch`'s (no Ray), byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from ilf_deploy.core.runtime.generator import Generator, Request
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.serving.triton.repository import ExportOptions, export_repository
from tests.support.ray_sandbox import Sandbox, unavailable
from tests.test_triton import SERVER, Server, free_port, http_client, inputs, needs_server, start_server, stop

from .conftest import MMDIT_SIZES, SANA_SIZES

PROMPT = "a small red circle on a blue background"
BACKEND = "onnxruntime"  # Triton's default backend; `batch` is given it (its own default is auto)
# (height, width) of each bundle, the default first; what a request at the second size adds: a
# negative prompt where guidance is classifier-free, a scale for Flux-dev's embedded guidance.
SIZES = {"sd3": MMDIT_SIZES, "flux": MMDIT_SIZES, "sana": SANA_SIZES}
EXTRA = {
    "sd3": {"negative_prompt": "blue"},
    "flux": {"guidance_scale": 2.0},
    "sana": {"negative_prompt": "blue"},
}
PLAN = "cache-6"  # the second size's plan; the default plan (ilf-4) at the first


@pytest.fixture(scope="module")
def bundles(mmdit_bundles, sana_bundle) -> dict[str, Path]:
    return {"sd3": mmdit_bundles["sd3"], "flux": mmdit_bundles["flux"], "sana": sana_bundle}


@pytest.fixture(scope="module")
def engines(bundles) -> dict[str, Generator]:
    return {name: open_generator(path, BACKEND) for name, path in bundles.items()}


def engine_image(generator: Generator, plan: str, request: Request) -> np.ndarray:
    """The image the engine computes for `request` directly: one generate_latents, one decode."""
    resolved = generator.resolve(request)
    latents = generator.generate_latents(generator.opened_bundle().plan(plan), resolved)
    return generator.decode(latents)[0]


def max_difference(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(int) - b.astype(int)).max())


# -- Triton ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(bundles, tmp_path_factory) -> Iterator[Server]:
    """One tritonserver with a model per family (its start and each model's warm-up cost seconds)."""
    if SERVER is None:
        pytest.skip("tritonserver is not installed: `make setup` runs `ilf-deploy install-triton`")
    repo = tmp_path_factory.mktemp("families-repo")
    for name, bundle in bundles.items():
        export_repository(bundle, repo, ExportOptions(name=name, backend=BACKEND))
    ports = (free_port(), free_port(), free_port())
    log = tmp_path_factory.mktemp("families-log") / "tritonserver.log"
    extra = ("--model-control-mode=explicit", *(f"--load-model={name}" for name in bundles))
    command = SERVER.command(repo, *ports, host="127.0.0.1", extra=extra)
    started = start_server(command, SERVER.environment(), log, list(bundles), ports)
    yield started
    for client in started.clients:
        client.close()
    stop(started.process)


def two_rows(module, seeds: tuple[int, int]) -> list:
    """The InferInputs of one request of two rows: the prompt in each, one seed each."""
    prompts = module.InferInput("prompt", [2, 1], "BYTES")
    prompts.set_data_from_numpy(np.array([[PROMPT.encode()]] * 2, dtype=object))
    seed = module.InferInput("seed", [2, 1], "INT64")
    seed.set_data_from_numpy(np.array([[s] for s in seeds], dtype=np.int64))
    return [prompts, seed]


@needs_server
@pytest.mark.parametrize("family", ["sd3", "flux", "sana"])
def test_triton_images_are_the_engines(server, engines, family):
    generator = engines[family]
    http, client = http_client(server)
    (height, width) = SIZES[family][1]
    extra = EXTRA[family]
    answer = client.infer(family, inputs(http, seed=5, plan=PLAN, height=height, width=width, **extra))
    image = answer.as_numpy("image")
    assert image.shape == (1, height, width, 3)
    request = Request(PROMPT, seed=5, height=height, width=width, **extra)
    expected = engine_image(generator, PLAN, request)
    assert max_difference(image[0], expected) <= 1
    plain = engine_image(generator, PLAN, Request(PROMPT, seed=5, height=height, width=width))
    assert np.abs(plain.astype(int) - expected.astype(int)).mean() > 1  # the extra field was used
    # two rows at the default size and plan: one engine batch of two, equal up to float rounding
    images = client.infer(family, two_rows(http, (7, 8))).as_numpy("image")
    assert images.shape == (2, *SIZES[family][0], 3)
    for row, seed in zip(images, (7, 8)):
        expected = engine_image(generator, "ilf-4", Request(PROMPT, seed=seed))
        assert np.abs(row.astype(int) - expected.astype(int)).mean() < 0.5, seed
    assert np.abs(images[0].astype(int) - images[1].astype(int)).mean() > 5  # two seeds, two images


BUILT_FOR = "the bundle was built for {}, not {} (width x height)"
MMDIT_BUILT, SANA_BUILT = "32x32, 32x64", "256x256, 192x320"


@needs_server
@pytest.mark.parametrize(
    ("family", "extra", "message"),
    [
        ("sd3", {"height": 40, "width": 32}, BUILT_FOR.format(MMDIT_BUILT, "32x40")),  # off the 16 px grid
        ("flux", {"height": 40, "width": 32}, BUILT_FOR.format(MMDIT_BUILT, "32x40")),  # off 2x2 packing
        ("flux", {"height": 64, "width": 64}, BUILT_FOR.format(MMDIT_BUILT, "64x64")),  # on it, not built
        (
            "flux",
            {"negative_prompt": "blue"},
            "negative_prompt does not apply to flux models (their guidance is embedded, not classifier-free)",
        ),
        ("sana", {"height": 300, "width": 256}, BUILT_FOR.format(SANA_BUILT, "256x300")),  # 32 px grid
    ],
)
def test_triton_refuses_what_the_family_lacks_in_one_line(server, family, extra, message):
    from tritonclient.utils import InferenceServerException

    http, client = http_client(server)
    with pytest.raises(InferenceServerException) as error:
        client.infer(family, inputs(http, seed=1, **extra))
    assert message in error.value.message(), error.value.message()
    assert "\n" not in error.value.message() and error.value.status() == "400"
    assert client.is_model_ready(family)


# -- serve (OpenAI API) ----------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_serve_images_are_the_engines_and_flux_refuses_a_negative_prompt(engines, family):
    """`serve` on the MMDiTs (Sana's is tests/test_sana_bundles.py): the second size equals the
    engine's image; Flux-dev's negative prompt and a size off its packing grid are 400s in one line."""
    from fastapi.testclient import TestClient

    from ilf_deploy.serving.serve import ServeOptions, create_app
    from tests.test_serve import GEN, png, wait_ready

    generator = engines[family]
    (height, width) = SIZES[family][1]
    body = {"prompt": PROMPT, "seed": 5, "plan": PLAN, "size": f"{width}x{height}", **EXTRA[family]}
    refused = [({"size": "32x40"}, BUILT_FOR.format(MMDIT_BUILT, "32x40"))]
    if family == "flux":
        refused.append(({"negative_prompt": "blue"}, "negative_prompt does not apply to flux models"))
    with TestClient(create_app(generator.opened_bundle().path, ServeOptions(max_n=1), generator)) as client:
        wait_ready(client)
        response = client.post(GEN, json={**body, "response_format": "b64_json"})
        assert response.status_code == 200, response.text
        served = png(response.json()["data"][0]["b64_json"])
        answers = [client.post(GEN, json={"prompt": PROMPT, **fields}) for fields, _ in refused]
    request = Request(PROMPT, seed=5, height=height, width=width, **EXTRA[family])
    assert max_difference(served, engine_image(generator, PLAN, request)) <= 1
    for answer, (_, message) in zip(answers, refused):
        error = answer.json()["error"]["message"]
        assert answer.status_code == 400 and message in error and "\n" not in error, answer.text


# -- Ray -------------------------------------------------------------------------------------------
REASON = unavailable()


@pytest.fixture(scope="module")
def ray_head() -> Iterator[Sandbox]:
    """A one-node Ray cluster (a head with 2 CPUs) in the sandbox: test_ray.py's two nodes and node
    loss are PixArt's; here each family's rows go through Ray's actors once."""
    if REASON is not None:
        pytest.skip(f"no Ray sandbox: {REASON}")
    pytest.importorskip("ray", reason="the ray extra is not installed (make setup installs it)")
    sandbox = Sandbox().start()
    try:
        sandbox.add_node(2, head=True)
        sandbox.wait_for_head()
        sandbox.wait()
        yield sandbox
    finally:
        sandbox.close()


def batch_lines(family: str) -> tuple[list[dict[str, Any]], int]:
    """The request lines of a batch and the index of the refused one (what the family lacks)."""
    (height, width) = SIZES[family][1]
    other = f"{width}x{height}"
    refused = {"negative_prompt": "blue"} if family == "flux" else {"size": "256x300"}
    lines = [
        {"prompt": PROMPT, "seed": 0},  # the default size and plan (ilf-4)
        {"prompt": PROMPT, "seed": 1, "size": other, "plan": PLAN},
        {"prompt": PROMPT, "seed": 2, **refused},
        {"prompt": "a big green square", "seed": 3, "size": other},
        {"prompt": PROMPT, "seed": 4, "plan": "base-4-adapt1-4t0.3m2"},
    ]
    return lines, 2


@pytest.mark.parametrize("family", ["flux", "sana"])
def test_ray_batch_makes_each_row_once_with_the_engines_images(ray_head, bundles, engines, family, tmp_path):
    from tests.test_ray import invoke, ray_batch, read_rows

    lines, refused = batch_lines(family)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    command = ray_batch(bundles[family], prompts, out, "--backend", BACKEND)
    done = ray_head.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = f"{len(lines)} rows: {len(lines) - 1} images, 1 refused, 0 failed"
    assert summary in done.stderr, done.stderr[-2000:]
    rows = read_rows(out)
    assert sorted(r["index"] for r in rows) == list(range(len(lines)))  # every row, once
    bad = next(r for r in rows if r["index"] == refused)
    assert bad["file"] is None and ("negative_prompt" if family == "flux" else "not 256x300") in bad["error"]
    made = [r for r in rows if r["index"] != refused]
    assert all(r["error"] is None and r["worker"]["node"] for r in made)  # by Ray actors
    local = tmp_path / "local"  # the same command without Ray: the same PNGs, byte for byte
    result = invoke("batch", bundles[family], "--prompts", prompts, "--out", local, "--backend", BACKEND)
    assert result.exit_code == 0, result.output
    assert {r["index"]: r["sha256"] for r in read_rows(local)} == {r["index"]: r["sha256"] for r in rows}
    for index in (0, 1):  # the default size and plan, and the other size with PLAN
        row = next(r for r in rows if r["index"] == index)
        line = lines[index]
        size = line.get("size")
        height, width = (int(size.split("x")[1]), int(size.split("x")[0])) if size else SIZES[family][0]
        request = Request(PROMPT, seed=line["seed"], height=height, width=width)
        expected = engine_image(engines[family], line.get("plan", "ilf-4"), request)
        with Image.open(out / row["file"]) as png:
            assert max_difference(np.asarray(png), expected) <= 1, row
