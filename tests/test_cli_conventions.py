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


# -- the --force rule: an output that exists is replaced only with --force (docs/cli-guide.md) --------

# Path parameters that name what a command reads (besides every BUNDLE argument).
INPUTS = {
    ("plan", "model"),
    ("generate", "latents_in"),
    ("batch", "prompts"),
    ("calibrate", "prompts"),
    ("serve", "api_key_file"),
    ("serve", "ssl_keyfile"),
    ("serve", "ssl_certfile"),
    ("install-triton", "wheel"),
}
# Outputs meant to be written again, so without --force (the exceptions docs/cli-guide.md lists).
REWRITTEN = {
    ("batch", "out"): "a results directory a re-run resumes: rows done are skipped, never rewritten",
    ("train-base", "work"): "the checkpoints each stage resumes from",
}
# Every other path parameter is an output: (command line, output, what exists there already, whether
# the --force run is quick enough to make here). `{out}` is the output, `{tmp}` a scratch directory; an
# existing path ending in / is a directory holding one file.
J, P = "o.json", "o.png"
GEN, BENCH = "generate {bundle} -p base-2 --class-label 1", "bench {bundle} --runs 1 --warmup 0"
K8S = "export-triton {bundle} -o {tmp}/r --copy-bundle --k8s {out}"
WRITERS: dict[tuple[str, str], tuple[str, str, str, bool]] = {
    ("plan", "save"): ("plan -n 2 --blocks 2 --out {out}", J, J, True),
    ("make-tiny", "out_dir"): ("make-tiny dit {out} --layers 2", "o", "o/", True),
    ("build", "out"): ("build {model} --out {out} --plans base-2", "o", "o/", False),
    ("verify", "as_json"): ("verify {bundle} --json-out {out}", J, J, False),
    ("generate", "image_out"): (GEN + " --out {out}", P, P, True),
    ("generate", "latents_out"): (GEN + " --latents-out {out}", "o.npy", "o.npy", True),
    ("bench", "as_json"): (BENCH + " --json-out {out}", J, J, True),
    ("bench", "plot_out"): (BENCH + " --plot {out}", P, P, True),
    ("tune", "plot"): ("tune {bundle} --search-plans --plot {out}", P, P, False),
    ("verify-variant", "as_json"): ("verify-variant {bundle} --variant v --json-out {out}", J, J, False),
    ("verify-engines", "as_json"): ("verify-engines {bundle} --json-out {out}", J, J, False),
    ("export-triton", "out"): ("export-triton {bundle} --out {out}", "o", "o/ilf/", True),
    ("export-triton", "k8s"): (K8S, "o", "o/kserve.yaml", True),
    ("export-kuberay", "out"): ("export-kuberay {bundle} --out {out}", "o", "o/rayjob.yaml", True),
    ("train-feedback", "out_dir"): ("train-feedback {model} --steps 1 --out {out}", "o", "o/", False),
    ("train-base", "out_dir"): ("train-base all --work {tmp}/work --out {out}", "o", "o/", False),
    ("eval", "json_out"): ("eval {bundle} --n 1 --plans base-2 --json-out {out}", J, J, False),
    ("eval", "grid"): ("eval {bundle} --n 1 --plans base-2 --grid {out}", P, P, False),
}  # fmt: skip
BEFORE = b"written before"


def path_parameters() -> set[tuple[str, str]]:
    """(command, parameter) of every file or directory parameter, walking the app."""
    return {
        (name, param.name)
        for name, command in COMMANDS.items()
        for param in command.params
        if param.type_descriptor.is_path
        and not (param.name == "bundle" and param.param_type_name == "argument")
    }


def test_every_path_parameter_is_an_input_an_output_or_a_listed_exception():
    """A new path option fails here until it is classified (and an output, held to the rule below)."""
    found = path_parameters()
    outputs = found - INPUTS - set(REWRITTEN)
    assert outputs == set(WRITERS), outputs ^ set(WRITERS)
    for command in {name for name, _ in WRITERS} | {"quantize", "calibrate", "build-engines"}:
        assert "--force" in [opt for p in COMMANDS[command].params for opt in p.opts], command


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, str]:
    """A 2-block DiT and its bundle (one plan): what every writer below runs on."""
    from ilf_deploy.build.export.build import BuildOptions, build_bundle
    from ilf_deploy.model.tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("force")
    model = make_tiny_pipeline("dit", root / "model", num_layers=2)
    bundle = build_bundle(model, root / "bundle", BuildOptions(plans=("base-2",)))
    return {"model": str(model), "bundle": str(bundle)}


def _existing(root: Path, name: str) -> Path:
    """Make what the command would replace; returns the file whose bytes must survive a refusal."""
    path = root / name / "keep" if name.endswith("/") else root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(BEFORE)
    return path


@pytest.fixture
def no_work(monkeypatch):
    """Any command's work (a progress bar, a status spinner) fails the test: refusals come first."""
    import ilf_deploy.cli as cli

    def started(*args, **kwargs):
        raise AssertionError("the work started before the refusal")

    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("ilf_deploy.cli") and hasattr(module, "progress"):
            monkeypatch.setattr(module, "progress", started)
    monkeypatch.setattr(cli.console, "status", started)


@pytest.mark.parametrize("writer", sorted(WRITERS), ids="-".join)
def test_an_existing_output_is_refused_without_force(writer, tiny, tmp_path, no_work, monkeypatch):
    argv, out, existing, quick = WRITERS[writer]
    kept = _existing(tmp_path, existing)
    args = [a.format(out=tmp_path / out, tmp=tmp_path, **tiny) for a in argv.split()]
    result = CliRunner().invoke(app, args)
    text = result.output.strip()
    assert result.exit_code == 2 and len(text.splitlines()) == 1, text
    assert text.startswith("error:") and "--force" in text and str(tmp_path / out) in text, text
    assert kept.read_bytes() == BEFORE
    if not quick:
        return
    monkeypatch.undo()  # the work may start now
    replaced = CliRunner().invoke(app, [*args, "--force"])
    assert replaced.exit_code == 0, replaced.output
    assert not kept.exists() or kept.read_bytes() != BEFORE  # replaced, not merely left


def test_bundle_artifacts_are_refused_without_force(tiny, tmp_path):
    """What calibrate and quantize add to a bundle under a name is an output too."""
    import shutil

    bundle = shutil.copytree(tiny["bundle"], tmp_path / "b")
    runner = CliRunner()
    steps = [
        (["calibrate", str(bundle), "--max-samples", "1"], f"BUNDLE {bundle / 'calibration'} exists"),
        (["quantize", str(bundle), "--mode", "int8-dynamic", "--keep-failing"], "--name int8_dynamic"),
    ]
    for args, refusal in steps:
        assert runner.invoke(app, args).exit_code == 0
        manifest = (bundle / "manifest.json").read_bytes()
        again = runner.invoke(app, args)
        text = again.output.strip()
        assert again.exit_code == 2 and len(text.splitlines()) == 1 and refusal in text, text
        assert "--force" in text and (bundle / "manifest.json").read_bytes() == manifest
    replaced = runner.invoke(app, [*steps[1][0], "--force"])
    assert replaced.exit_code == 0, replaced.output
