"""Sphinx configuration: the docs site (`make docs`, built with warnings as errors in the tests).

Sphinx + MyST + furo, not MkDocs: autodoc reads the package's own docstrings for the API reference,
MyST keeps the pages in Markdown like the README, and `-W` (warnings as errors) covers broken
references, bad includes and docstrings that do not parse. The CLI reference is generated from the
Typer app at build time (`_generated/cli.md`: each command's own `--help`), so it cannot drift.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
sys.path.insert(0, str(DOCS.parent))

import ilf_deploy  # noqa: E402

project = "ilf-deploy"
release = version = ilf_deploy.__version__
copyright = "the ilf-deploy authors; Apache-2.0"
extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown"}
exclude_patterns = ["_build", "README.md"]
myst_heading_anchors = 4
suppress_warnings = ["myst.xref_missing"]  # the README's in-page links point at GitHub-style anchors
html_theme = "furo"
html_title = f"ilf-deploy {version}"
default_role = "code"  # `x` in docstrings is code, as in the README
autodoc_typehints = "description"
autodoc_member_order = "bysource"
nitpicky = False


def write_cli_reference(app) -> None:
    """`_generated/cli.md`: every command's `--help`, as the installed CLI prints it."""
    from typer.testing import CliRunner

    from ilf_deploy.cli import app as cli

    os.environ["COLUMNS"] = "100"
    runner = CliRunner()
    top = runner.invoke(cli, ["--help"], prog_name="ilf-deploy", terminal_width=100)
    import typer.main

    names = sorted(typer.main.get_command(cli).commands)  # type: ignore[attr-defined]
    parts = [
        "# CLI reference",
        "",
        "Generated from the Typer app when the docs are built (`ilf-deploy COMMAND --help`).",
        "",
        "```text",
        top.output.rstrip(),
        "```",
    ]
    for name in names:
        result = runner.invoke(cli, [name, "--help"], prog_name="ilf-deploy", terminal_width=100)
        parts += ["", f"## `ilf-deploy {name}`", "", "```text", result.output.rstrip(), "```"]
    out = DOCS / "_generated" / "cli.md"
    out.parent.mkdir(exist_ok=True)
    text = "\n".join(parts) + "\n"
    if not out.is_file() or out.read_text() != text:  # unchanged: no rebuild of the page
        out.write_text(text)


def setup(app) -> None:
    app.connect("builder-inited", write_cli_reference)
