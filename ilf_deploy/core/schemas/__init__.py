"""The published JSON Schemas (2020-12) of the bundle format: manifest, plan and tuning.json.

They are the contract every reader implements (this package's runtime, the C++ runtime in `cpp/`):
`ilf-deploy schema NAME` prints them, `Bundle.load` and `StepPlan.load` validate with them, and the
tests check every bundle the suite builds against them. docs/bundles.md: "The bundle format".
"""

from __future__ import annotations

import functools
import json
from importlib import resources
from typing import Any

from ilf_deploy.core.errors import IlfError

NAMES = ("manifest", "plan", "tuning")


@functools.cache
def schema(name: str) -> dict[str, Any]:
    """The schema `name` as shipped in the package (`NAMES`)."""
    if name not in NAMES:
        raise IlfError(f"unknown schema {name!r}; choose one of {', '.join(NAMES)}")
    return json.loads(resources.files(__package__).joinpath(f"{name}.schema.json").read_text())


@functools.cache
def _validator(name: str) -> Any:
    from jsonschema import Draft202012Validator

    return Draft202012Validator(schema(name))


def problem(name: str, instance: Any) -> str | None:
    """The first place where `instance` breaks schema `name`, in one line; None when it conforms."""
    from jsonschema.exceptions import best_match

    error = best_match(_validator(name).iter_errors(instance))
    if error is None:
        return None
    where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
    message = error.message if len(error.message) <= 200 else error.message[:200] + "…"
    return f"at {where}: {message}"
