"""libilf packaged as C++ users expect it (issue 34, item 6): only the API in its dynamic symbol table,
public headers by concept with the internals kept out of the install.
`make cpp` builds and installs libilf into the venv; these tests skip only where it is absent because
this machine cannot build it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ilf_deploy.build.export.build import BuildOptions, build_bundle

PREFIX = Path(sys.executable).parent.parent  # `make cpp` installs into the venv
LIBRARY = PREFIX / "lib" / "libilf.so"


def _library() -> Path:
    if LIBRARY.is_file():
        return LIBRARY
    if shutil.which("cmake") is None or shutil.which("c++") is None:
        pytest.skip("the C++ runtime is not built: this machine has no C++ compiler or cmake (make cpp)")
    pytest.fail(f"{LIBRARY} is missing: run `make cpp` (this machine has a C++ compiler and cmake)")


def _dynamic_symbols(library: Path) -> list[str]:
    """Demangled names of the symbols the library defines in its dynamic symbol table."""
    listing = subprocess.run(
        ["nm", "-DC", "--defined-only", library], capture_output=True, text=True, check=True
    ).stdout
    return [line.split(" ", 2)[2] for line in listing.splitlines() if line.count(" ") >= 2]


def test_the_library_exports_only_the_api():
    symbols = _dynamic_symbols(_library())
    api = re.compile(r"^(ilf_\w+|ilf::|(typeinfo|typeinfo name|vtable) for ilf::)")
    leaked = [s for s in symbols if not api.match(s) and s != "ILF_1"]
    assert not leaked, leaked[:10]
    assert not [s for s in symbols if re.search(r"nlohmann|\bov::|ilf::detail", s)]
    # and the API is there: the C functions, the classes a consumer links against
    wanted = ("ilf_generate", "ilf_decode", "ilf::Bundle::load(", "typeinfo for ilf::Error", "ilf::denoise(")
    for name in wanted:
        assert any(s.startswith(name) for s in symbols), name


def test_the_internals_are_not_installed():
    _library()
    headers = {p.name for p in (PREFIX / "include" / "ilf").iterdir()}
    by_concept = {"tensor.hpp", "bundle.hpp", "engine.hpp", "loop.hpp", "generator.hpp", "version.hpp"}
    assert {"ilf.hpp", "ilf.h"} | by_concept <= headers
    assert not headers & {"detail.hpp", "internal.hpp", "sha256.hpp"}
    public = "".join((PREFIX / "include" / "ilf" / h).read_text() for h in headers)
    for internal in ("sha256_hex", "float_to_half", "read_npy", "encode_png", "cpu_flags"):
        assert internal not in public, internal


# -- a relocatable install: moved, then used by a project of one's own -------------------------------

BUILD = Path(__file__).resolve().parents[1] / "cpp" / "build"
EXAMPLES = Path(__file__).resolve().parents[1] / "cpp" / "examples"
SITE = Path(next(p for p in sys.path if p.endswith("site-packages")))


def _link_tree(source: Path, target: Path) -> None:
    """`source` under `target`, hard-linked where the file system allows (180 MB of OpenVINO)."""

    def link(src: str, dst: str) -> None:
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)

    shutil.copytree(source, target, copy_function=link, symlinks=True)


@pytest.fixture(scope="module")
def moved_prefix(tmp_path_factory) -> Path:
    """`cmake --install` of this checkout's build to a fresh prefix laid out as the venv (OpenVINO and
    openvino-tokenizers in its site-packages), then renamed: nothing may point back at the venv."""
    _library()
    if not (BUILD / "cmake_install.cmake").is_file():
        pytest.skip(f"{BUILD} is not this checkout's build (ilf came from elsewhere)")
    root = tmp_path_factory.mktemp("install")
    first = root / "env"
    subprocess.run(["cmake", "--install", BUILD, "--prefix", first], check=True, capture_output=True)
    site = first / SITE.relative_to(PREFIX)
    for package in ("openvino", "openvino_tokenizers"):
        _link_tree(SITE / package, site / package)
    moved = root / "moved"
    first.rename(moved)
    return moved


def test_the_install_names_no_absolute_path(moved_prefix):
    library = (moved_prefix / "lib" / "libilf.so").resolve()
    texts = [
        *(moved_prefix / "lib" / "cmake" / "ilf").glob("*.cmake"),
        moved_prefix / "lib" / "pkgconfig" / "ilf.pc",
    ]
    for path in [library, moved_prefix / "bin" / "ilf-run", *texts]:
        data = path.read_bytes()
        for absolute in (str(PREFIX), str(BUILD.parent.parent), str(moved_prefix.parent)):
            assert absolute.encode() not in data, (path, absolute)
    dynamic = subprocess.run(["readelf", "-d", library], capture_output=True, text=True, check=True).stdout
    runpath = re.search(r"\((?:RUNPATH|RPATH)\).*\[(.*)\]", dynamic).group(1)
    assert all(entry.startswith("$ORIGIN") for entry in runpath.split(":")), runpath
    assert "libilf.so.1" in re.search(r"\(SONAME\).*\[(.*)\]", dynamic).group(1)


def test_a_moved_install_builds_and_runs_a_project_of_ones_own(moved_prefix, tmp_path):
    """find_package(ilf) and pkg-config against the moved prefix; the C example generates from a
    prompt there (the OpenVINO tokenizer found beside the moved OpenVINO) as the installed ilf-run does."""
    bundle = build_bundle("default", tmp_path / "bundle", BuildOptions(plans=("ilf-10",), copy_model=False))
    cmake_build = tmp_path / "cmake"
    subprocess.run(
        ["cmake", "-S", EXAMPLES, "-B", cmake_build, f"-DCMAKE_PREFIX_PATH={moved_prefix}"],
        check=True,
        capture_output=True,
    )
    subprocess.run(["cmake", "--build", cmake_build, "--target", "embed-c"], check=True, capture_output=True)
    env = {**os.environ, "PKG_CONFIG_PATH": str(moved_prefix / "lib" / "pkgconfig")}
    flags = subprocess.run(
        ["pkg-config", "--cflags", "--libs", "ilf"], capture_output=True, text=True, env=env, check=True
    ).stdout.split()
    assert any(flag.startswith(f"-L{moved_prefix}/") for flag in flags), flags  # from ${pcfiledir}
    with_pc = tmp_path / "embed-c-pkg-config"
    subprocess.run(["cc", EXAMPLES / "embed.c", "-o", with_pc, *flags], check=True, capture_output=True)
    clean = {k: v for k, v in os.environ.items() if k not in ("LD_LIBRARY_PATH", "ILF_OPENVINO_TOKENIZERS")}
    outputs = []
    for binary in (cmake_build / "embed-c", with_pc):
        png = tmp_path / f"{binary.name}.png"
        result = subprocess.run(
            [binary, bundle, "a red circle", png], capture_output=True, text=True, env=clean, timeout=300
        )
        assert result.returncode == 0, result.stderr
        outputs.append(png.read_bytes())
    cli = tmp_path / "cli.png"
    subprocess.run(
        [moved_prefix / "bin" / "ilf-run", bundle, "--prompt", "a red circle", "--seed", "7", "--out", cli],
        check=True,
        capture_output=True,
        env=clean,
    )
    assert outputs[0] == outputs[1] == cli.read_bytes()
