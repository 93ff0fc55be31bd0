"""Shared fixtures: tiny random-weight pipelines, written once per test session (once per worker:
`make test` runs the suite on one pytest-xdist worker per core)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.model.loading import LoadedModel, load_model
from ilf_deploy.model.tiny import make_tiny_pipeline

# (architecture, resolution conditions): PixArt-α 512, PixArt-α 1024-style, PixArt-Σ, DiT
VARIANTS = {
    "pixart-alpha": ("pixart-alpha", False),
    "pixart-alpha-1024": ("pixart-alpha", True),
    "pixart-sigma": ("pixart-sigma", False),
    "dit": ("dit", False),
}


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {
        name: make_tiny_pipeline(arch, root / name, seed=7, num_layers=6, resolution_conditions=sizes)
        for name, (arch, sizes) in VARIANTS.items()
    }


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs) -> dict[str, LoadedModel]:
    return {name: load_model(path) for name, path in tiny_dirs.items()}


@pytest.fixture(scope="session")
def tiny_bundles(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """fp32 bundles of the tiny models with a plain, an ILF and a caching plan."""
    from ilf_deploy.build.export.build import BuildOptions, build_bundle

    root = tmp_path_factory.mktemp("bundles")
    options = BuildOptions(plans=("base-4", "ilf-4", "cache-6"))
    return {
        name: build_bundle(tiny_dirs[name], root / name, options)
        for name in ("pixart-alpha", "pixart-alpha-1024", "pixart-sigma", "dit")
    }


# Two-stream MMDiTs (tests/test_mmdit*.py, tests/test_cpp_mmdit.py): SD3, SD3.5 (q/k RMSNorm, dual
# attention), Flux.1-dev, Flux.1-schnell
MMDIT_FAMILIES = ("sd3", "sd3.5", "flux", "flux-schnell")


@pytest.fixture(scope="session")
def mmdit_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mmdit")
    return {name: make_tiny_pipeline(name, root / name, seed=5, num_layers=6) for name in MMDIT_FAMILIES}


@pytest.fixture(scope="session")
def mmdit_models(mmdit_dirs) -> dict[str, LoadedModel]:
    return {name: load_model(path) for name, path in mmdit_dirs.items()}


MMDIT_SIZES = ((32, 32), (64, 32))  # Flux-dev: 16 and 32 image tokens, two dynamic shifts
# every plan kind: plain, ILF, Δ-cache, and adaptive with and without feedback
MMDIT_PLANS = ("base-4", "ilf-4", "cache-6", "ilf-4-adapt1-4t0.3m2", "base-4-adapt1-4t0.3m2")


@pytest.fixture(scope="session")
def mmdit_bundles(mmdit_dirs, tmp_path_factory) -> dict[str, Path]:
    """fp32 bundles of the tiny MMDiTs at two sizes (built once: tests/test_mmdit_bundles.py and
    tests/test_cpp_mmdit.py share them)."""
    from ilf_deploy.build.export.build import BuildOptions, build_bundle

    root = tmp_path_factory.mktemp("mmdit-bundles")
    options = BuildOptions(plans=MMDIT_PLANS, resolutions=MMDIT_SIZES)
    return {name: build_bundle(mmdit_dirs[name], root / name, options) for name in MMDIT_FAMILIES}


@pytest.fixture(scope="session")
def default_bundle(tmp_path_factory) -> Path:
    """The embedded default model's bundle with one ILF plan and no model copy: what the wheel
    (tests/test_dist.py) and the serving image (tests/test_images.py) run."""
    from ilf_deploy.build.export.build import BuildOptions, build_bundle

    out = tmp_path_factory.mktemp("default-bundle") / "bundle"
    return build_bundle("default", out, BuildOptions(plans=("ilf-10",), copy_model=False))


# Sana (tests/test_sana.py; the bundle and C++ tests reuse them): a tiny SanaPipeline with Gemma-2,
# DC-AE (32x) and a random feedback module over blocks 2-4 of 6.
SANA_SIZES = ((256, 256), (320, 192))  # latent grids 8x8 and 10x6 (the Mix-FFN sees both)


@pytest.fixture(scope="session")
def sana_dir(tmp_path_factory) -> Path:
    return make_tiny_pipeline("sana", tmp_path_factory.mktemp("sana") / "sana", seed=5, num_layers=6)


@pytest.fixture(scope="session")
def sana_model(sana_dir) -> LoadedModel:
    return load_model(sana_dir)


# every plan kind of a Sana bundle (tests/test_sana_bundles.py, tests/test_cpp_sana.py)
SANA_PLANS = ("base-4", "ilf-4", "cache-6", "ilf-4-adapt1-4t0.3m2", "base-4-adapt1-4t0.3m2")


@pytest.fixture(scope="session")
def sana_bundle(sana_dir, tmp_path_factory) -> Path:
    """An fp32 bundle of the tiny Sana at both SANA_SIZES (built once for the Python and C++ tests)."""
    from ilf_deploy.build.export.build import BuildOptions, build_bundle

    out = tmp_path_factory.mktemp("sana-bundle") / "sana"
    return build_bundle(sana_dir, out, BuildOptions(plans=SANA_PLANS, resolutions=SANA_SIZES))


@pytest.fixture
def loads(monkeypatch) -> list[Path]:
    """Every `Bundle.load` from now on, by path."""
    seen: list[Path] = []
    original = Bundle.load.__func__

    def counting(cls, path, *args, **kwargs):
        seen.append(Path(path))
        return original(cls, path, *args, **kwargs)

    monkeypatch.setattr(Bundle, "load", classmethod(counting))
    return seen
