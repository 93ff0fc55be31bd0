"""`--backend auto`: the engine `ilf-deploy tune` measured fastest on this machine, within budget.

`tune` (ilf_deploy/checks/tuning.py) writes `BUNDLE/tuning.json`: this machine's fingerprint, every
candidate engine x precision with its speed and fidelity, and the winner. `choose` reads it and
uses the winner only when the fingerprint is this machine's (CPU, flags, cores, library versions)
and the bundle's files are the ones that were tuned; otherwise, or without a tuning.json, it
falls back to ONNX Runtime fp32, the engine every bundle runs on. The `reason` says which it chose
and why, in one line (the CLI prints it on stderr).

tuning.json is not one of the manifest's hashed files: it describes a machine, not the bundle, and
`tune` may rewrite it on any machine without invalidating the bundle's hashes.

`tune --search-plans` adds the plan search (schema 2): `choose_plan` gives `--plan auto` its chosen
plan under the same conditions, and the bundle's default plan otherwise, with a one-line reason.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.plan import StepPlan
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.engines.backends.machine import fingerprint, fingerprint_difference

AUTO = "auto"
TUNING_FILE = "tuning.json"
TUNING_SCHEMA = 2  # the newest: 2 adds `plan_search` (tune --search-plans); 1 is written without it
TUNING_SCHEMAS = (1, 2, 3)  # the versions read
FALLBACK_BACKEND = "onnxruntime"


@dataclass(frozen=True)
class Choice:
    backend: str
    variant: str | None
    reason: str  # one line: what runs, and why
    tuned: bool  # False: the ONNX Runtime fp32 fallback
    options: dict[str, Any] = field(default_factory=dict)  # the backend's, e.g. torch's dtype

    @property
    def label(self) -> str:
        return engine_label(self.backend, self.variant, self.options)


def engine_label(backend: str, variant: str | None, options: dict[str, Any] | None = None) -> str:
    options = options or {}
    compiled = " compiled" if options.get("compile") else ""  # torch.compile (the torch backend)
    rest = f" +{options['precision']}" if variant and options.get("precision") else ""  # OpenVINO int8 +bf16
    return f"{backend} {variant or options.get('dtype') or 'fp32'}{rest}{compiled}"


def bundle_digest(bundle: Bundle) -> str:
    """The bundle's digest: a variant re-quantized after `tune` changes it."""
    return bundle.digest


def fallback(why: str) -> Choice:
    return Choice(FALLBACK_BACKEND, None, f"auto: {FALLBACK_BACKEND} fp32 ({why})", False)


def read_tuning(bundle: Bundle) -> dict[str, Any] | None:
    path = bundle.path / TUNING_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def choose(bundle: Bundle, variant: str | None = None, device: str = "cpu") -> Choice:
    """The engine `auto` means for `bundle` on this machine (never raises for a bad tuning.json)."""
    if variant is not None:  # a bundle variant runs on its own engine (VariantSpec.engine)
        if variant in bundle.manifest.variants:
            engine = bundle.variant_spec(variant).engine
            return Choice(
                engine, variant, f"auto: {engine} {variant} (--variant runs on its own engine)", False
            )
        raise ConfigError(
            f"--variant {variant} is not a variant of the bundle; with --backend auto name one of its "
            f"variants ({', '.join(bundle.manifest.variants) or 'it has none'}), or name the backend"
        )
    if device != "cpu":  # tune measures CPU engines; ONNX Runtime then says what --device is for
        return fallback(f"--device {device}: auto chooses among CPU engines only")
    data = read_tuning(bundle)
    if data is None:
        return fallback(f"no {TUNING_FILE}; `ilf-deploy tune {bundle.path}` finds the fastest engine here")
    rerun = f"rerun `ilf-deploy tune {bundle.path}`"
    winner = data.get("winner")
    if data.get("schema") not in TUNING_SCHEMAS or not isinstance(winner, dict) or "fingerprint" not in data:
        return fallback(f"{TUNING_FILE} is unreadable or from another version; {rerun}")
    difference = fingerprint_difference(data["fingerprint"], fingerprint())
    if difference is not None:
        return fallback(f"{TUNING_FILE} was measured on another machine or setup ({difference}); {rerun}")
    if data.get("bundle_digest") != bundle_digest(bundle):
        return fallback(f"the bundle's files changed since {TUNING_FILE} was written; {rerun}")
    backend, chosen, options = winner.get("backend"), winner.get("variant"), winner.get("options") or {}
    record = next(
        (
            c
            for c in data.get("candidates", [])
            if (c.get("backend"), c.get("variant"), c.get("options") or {}) == (backend, chosen, options)
        ),
        None,
    )
    if record is None or not record.get("ok"):  # tune never picks one; a hand-edited file might
        return fallback(f"the {TUNING_FILE} winner is not a candidate within its fidelity budget; {rerun}")
    speed = ""
    if record.get("speedup"):
        speed = f", {record['speedup']:.2f}x {engine_label(FALLBACK_BACKEND, None)}"
    ms = record.get("ms_per_step")
    measured = f"{ms:.1f} ms/step{speed}" if isinstance(ms, (int, float)) else "tuned"
    where = f"{measured} on {data.get('plan', '?')}, from {TUNING_FILE}"
    label = engine_label(str(backend), chosen, options)
    return Choice(str(backend), chosen, f"auto: {label} ({where})", True, dict(options))


# -- `--plan auto`: the plan `tune --search-plans` chose -------------------------------------------


@dataclass(frozen=True)
class PlanChoice:
    plan: StepPlan | None  # None: the fallback, the bundle's default plan
    reason: str  # one line: which plan, and why


def _stale(bundle: Bundle, data: dict[str, Any] | None) -> str | None:
    """Why tuning.json's plan search cannot be used here, or None."""
    rerun = f"`ilf-deploy tune {bundle.path} --search-plans` searches"
    if data is None:
        return f"no {TUNING_FILE}; {rerun}"
    if data.get("schema") not in TUNING_SCHEMAS or "fingerprint" not in data:
        return f"{TUNING_FILE} is unreadable or from another version; {rerun}"
    if not isinstance(data.get("plan_search"), dict):
        return f"{TUNING_FILE} holds no plan search; {rerun}"
    difference = fingerprint_difference(data["fingerprint"], fingerprint())
    if difference is not None:
        return f"the plan search was timed on another machine or setup ({difference}); {rerun}"
    if data.get("bundle_digest") != bundle_digest(bundle):
        return f"the bundle's files changed since the plan search; {rerun}"
    return None


def choose_plan(bundle: Bundle) -> PlanChoice:
    """The plan `--plan auto` means for `bundle` here: the plan search's choice while tuning.json
    is this machine's and this bundle's, else the bundle's default plan (never raises)."""
    data = read_tuning(bundle)
    why = _stale(bundle, data)
    if why is None:
        assert data is not None
        search = data["plan_search"]
        chosen = search.get("chosen") if isinstance(search.get("chosen"), dict) else {}
        try:
            plan = StepPlan.from_dict(chosen.get("plan"))
        except (ConfigError, TypeError):
            plan, why = None, "the plan search's chosen plan is malformed; search again"
        if plan is not None and set(plan.cut_points) - set(bundle.manifest.cut_points):
            plan, why = None, "the plan search's plan needs segments this bundle does not have"
        if plan is not None:
            seconds = chosen.get("seconds_per_image")
            timed = f"{seconds:.3f} s/image, " if isinstance(seconds, (int, float)) else ""
            budget = search.get("budget", {}).get("text", "?")
            return PlanChoice(plan, f"auto plan: {plan.name} ({timed}within {budget}, from {TUNING_FILE})")
    return PlanChoice(None, f"auto plan: {bundle.default_plan} ({why})")
