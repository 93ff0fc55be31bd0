"""`ilf-deploy`: a thin command-line skin over the library.

The app and its error handling live here; each module below declares its commands with `@command`.
"""

from __future__ import annotations

import functools
import json
import signal
import sys
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import IlfError
from ..runtime.bundle import strict_json
from .extras import extras_by_module

try:  # the click that typer runs on: its own copy since typer 0.2x, else click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer
    from click import exceptions as click_errors  # type: ignore[no-redef]

app = typer.Typer(
    help="Deploy diffusion transformers accelerated with Inner Loop Feedback (ILF).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Optional dependencies -> the extra that installs them (pyproject.toml), for a one-line error.
EXTRAS = extras_by_module()
# Info lines are not wrapped at 80 columns when stderr is not a terminal (logs, pipes, CI).
console = Console(stderr=True, soft_wrap=not sys.stderr.isatty())
out = Console(width=None if sys.stdout.isatty() else 160)  # tables stay readable when piped


def fail(message: str) -> NoReturn:
    """One line on stderr, exit code 2."""
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

            return target.command(name)(wrapper)

        return decorate

    return command


command = command_for(app)


def finish_checks(checks: list, as_json: Path | None, limit: str = "budget") -> None:
    """The end of every check command: the rows as JSON if asked, then exit 1 if any is beyond its
    `limit` (a budget or a tolerance)."""
    if as_json is not None:
        rows = strict_json([c.to_dict() for c in checks])  # an exact match is inf dB: strict JSON
        as_json.write_text(json.dumps(rows, indent=2, allow_nan=False) + "\n")
    failed = [c for c in checks if not c.ok]
    if failed:
        console.print(f"[red]{len(failed)} check(s) beyond {limit}[/red]")
        raise typer.Exit(1)
    console.print(f"all {len(checks)} checks within {limit}")


def progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )


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
from . import batch as _batch  # noqa: E402, F401
from . import bundles, engines, generate, plans, serve, training, triton  # noqa: E402, F401
from . import tune as _tune  # noqa: E402, F401
