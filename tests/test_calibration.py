"""Calibration: trajectory samples of every transformer segment, saved into the bundle."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from ilf_deploy.build.quantization.calibration import collect_calibration, load_calibration
from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.runtime.bundle import Bundle, BundleError


@pytest.fixture(scope="module")
def calibrated(tiny_bundles, tmp_path_factory):
    path = shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path_factory.mktemp("calib") / "bundle")
    record = collect_calibration(path, "ilf-4", ["a red circle", "a blue square"], max_samples=3)
    return path, record


def test_every_transformer_segment_is_recorded_and_hashed(calibrated):
    path, record = calibrated
    bundle = Bundle.load(path)  # verifies every hash, the new files included
    assert bundle.manifest_json()["calibration"] == record
    assert record["plan"] == "ilf-4" and record["requests"] == 2
    expected = set(bundle.manifest.segments) - {"text_encoder", "vae_decoder", "context"}
    assert set(record["segments"]) == expected
    for name, entry in record["segments"].items():
        assert entry["file"] in bundle.manifest.files, name
        samples = load_calibration(bundle, name)
        assert len(samples) == entry["samples"] <= 2 * 3  # at most 3 per conditioning kind
        inputs = set(bundle.manifest.segments[name].input_names)
        assert all(set(s) == inputs for s in samples), name
        for sample in samples:
            for value in bundle.manifest.segments[name].inputs:
                assert sample[value.name].ndim == len(value.shape)


def test_samples_cover_steps_and_both_conditionings(calibrated):
    path, record = calibrated
    segments = Bundle.load(path).manifest.segments
    loop_segment = next(n for n, s in segments.items() if s.takes_feed)
    with np.load(path / record["segments"][loop_segment]["file"]) as data:
        t_post, steps, timesteps = data["_t_post"], data["_step"], data["_timestep"]
    assert t_post.any() and (~t_post).any()  # the ILF second pass runs at t_post
    assert len(set(steps.tolist())) > 1  # not only the first step
    assert np.all(timesteps[t_post] < 1000) and np.isfinite(timesteps).all()
    assert record["segments"][loop_segment]["calls"] > record["segments"][loop_segment]["samples"]


def test_recalibration_replaces_the_old_samples(calibrated, tmp_path):
    path = shutil.copytree(calibrated[0], tmp_path / "again")
    record = collect_calibration(path, "base-4", ["a cat"], max_samples=2)
    bundle = Bundle.load(path)
    assert bundle.manifest.calibration is not None and bundle.manifest.calibration.plan == "base-4"
    listed = {f for f in bundle.manifest.files if f.startswith("calibration/")}
    assert listed == {e["file"] for e in record["segments"].values()}
    assert {p.name for p in (path / "calibration").iterdir()} == {f.split("/")[1] for f in listed}


def test_an_interrupted_recalibration_leaves_the_old_samples(calibrated, tmp_path, monkeypatch):
    """New samples are hashed where they were written and renamed over the old ones just before the
    manifest that lists them: Ctrl-C while hashing leaves a bundle that loads, with its old samples
    (before, they were overwritten first, and the bundle then refused itself)."""
    import ilf_deploy.core.runtime.bundle as bundle_module

    path = shutil.copytree(calibrated[0], tmp_path / "again")
    before = {p.name: p.read_bytes() for p in (path / "calibration").iterdir()}

    def interrupted(file):
        raise KeyboardInterrupt

    monkeypatch.setattr(bundle_module, "sha256_file", interrupted)  # hashing the new files
    with pytest.raises(KeyboardInterrupt):
        collect_calibration(path, "base-4", ["a cat"], max_samples=2)
    monkeypatch.undo()
    assert Bundle.load(path).manifest.calibration.plan == "ilf-4"  # every hash checked
    assert {p.name: p.read_bytes() for p in (path / "calibration").iterdir()} == before
    assert not [p.name for p in path.iterdir() if ".tmp-" in p.name]


def test_dit_calibrates_on_class_labels(tiny_bundles, tmp_path):
    path = shutil.copytree(tiny_bundles["dit"], tmp_path / "dit")
    record = collect_calibration(path, class_labels=[1, 2], max_samples=2)
    assert record["requests"] == 2 and "final" in record["segments"]
    Bundle.load(path)


def test_calibration_errors(calibrated, tiny_bundles):
    with pytest.raises(ConfigError, match="unknown plan 'nope'"):
        collect_calibration(calibrated[0], "nope")
    with pytest.raises(ConfigError, match="non-empty"):
        collect_calibration(calibrated[0], prompts=["  "])
    with pytest.raises(BundleError, match="ilf-deploy calibrate"):
        load_calibration(Bundle.load(tiny_bundles["dit"]), "final")


def _app() -> typer.Typer:
    """The real CLI (its IlfError -> one line, exit 2 wrapper included)."""
    from ilf_deploy.cli import app

    return app


def test_calibrate_command(tiny_bundles, tmp_path):
    path = shutil.copytree(tiny_bundles["pixart-sigma"], tmp_path / "b")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\n\na green tree\n")
    runner = CliRunner()
    result = runner.invoke(_app(), ["calibrate", str(path), "--prompts", str(prompts), "--max-samples", "2"])
    assert result.exit_code == 0, result.output
    calibration = Bundle.load(path).manifest.calibration
    assert calibration is not None and calibration.requests == 2
    result = runner.invoke(_app(), ["calibrate", str(tmp_path / "nope")])
    assert result.exit_code == 2 and "not a bundle" in result.output
