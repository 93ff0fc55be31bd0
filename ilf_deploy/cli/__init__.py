"""`ilf-deploy`: a thin command-line skin over the library.

The app and its error handling live here; each module below declares its commands with `@command`.
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from ilf_deploy.cli.extras import extras_by_module
from ilf_deploy.core.errors import IlfError
from ilf_deploy.core.files import write_report

try:  # the click that typer runs on: its own copy since typer 0.2x, else click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_errors  # type: ignore[no-redef]

ENV_PREFIX = "ILF"
app = typer.Typer(
    help="Deploy diffusion transformers accelerated with Inner Loop Feedback (ILF).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,  # --install-completion / --show-completion (bash, zsh, fish, PowerShell)
    # Every option of every command can come from the environment: ILF_<COMMAND>_<OPTION>, e.g.
    # ILF_SERVE_PORT=8080 or ILF_SERVE_MODEL_NAME=pixart (what a deployment sets; docs/cli-guide.md).
    context_settings={"auto_envvar_prefix": ENV_PREFIX},
)
# `ilf-deploy --help` groups the commands in these panels, in this order (docs/cli-guide.md).
PANELS = {
    "Build & check": ("make-tiny", "plan", "build", "inspect", "schema", "verify", "backends"),
    "Run & serve": ("generate", "bench", "batch", "serve"),
    "Optimise": ("tune", "calibrate", "quantize", "verify-variant", "build-engines", "verify-engines"),
    "Deploy": ("export-triton", "install-triton", "export-kuberay"),
    "Train": ("train-feedback", "train-base", "eval"),
}
PANEL_OF = {name: panel for panel, names in PANELS.items() for name in names}
# Optional dependencies -> the extra that installs them (pyproject.toml), for a one-line error.
EXTRAS = extras_by_module()
# Info lines are not wrapped at 80 columns when stderr is not a terminal (logs, pipes, CI).
console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
out = Console(width=None if sys.stdout.isatty() else 160)  # tables stay readable when piped


def fail(message: str) -> NoReturn:
    """One line on stderr (even with --quiet), exit code 2."""
    console.quiet = False
    # escape: messages hold brackets ("ilf-deploy[serve]", lists) that are not markup
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def command_for(target: typer.Typer):
    """A `target.command` that turns an IlfError into a one-line message and exit code 2."""

    def command(name: str | None = None):
        def decorate(fn):
            @functools.wraps(fn)
            def wrapper(*args, **kwargs):
                try:
                    return fn(*args, **kwargs)
                except IlfError as exc:
                    fail(str(exc))
                except OSError as exc:  # what a check up front (cli/paths.py) could not foresee
                    where = f" ({exc.filename})" if exc.filename else ""
                    fail(f"{exc.strerror or exc}{where}")
                except ModuleNotFoundError as exc:
                    extra = EXTRAS.get((exc.name or "").split(".")[0])
                    if extra is None:
                        raise
                    fail(f"{name or fn.__name__} needs {exc.name}: pip install 'ilf-deploy[{extra}]'")

            panel = PANEL_OF.get(name or fn.__name__.replace("_", "-"))
            return target.command(name, rich_help_panel=panel)(wrapper)

        return decorate

    return command


command = command_for(app)


def finish_checks(checks: list, as_json: Path | None, limit: str = "budget") -> None:
    """The end of every check command: the rows as JSON if asked, then exit 1 if any is beyond its
    `limit` (a budget or a tolerance)."""
    if as_json is not None:
        write_report(as_json, [c.to_dict() for c in checks])  # an exact match is inf dB: strict JSON
    failed = [c for c in checks if not c.ok]
    if failed:
        console.print(f"[red]{len(failed)} check(s) beyond {limit}[/red]")
        raise typer.Exit(1)
    console.print(f"all {len(checks)} checks within {limit}")


def progress(eta: bool = False) -> Progress:
    """Every command's progress bar (on stderr, gone when done); `eta` adds the time left."""
    remaining = (TextColumn("eta"), TimeRemainingColumn()) if eta else ()
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *remaining,
        console=console,
        transient=True,
    )


def _version(value: bool) -> None:
    if value:
        from ilf_deploy import __version__

        out.print(f"ilf-deploy {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            callback=_version,
            help="Print the version and exit.",
            allow_from_autoenv=False,  # a deployment's ILF_VERSION=1.2 must not answer for every command
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet",
            "-q",
            help="No progress or info lines on stderr: results and errors only.",
            allow_from_autoenv=False,
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose", "-v", help="Debug log lines from ilf_deploy on stderr.", allow_from_autoenv=False
        ),
    ] = False,
) -> None:
    """Options for every command: `ilf-deploy -q COMMAND ...`."""
    if quiet and verbose:
        fail("--quiet and --verbose exclude each other")
    console.quiet = quiet
    if verbose:
        logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        logging.getLogger("ilf_deploy").setLevel(logging.DEBUG)


def _no_bool_metavar() -> None:
    """Typer >= 0.2x shows `<bool>` beside every flag (--json <bool>): a flag takes no value."""
    from typer.core import TyperOption

    shown = TyperOption.display_type_rich

    def display_type_rich(self: TyperOption, ctx) -> str | None:
        return None if self.is_bool_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_no_bool_metavar()


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that every `finally` (and `except BaseException`)
    removes what it was writing. Not a KeyboardInterrupt: click would take that for Ctrl-C."""


def _terminate(signum: int, frame: object) -> None:
    raise Terminated


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)  # `serve` installs its own (a drain) when it starts
    try:
        code = app(standalone_mode=False)  # click's own errors come here, to be one line too
    except Terminated:
        console.print("terminated")
        sys.exit(128 + signal.SIGTERM)
    except click_errors.ClickException as exc:  # a malformed command line: a bad type, a missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":  # `ilf-deploy` alone: the help, as before
            exc.show()
        else:
            where = f" (see `{exc.ctx.command_path} --help`)" if getattr(exc, "ctx", None) else ""
            console.print(
                f"[red]error:[/red] {escape(exc.format_message())}{where}", highlight=False, soft_wrap=True
            )
        sys.exit(exc.exit_code)
    except typer.Abort:  # Ctrl-D at a prompt
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()


# Each module declares its commands at import with `@command` (they need `app` and `command` above).
from ilf_deploy.cli import batch as _batch  # noqa: E402, F401
from ilf_deploy.cli import bundles, engines, generate, plans, serve, training, triton  # noqa: E402, F401
from ilf_deploy.cli import tune as _tune  # noqa: E402, F401


def _in_panel_order() -> None:
    """`--help` lists panels in the order of their first command: PANELS' order, then its own."""
    order = [name for names in PANELS.values() for name in names]

    def position(info) -> int:
        name = info.name or info.callback.__name__.replace("_", "-")
        return order.index(name) if name in order else len(order)

    app.registered_commands.sort(key=position)


_in_panel_order()
