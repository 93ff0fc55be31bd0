"""The docs site: built with warnings as errors, and every shell and Python example on its pages (and
the README's) run.

Examples are the fenced blocks whose language is `bash` or `python`; `console`, `text`, plain
fences (usage synopses, outputs) and `py` (a sketch to fill in) are shown, not run, and so is an
`sh` block, which says in its first line why (a GPU, root and podman, a cluster, minutes). Each
page's examples run in order as one bash script in a fresh directory, with this environment's
`bin` first on PATH, so a page reads as one session: a server started in one block is stopped in a
later one.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import ray_sandbox

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
BIN = Path(sys.executable).parent
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```\s*$", re.S | re.M)
RUNNABLE = ("bash", "python")
PAGES = [*sorted(DOCS.glob("*.md")), ROOT / "README.md"]


def examples(page: Path) -> list[tuple[str, str, int]]:
    """(language, code, line) of each runnable block on `page`."""
    text = page.read_text()
    found = []
    for match in FENCE.finditer(text):
        if match.group(1) in RUNNABLE:
            found.append((match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1))
    return found


def script(page: Path) -> str:
    """The page's examples as one bash script: python blocks as heredocs, each block announced on
    stderr (so a failure names it), background jobs killed on exit."""
    lines = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null || true' EXIT"]
    for language, code, line in examples(page):
        lines.append(f"echo '--- {page.name}:{line} ({language})' >&2")
        if language == "python":
            lines += ["python - <<'ILF_DOCS_PYTHON'", code.rstrip("\n"), "ILF_DOCS_PYTHON"]
        else:
            lines.append(code.rstrip("\n"))
    return "\n".join(lines) + "\n"


def test_the_example_parser_finds_what_the_pages_hold():
    found = {page.name: examples(page) for page in PAGES}
    # plan, build + verify, generate, and serve: start, ask, a bad ask, stop
    assert len(found["getting-started.md"]) == 7
    assert [lang for lang, _, _ in found["python-api.md"]] == ["python", "python"]
    shown = FENCE.findall((DOCS / "getting-started.md").read_text())
    assert any(lang == "console" for lang, _ in shown)  # `make setup`: shown, not run


def test_every_shell_block_runs_or_says_why_not():
    """No shell example is shown without being run unless its fence is `sh` and it says why."""
    for page in PAGES:
        text = page.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            assert match.group(1) not in ("shell", "zsh"), f"{page.name}:{line}: bash (run) or sh (why not)"
            if match.group(1) == "sh":
                assert match.group(2).startswith("# "), f"{page.name}:{line}: say why it is not run"


# The pages' servers listen on the fixed ports a reader would type (8765, 8766, …): each page runs in a
# network namespace of its own where one can be made (root, as in CI), so that no other test's server
# (`make test` runs two at once) or the machine's holds them.
OWN_LOOPBACK = (
    []
    if ray_sandbox.unavailable()
    else ["unshare", "--net", "sh", "-c", 'ip link set lo up && exec "$@"', "-"]
)


@pytest.mark.parametrize("page", [p for p in PAGES if examples(p)], ids=lambda p: p.name)
def test_every_example_on_the_page_runs(page: Path, tmp_path):
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(tmp_path), "COLUMNS": "100", "NO_COLOR": "1"}
    done = subprocess.run(
        [*OWN_LOOPBACK, "bash", "-c", script(page)], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, f"{page.name}: exit {done.returncode}\n{done.stderr[-4000:]}"
    assert done.stderr.count(f"--- {page.name}:") == len(examples(page))  # every block ran


def test_the_site_builds_with_warnings_as_errors(tmp_path):
    build = subprocess.run(
        [BIN / "sphinx-build", "-W", "--keep-going", "-q", "-b", "html", DOCS, tmp_path / "html"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-4000:]
    cli = (tmp_path / "html" / "_generated" / "cli.html").read_text()
    assert "ilf-deploy generate" in cli and "--plan" in cli  # generated from the Typer app
    api = (tmp_path / "html" / "python-api.html").read_text()
    assert "open_generator" in api and "generate_latents" in api  # from the docstrings
