"""`serve` as the official `openai` Python client calls it (issue 33): every field the README's
"OpenAI compatibility" section documents, over real HTTP, with an API key; /docs with no network.

One tiny PixArt-α bundle with plans of different costs (so `quality` has a plan to pick)."""

from __future__ import annotations

import base64
import io
import re
import time
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from PIL import Image

from ilf_deploy.build.export.build import BuildOptions, build_bundle
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.generator import Request
from ilf_deploy.engines.backends import open_generator
from ilf_deploy.model.tiny import make_tiny_pipeline
from ilf_deploy.serving.serve import ServeOptions, create_app
from ilf_deploy.serving.serve.auth import ApiKeys
from ilf_deploy.serving.serve.background import background_server

openai = pytest.importorskip("openai")  # the test dependency: pip install -e '.[dev]'

KEY = "sk-test-0123456789abcdef"
MODEL = "tiny-pixart"
PLANS = ("base-2", "base-4", "ilf-4")  # block forwards: base-2 fewest, ilf-4 most


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("openai")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    return build_bundle(model, root / "bundle", BuildOptions(plans=PLANS))


@pytest.fixture(scope="module")
def generator(bundle):
    return open_generator(bundle)


@pytest.fixture(scope="module")
def server(bundle, generator) -> Iterator[str]:
    keys = ApiKeys.parse([("test", f"tester:{KEY}")])
    options = ServeOptions(api_keys=keys, max_n=3, model_name=MODEL, url_ttl_s=2.0, default_plan="base-4")
    with background_server(create_app(bundle, options, generator)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, timeout=60, max_retries=0)


def decode(data: bytes, kind: str = "PNG") -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == kind and image.mode == "RGB"
    return np.asarray(image)


def direct(bundle, generator, plan: str, seed: int) -> np.ndarray:
    """The engine's own image for a prompt, plan and seed (what the server must answer)."""
    step_plan = Bundle.load(bundle, verify_hashes=False).plan(plan)
    request = Request("a red circle", seed=seed, height=32, width=32)
    return generator.decode(generator.generate_batch(step_plan, [request]))[0]


def close(served: np.ndarray, expected: np.ndarray) -> bool:
    return np.abs(served.astype(int) - expected.astype(int)).max() <= 1


def test_models_lists_the_model_name(client):
    assert [model.id for model in client.models.list().data] == [MODEL]


@pytest.mark.parametrize(
    ("quality", "plan"),
    [("low", "base-2"), ("medium", "base-4"), ("auto", "base-4"), ("high", "ilf-4"), ("hd", "ilf-4")],
)
def test_quality_picks_the_documented_plan(client, bundle, generator, quality, plan):
    forwards = {name: Bundle.load(bundle, verify_hashes=False).plan(name).block_forwards for name in PLANS}
    assert forwards["base-2"] < forwards["base-4"] < forwards["ilf-4"]  # the table's premise
    result = client.images.generate(
        model=MODEL, prompt="a red circle", size="32x32", quality=quality, extra_body={"seed": 5}
    )
    served = decode(base64.b64decode(result.data[0].b64_json))
    assert close(served, direct(bundle, generator, plan, 5))
    others = [p for p in PLANS if p != plan]
    assert not any(close(served, direct(bundle, generator, other, 5)) for other in others)


def test_style_user_and_other_documented_fields_are_accepted(client):
    result = client.images.generate(
        model=MODEL,
        prompt="a red circle",
        size="auto",
        n=2,
        style="vivid",
        user="someone",
        background="opaque",
        moderation="auto",
        quality="standard",
        response_format="b64_json",
        output_format="png",
        complexity="high",
        safety_identifier="user-hash",
        frame_count=3,
        frame_duration_ms=100,
        svg={"model": "any"},
        extra_body={"seed": 1},
    )
    images = [decode(base64.b64decode(item.b64_json)) for item in result.data]
    assert [image.shape for image in images] == [(32, 32, 3)] * 2
    assert result.output_format == "png" and result.size == "32x32"


def test_output_formats(client):
    for kind, name in (("webp", "WEBP"), ("jpeg", "JPEG")):
        result = client.images.generate(
            prompt="a red circle", output_format=kind, output_compression=80, extra_body={"seed": 2}
        )
        assert decode(base64.b64decode(result.data[0].b64_json), name).shape == (32, 32, 3)


def test_url_images_are_served_then_expire(server, client):
    result = client.images.generate(prompt="a red circle", response_format="url", n=2, extra_body={"seed": 3})
    urls = [item.url for item in result.data]
    assert all(re.fullmatch(rf"{re.escape(server)}/v1/images/files/[\w-]{{22}}\.png", u) for u in urls)
    inline = client.images.generate(prompt="a red circle", extra_body={"seed": 3})
    fetched = httpx.get(urls[0])  # no key: the link's random id is the secret, as OpenAI's are
    assert fetched.status_code == 200 and fetched.headers["content-type"] == "image/png"
    assert np.array_equal(decode(fetched.content), decode(base64.b64decode(inline.data[0].b64_json)))
    time.sleep(2.2)  # url_ttl_s=2
    gone = httpx.get(urls[1])
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "image_id"


def test_stream_gives_completed_events_the_client_parses(client):
    events = list(
        client.images.generate(
            prompt="a red circle", stream=True, partial_images=2, n=2, extra_body={"seed": 4}
        )
    )
    assert [event.type for event in events] == ["image_generation.completed"] * 2
    inline = client.images.generate(prompt="a red circle", n=2, extra_body={"seed": 4})
    for event, item in zip(events, inline.data):
        assert event.size == "32x32" and event.output_format == "png"
        assert np.array_equal(
            decode(base64.b64decode(event.b64_json)), decode(base64.b64decode(item.b64_json))
        )


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"model": "dall-e-3"}, "model"),
        ({"quality": "ultra"}, "quality"),
        ({"response_format": "xml"}, "response_format"),
        ({"output_format": "gif"}, "output_format"),
        ({"background": "transparent"}, "background"),
        ({"output_compression": 101}, "output_compression"),
        ({"size": "64x64"}, "size"),
    ],
)
def test_bad_values_are_openai_errors(client, fields, param):
    with pytest.raises(openai.BadRequestError) as caught:
        client.images.generate(prompt="a red circle", **fields)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param


def test_wrong_key_is_an_authentication_error(server):
    stranger = openai.OpenAI(base_url=f"{server}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        stranger.images.generate(prompt="a red circle")


def test_docs_load_with_no_network(server):
    """/docs and every asset it names come from the server itself (no CDN), without a key."""
    page = httpx.get(f"{server}/docs")
    assert page.status_code == 200
    sources = re.findall(r"""(?:src|href)=["']([^"']+)["']""", page.text)
    assert sources and not [s for s in sources if s.startswith(("http:", "https:", "//"))]
    for source in sources:
        asset = httpx.get(f"{server}{source}")
        assert asset.status_code == 200 and len(asset.content) > 1000, source
    bundle_js = httpx.get(f"{server}/static/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in bundle_js and re.search(r'"5\.\d+\.\d+"', bundle_js)  # renders OpenAPI 3.1
    document = httpx.get(f"{server}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert document["openapi"].startswith("3.1")
    properties = document["components"]["schemas"]["ImageGenerationRequest"]["properties"]
    assert {"quality", "style", "response_format", "stream", "model", "output_format"} <= set(properties)
