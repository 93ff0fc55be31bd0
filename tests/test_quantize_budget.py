"""`quantize` runs the new variant's checks (verify-variant's) and says in one line when it misses
its budget: exit 1 and the variant removed again, unless --keep-failing (issue 33)."""

from __future__ import annotations

import shutil

import pytest
from typer.testing import CliRunner

from ilf_deploy.build.quantization import quantize as quantize_module
from ilf_deploy.cli import app
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.engines.compare import Check, Limit, Metrics


@pytest.fixture
def bundle(tiny_bundles, tmp_path):
    return shutil.copytree(tiny_bundles["pixart-alpha"], tmp_path / "bundle")


def quantize(path, *extra: str):
    return CliRunner().invoke(app, ["quantize", str(path), "--mode", "int8-dynamic", *extra])


def test_a_variant_within_budget_says_so(bundle):
    result = quantize(bundle)
    assert result.exit_code == 0, result.output
    assert "variant 'int8_dynamic' is within its budget" in result.output
    assert "int8_dynamic" in Bundle.load(bundle).manifest.variants


@pytest.fixture
def missing_budget(monkeypatch):
    """verify_variant's end-to-end check faked beyond the budget (rel L2 6.36e-2 > 0.05, the issue's)."""
    real = quantize_module.verify_variant

    def verify(bundle, variant, plan=None, request=None, threads=None, progress=None):
        rows = real(bundle, variant, plan, request, threads, progress)
        assert rows[-1].kind == "end-to-end"
        miss = Check("end-to-end", rows[-1].name, Metrics(20.0, 0.99, 0.0636, 1.0), Limit("rel_l2", 0.05))
        return [*rows[:-1], miss]

    monkeypatch.setattr(quantize_module, "verify_variant", verify)


def test_a_variant_beyond_budget_fails_and_is_removed(bundle, missing_budget):
    before = Bundle.load(bundle).manifest
    result = quantize(bundle)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if "misses its budget" in line]
    assert len(lines) == 1
    assert "end-to-end" in lines[0] and "0.0636" in lines[0] and "rel L2 ≤ 0.05" in lines[0]
    assert "--keep-failing" in lines[0] and "Traceback" not in result.output
    after = Bundle.load(bundle)  # hashes verified: a whole bundle, as before
    assert "int8_dynamic" not in after.manifest.variants and after.manifest.files == before.files
    assert not (bundle / "onnx" / "int8_dynamic").exists()


def test_keep_failing_keeps_it_with_a_warning(bundle, missing_budget):
    result = quantize(bundle, "--keep-failing")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "misses its budget" in result.output
    assert "int8_dynamic" in Bundle.load(bundle).manifest.variants
