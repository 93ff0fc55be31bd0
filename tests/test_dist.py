"""The wheel (`make dist`), installed (not `-e`) into a fresh virtual environment without torch, runs the
main job: `generate` on the default model's bundle, the same image as the development install's."""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import venv
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST_CLI = Path(sys.executable).parent / "ilf-deploy"
# What building needs and serving does not (pyproject.toml: `[export]`).
BUILD_ONLY = ("torch", "diffusers", "transformers", "onnx", "nncf")


def run(*args: object, **kwargs) -> subprocess.CompletedProcess:
    """`args`, which must succeed; outside the checkout, whose `ilf_deploy` would shadow the wheel's."""
    kwargs.setdefault("cwd", tempfile.gettempdir())
    result = subprocess.run([str(a) for a in args], capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    run(sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", out, ROOT)
    (built,) = out.glob("ilf_deploy-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel_env(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel and its `[onnx]` extra (pip's cache keeps this quick)."""
    env = tmp_path_factory.mktemp("wheel-env") / "venv"
    venv.create(env, with_pip=True)
    run(env / "bin" / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
        f"{wheel}[onnx]")  # fmt: skip
    return env


def test_the_wheel_holds_the_schemas_and_the_default_model(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    for schema in ("manifest", "plan", "tuning"):
        assert f"ilf_deploy/core/schemas/{schema}.schema.json" in names
    for part in ("model_index.json", "transformer/config.json", "tokenizer/tokenizer.json"):
        assert f"ilf_deploy/default_model/{part}" in names
    assert not [n for n in names if n.startswith("tests/")]
    requires = metadata.get_all("Requires-Dist")
    core = [r for r in requires if "extra ==" not in r]
    assert not [r for r in core if re.match(rf"({'|'.join(BUILD_ONLY)})\b", r)], core
    extras = set(metadata.get_all("Provides-Extra"))
    assert {"serve", "openvino", "onnx", "triton", "ray", "export"} <= extras, extras


def test_the_wheel_names_the_project_urls(wheel):
    """`[project.urls]`: what PyPI and `pip show` link to; the source is the one the OCI labels name."""
    with zipfile.ZipFile(wheel) as archive:
        (metadata_name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        metadata = Parser().parsestr(archive.read(metadata_name).decode())
    urls = dict(line.split(", ", 1) for line in metadata.get_all("Project-URL") or [])
    assert set(urls) == {"Homepage", "Source", "Documentation", "Changelog", "Issues"}, urls
    source = re.search(r'^SOURCE = "(.+)"$', (ROOT / "containers" / "build.py").read_text(), re.M)
    assert source and urls["Source"] == urls["Homepage"] == source.group(1)
    assert all(
        url.startswith(source.group(1) + "/")
        for name, url in urls.items()
        if name not in {"Homepage", "Source"}
    )


def test_the_cli_names_the_extras_the_wheel_declares(wheel_env):
    code = "from ilf_deploy.cli import EXTRAS as e; print(e['torch'], e['onnxruntime'], e['fastapi'])"
    table = run(wheel_env / "bin" / "python", "-c", code).stdout.split()
    assert table == ["export", "onnx", "serve"]


def test_the_installed_wheel_generates_without_torch(wheel_env, default_bundle, tmp_path):
    installed = run(wheel_env / "bin" / "python", "-m", "pip", "list", "--format=freeze").stdout.lower()
    assert not [name for name in BUILD_ONLY if f"\n{name}==" in f"\n{installed}"], installed
    where = run(wheel_env / "bin" / "python", "-c", "import ilf_deploy; print(ilf_deploy.__file__)").stdout
    assert where.startswith(str(wheel_env)), where  # the wheel's copy, not the checkout
    args = ("generate", default_bundle, "--plan", "ilf-10", "--prompt", "a small red circle", "--seed", "3")
    run(wheel_env / "bin" / "ilf-deploy", *args, "--out", tmp_path / "wheel.png")
    run(HOST_CLI, *args, "--out", tmp_path / "checkout.png")
    assert (tmp_path / "wheel.png").read_bytes() == (tmp_path / "checkout.png").read_bytes()
    missing = subprocess.run(
        [wheel_env / "bin" / "ilf-deploy", "generate", default_bundle, "--backend", "torch", "--prompt", "x"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    text = (missing.stdout + missing.stderr).strip()
    assert missing.returncode == 2 and "pip install 'ilf-deploy[export]'" in text, text
    assert len(text.splitlines()) == 1, text
