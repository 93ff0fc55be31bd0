"""The playground at `/` of `serve` (issue 33), in a real headless browser: Debian's chromium and
chromium-driver (`make setup` installs them where apt-get can), driven by Selenium. It loads with no
network beyond the server, generates, compares two plans on the same seed, and shows a bad request's
error; with API keys, the page asks for one and sends it.

Skipped, saying why, where chromium, chromedriver or selenium is missing."""

from __future__ import annotations

import base64
import io
import re
import shutil
from collections.abc import Iterator

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

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None, reason="needs Debian's chromium and chromium-driver (make setup)"
)
KEY = "playground-key-0123456789"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    root = tmp_path_factory.mktemp("playground")
    model = make_tiny_pipeline("pixart-alpha", root / "model", num_layers=4)
    return build_bundle(model, root / "bundle", BuildOptions(plans=("base-2", "ilf-4")))


@pytest.fixture(scope="module")
def generator(bundle):
    return open_generator(bundle)


@pytest.fixture(scope="module")
def browser(tmp_path_factory) -> Iterator:
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def wait(browser, condition, timeout: float = 60.0):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(condition)


def by_id(browser, element_id: str):
    from selenium.webdriver.common.by import By

    return browser.find_element(By.ID, element_id)


def columns(browser) -> list:
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, "#results .column")


def set_value(browser, element_id: str, value: str) -> None:
    element = by_id(browser, element_id)
    element.clear()
    element.send_keys(value)


def choose(browser, element_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(by_id(browser, element_id)).select_by_value(value)


def image_of(column) -> np.ndarray:
    from selenium.webdriver.common.by import By

    source = column.find_element(By.CSS_SELECTOR, "img").get_attribute("src")
    assert source.startswith("data:image/png;base64,")
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))))


def engine_image(bundle, generator, plan: str, seed: int) -> np.ndarray:
    step_plan = Bundle.load(bundle, verify_hashes=False).plan(plan)
    request = Request("a small red circle on a blue background", seed=seed, height=32, width=32)
    return generator.decode(generator.generate_batch(step_plan, [request]))[0]


def test_load_generate_compare_and_an_error(browser, bundle, generator):
    with background_server(create_app(bundle, ServeOptions(max_n=2), generator)) as url:
        browser.get(f"{url}/")
        wait(browser, lambda b: "pixart" in by_id(b, "model").text)
        assert by_id(browser, "error").get_attribute("hidden") is not None  # no error on load
        remote = re.findall(r"""(?:src|href)=["'](?:https?:)?//""", browser.page_source)
        assert not remote  # no CDN: every asset comes from the server
        # Generate: one plan, its image the engine's for that seed.
        choose(browser, "plan-a", "base-2")
        set_value(browser, "seed", "7")
        by_id(browser, "generate").click()
        wait(browser, lambda b: len(columns(b)) == 1)
        (only,) = columns(browser)
        assert only.get_attribute("data-plan") == "base-2"
        expected = engine_image(bundle, generator, "base-2", 7)
        assert np.abs(image_of(only).astype(int) - expected.astype(int)).max() <= 1
        # Compare: two plans side by side on the same seed, latency and block forwards under each.
        choose(browser, "plan-b", "ilf-4")
        by_id(browser, "generate").click()
        wait(browser, lambda b: len(columns(b)) == 2)
        loaded = Bundle.load(bundle, verify_hashes=False)
        forwards = {plan: loaded.plan(plan).block_forwards for plan in ("base-2", "ilf-4")}
        for column, plan in zip(columns(browser), ("base-2", "ilf-4")):
            assert column.get_attribute("data-plan") == plan
            text = column.text
            assert f"{forwards[plan]} block forwards" in text and "latency" in text and " ms" in text
            expected = engine_image(bundle, generator, plan, 7)
            assert np.abs(image_of(column).astype(int) - expected.astype(int)).max() <= 1
        # A bad request: its OpenAI error is shown, the last results stay.
        set_value(browser, "n", "5")  # max_n is 2
        by_id(browser, "generate").click()
        wait(browser, lambda b: by_id(b, "error").is_displayed())
        assert "n must be in 1..2, got 5" in by_id(browser, "error").text
        assert "HTTP 400" in by_id(browser, "error").text
        assert len(columns(browser)) == 2


def test_with_api_keys_the_page_asks_for_one(browser, bundle, generator):
    keys = ApiKeys.parse([("test", f"tester:{KEY}")])
    with background_server(create_app(bundle, ServeOptions(api_keys=keys), generator)) as url:
        browser.get(f"{url}/")
        wait(browser, lambda b: by_id(b, "error").is_displayed())
        assert "HTTP 401" in by_id(browser, "error").text
        set_value(browser, "key", KEY)
        by_id(browser, "generate").click()
        wait(browser, lambda b: len(columns(b)) == 1)
        assert not by_id(browser, "error").is_displayed()
