"""The command line's conventions (issue 33): --version, shell completion, commands grouped in
help panels, global --quiet/--verbose, no `<bool>` beside flags, no 80-column wrapping in logs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
import typer.main
from typer.testing import CliRunner

from ilf_deploy.cli import PANELS, app

EXECUTABLE = Path(sys.executable).with_name("ilf-deploy")  # the installed entry point
COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """The real executable, its output piped (not a terminal), as in a log or CI."""
    return subprocess.run(
        [str(EXECUTABLE), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_version():
    result = run("--version")
    assert result.returncode == 0 and result.stdout == f"ilf-deploy {metadata.version('ilf-deploy')}\n"


def test_completion_script_and_completions():
    """The scripts `--install-completion` installs, for any shell (docs/cli-guide.md)."""
    bash = run(env={"_ILF_DEPLOY_COMPLETE": "source_bash"})
    assert bash.returncode == 0 and "_ILF_DEPLOY_COMPLETE=complete_bash" in bash.stdout
    assert "complete -o default -F _ilf_deploy_completion ilf-deploy" in bash.stdout
    for shell, first in (("zsh", "#compdef ilf-deploy"), ("fish", "complete --command ilf-deploy")):
        script = run(env={"_ILF_DEPLOY_COMPLETE": f"source_{shell}"})
        assert script.returncode == 0 and script.stdout.strip().startswith(first), shell
    help_text = run("--help").stdout
    assert "--install-completion" in help_text and "--show-completion" in help_text
    # what the bash script asks for when the user types `ilf-deploy verify<TAB>`
    words = run(
        env={"_ILF_DEPLOY_COMPLETE": "complete_bash", "COMP_WORDS": "ilf-deploy verify", "COMP_CWORD": "1"}
    )
    assert words.stdout.split() == ["verify", "verify-variant", "verify-engines"]


def test_every_command_is_in_one_panel_and_help_lists_panels_in_order():
    listed = [name for names in PANELS.values() for name in names]
    assert sorted(listed) == sorted(COMMANDS), set(listed) ^ set(COMMANDS)
    help_text = run("--help").stdout
    positions = [help_text.index(f"─ {panel} ─") for panel in PANELS]
    assert positions == sorted(positions)
    for panel, names in PANELS.items():
        start = help_text.index(f"─ {panel} ─")
        block = help_text[start : help_text.index("╰", start)]
        shown = re.findall(r"^│ ([a-z][a-z-]+) ", block, re.MULTILINE)
        assert shown == list(names), (panel, shown)


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_no_bool_metavar(command):
    result = CliRunner().invoke(app, [*([command] if command else []), "--help"])
    assert result.exit_code == 0 and "--help" in result.output
    assert "<bool>" not in result.output


def test_quiet_verbose_and_no_wrapping(tmp_path):
    long_dir = tmp_path / ("a-directory-name-long-enough-that-the-line-is-wider-than-eighty-columns" * 2)
    result = run("make-tiny", "dit", str(long_dir), "--layers", "2")
    assert result.returncode == 0, result.stderr
    line = f"tiny dit pipeline → {long_dir}"
    assert line in result.stderr.splitlines()  # one line, however long: no wrapping when piped
    quiet = run("-q", "make-tiny", "dit", str(tmp_path / "quiet"), "--layers", "2")
    assert quiet.returncode == 0 and quiet.stderr == "" and (tmp_path / "quiet").is_dir()
    refused = run("--quiet", "make-tiny", "dit", str(tmp_path / "quiet"))  # errors still show
    assert (
        refused.returncode == 2
        and refused.stderr.startswith("error:")
        and len(refused.stderr.splitlines()) == 1
    )
    both = run("-q", "-v", "backends")
    assert both.returncode == 2 and "--quiet and --verbose" in both.stderr
    verbose = run("-v", "schema", "plan")
    assert verbose.returncode == 0 and '"$schema"' in verbose.stdout


def test_options_from_the_environment(tmp_path):
    """ILF_<COMMAND>_<OPTION>: what a deployment sets (a flag on the command line still wins)."""
    made = run("make-tiny", "dit", str(tmp_path / "m"), env={"ILF_MAKE_TINY_LAYERS": "3"})
    assert made.returncode == 0, made.stderr
    config = json.loads((tmp_path / "m" / "transformer" / "config.json").read_text())
    assert config["num_layers"] == 3
    flag = run("make-tiny", "dit", str(tmp_path / "f"), "--layers", "2", env={"ILF_MAKE_TINY_LAYERS": "3"})
    assert json.loads((tmp_path / "f" / "transformer" / "config.json").read_text())["num_layers"] == 2
    assert flag.returncode == 0
    refused = run("serve", str(tmp_path / "m"), env={"ILF_SERVE_PORT": "70000"})
    assert refused.returncode == 2 and "--port must be in 0..65535" in refused.stderr
    # the global options are command-line only: a deployment's own ILF_VERSION or ILF_QUIET is not ours
    schema = run("schema", "plan", env={"ILF_VERSION": "1.2.3", "ILF_QUIET": "yes please"})
    assert schema.returncode == 0 and '"$schema"' in schema.stdout, schema.stderr


def test_one_meaning_per_option_name():
    """`--json` prints JSON to stdout (a flag) on every command that has it; `--json-out FILE` writes
    it to a file; `--prompts` is always a file of prompts (tune's count is `--prompt-count`)."""
    seen: dict[str, set[str]] = {"--json": set(), "--json-out": set(), "--prompts": set()}
    for name, command in COMMANDS.items():
        for param in command.params:
            for flag in set(param.opts) & set(seen):
                seen[flag].add(name)
                if flag == "--json":
                    assert param.is_flag, name
                else:
                    assert not param.is_flag, (name, flag)
                if flag == "--prompts":
                    assert param.type_descriptor.is_path, name
    assert {"plan", "inspect", "backends", "tune"} <= seen["--json"]
    assert {"verify", "verify-variant", "verify-engines", "bench", "eval"} <= seen["--json-out"]
    assert {"batch", "calibrate"} <= seen["--prompts"] and "tune" not in seen["--prompts"]
