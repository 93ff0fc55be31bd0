"""Options that several commands share, declared once as typed aliases."""

from __future__ import annotations

from typing import Annotated

import typer

Digest = Annotated[
    str | None,
    typer.Option(
        "--digest",
        metavar="sha256:HEX",
        help="Pin the bundle: refuse it unless its digest (`ilf-deploy inspect` prints it) is this one, "
        "as an image digest pins a container.",
    ),
]
