"""The OpenVINO compiled-model cache cannot change a pinned bundle's output: a blob is imported only
when its sidecar digest names this key and these bytes (issue 31, item 3)."""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

pytest.importorskip("openvino")

from ilf_deploy.cli import app
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.engines.backends.openvino import CACHE_DIR, SIDECAR_SUFFIX


def _generate(bundle, out, digest: str) -> np.ndarray:
    args = ["generate", str(bundle), "--backend", "openvino", "--plan", "base-4", "--prompt", "a cat"]
    result = CliRunner().invoke(app, [*args, "--seed", "3", "--digest", digest, "--out", str(out)])
    assert result.exit_code == 0, result.output
    return np.asarray(Image.open(out))


def _blob(cache, segment: str):
    return next(b for b in cache.iterdir() if b.name.startswith(segment + ".") and b.suffix == ".blob")


@pytest.fixture()
def cached_bundle(tiny_bundles, tmp_path):
    path = shutil.copytree(
        tiny_bundles["pixart-alpha"], tmp_path / "bundle", ignore=shutil.ignore_patterns(CACHE_DIR)
    )
    return path, Bundle.load(path).digest


def _swap(a, b) -> None:
    tmp = a.with_name(".swap")
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)


def test_swapped_blobs_are_recompiled_not_run(cached_bundle, tmp_path, caplog):
    path, digest = cached_bundle
    pinned = _generate(path, tmp_path / "a.png", digest)
    cache = path / CACHE_DIR
    first, last = _blob(cache, "blocks_00_00"), _blob(cache, "blocks_05_05")
    assert first.read_bytes() != last.read_bytes()
    _swap(first, last)  # same inputs and outputs: OpenVINO would run either
    with caplog.at_level(logging.WARNING, logger="ilf_deploy.openvino"):
        again = _generate(path, tmp_path / "b.png", digest)
    np.testing.assert_array_equal(again, pinned)
    assert "does not match its sidecar digest" in caplog.text
    # The mismatching entries were replaced by freshly compiled ones that verify again.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ilf_deploy.openvino"):
        np.testing.assert_array_equal(_generate(path, tmp_path / "c.png", digest), pinned)
    assert "recompiling" not in caplog.text


def test_swapped_blob_and_sidecar_pairs_are_recompiled(cached_bundle, tmp_path, caplog):
    path, digest = cached_bundle
    pinned = _generate(path, tmp_path / "a.png", digest)
    cache = path / CACHE_DIR
    first, last = _blob(cache, "blocks_00_00"), _blob(cache, "blocks_05_05")
    _swap(first, last)
    _swap(first.with_name(first.name + SIDECAR_SUFFIX), last.with_name(last.name + SIDECAR_SUFFIX))
    with caplog.at_level(logging.WARNING, logger="ilf_deploy.openvino"):
        np.testing.assert_array_equal(_generate(path, tmp_path / "b.png", digest), pinned)
    assert caplog.text.count("does not match its sidecar digest") >= 2


def test_a_blob_without_its_sidecar_is_recompiled(cached_bundle, tmp_path, caplog):
    path, digest = cached_bundle
    pinned = _generate(path, tmp_path / "a.png", digest)
    cache = path / CACHE_DIR
    first, last = _blob(cache, "blocks_00_00"), _blob(cache, "blocks_05_05")
    first.with_name(first.name + SIDECAR_SUFFIX).unlink()
    first.write_bytes(last.read_bytes())  # another segment's blob under this name, no sidecar
    with caplog.at_level(logging.WARNING, logger="ilf_deploy.openvino"):
        np.testing.assert_array_equal(_generate(path, tmp_path / "b.png", digest), pinned)
    assert "unreadable" in caplog.text
    assert first.with_name(first.name + SIDECAR_SUFFIX).is_file()
