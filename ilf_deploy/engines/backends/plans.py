"""Plan specs: the one resolver every front door hands a `--plan` / `plan` string to.

generate, serve (a request's `plan` and `--default-plan`), batch (local and Ray), Triton, tune,
eval and bench all turn a spec into a `StepPlan` here, so the same spec is the same plan, or the
same one-line refusal, at each of them (tests/test_plan_resolution.py). The forms, first match wins:

- a plan bundled under that name (`Bundle.plan_names`);
- `auto`: the plan `tune --search-plans` chose on this machine (`backends.auto.choose_plan`), else
  the bundle's default plan (the reason, one line, goes to `say`);
- a plan JSON file (a path ending in .json, or any existing file) whose segments the bundle has;
- a preset (`plan.PRESET_HELP`: base-N, ilf-N, cache-N, composed -cache/-adapt forms), built for this
  bundle's depth, scheduler and feedback, where its segment boundaries allow.

Refusals are `PlanError`s: a `RequestError` on the `plan` field, so the HTTP and Triton front doors
answer them as 400s in the words the CLI prints. A request body may not name a plan file
(`files=False`): a client must not make a server read its files.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator

from ilf_deploy.core.errors import ConfigError
from ilf_deploy.core.plan import StepPlan, resolve_plan
from ilf_deploy.core.plan.builders import PRESET, is_plan_file, load_plan_file
from ilf_deploy.core.runtime.bundle import Bundle
from ilf_deploy.core.runtime.request import RequestError
from ilf_deploy.engines.backends.auto import AUTO, choose_plan

AUTO_PLAN = AUTO  # `--plan auto`: the plan search's choice here, else the bundle's default plan


class PlanError(RequestError):
    """A plan spec that names no plan this bundle can run: one line, on the `plan` field."""

    def __init__(self, verdict: str, **values: object) -> None:
        super().__init__(verdict, "plan", **values)


def _refused(spec: str, reason: str) -> PlanError:
    return PlanError("plan_refused", value=spec, reason=reason)


def bundle_plan_facts(bundle: Bundle) -> tuple[int, dict, tuple[int, int] | None, str]:
    """(blocks, scheduler config, feedback loop, t_post rule of its ILF plans) to build presets with."""
    rules = [bundle.plan(name).settings.get("t_post") for name in bundle.plan_names if name.startswith("ilf")]
    t_post = next((r for r in rules if isinstance(r, str)), "rescale")
    return bundle.model.num_blocks, dict(bundle.manifest.scheduler), bundle.loop, t_post


def _runnable(bundle: Bundle, spec: str, plan: StepPlan, preset: bool) -> StepPlan:
    """`plan`, refused unless the bundle's segments and feedback can run it."""
    missing = sorted(set(plan.cut_points) - set(bundle.manifest.cut_points))
    absent = f"not in this bundle (it has: {', '.join(bundle.plan_names)}); as a preset, " if preset else ""
    if missing:
        raise _refused(
            spec,
            f"{absent}it cuts the model at block(s) {missing} where this bundle has no segment boundary "
            f"(it has {list(bundle.manifest.cut_points)}); rebuild the bundle with the plan in --plans",
        )
    if plan.feedback_steps and bundle.loop is None:
        raise _refused(spec, f"{absent}it has feedback steps and this bundle has no feedback module")
    return plan


def resolve_bundle_plan(
    bundle: Bundle, spec: str, say: Callable[[str], None] | None = None, files: bool = True
) -> StepPlan:
    """The plan `spec` names for `bundle` (the forms in this module's docstring), or a PlanError.
    `say` gets `auto`'s one-line reason; `files=False` refuses plan files (a request body's spec)."""
    if spec in bundle.plan_names:
        return bundle.plan(spec)
    if spec == AUTO_PLAN:
        choice = choose_plan(bundle)
        if say is not None:
            say(choice.reason)
        return choice.plan or bundle.plan(bundle.default_plan)
    if not files and spec.endswith(".json"):  # a request's spec never reaches the filesystem
        raise _refused(spec, "plan files are read from the command line only, not from a request")
    if files and is_plan_file(spec):
        try:
            plan = load_plan_file(spec, bundle.model.num_blocks)
        except ConfigError as exc:
            raise _refused(spec, str(exc)) from None
        return _runnable(bundle, spec, plan, preset=False)
    if not PRESET.fullmatch(spec.strip().lower()):
        # the contract's words (the C++ runtime's too); the other forms are in --help and docs/plans.md
        raise PlanError("plan", value=spec, plans=", ".join(bundle.plan_names))
    blocks, scheduler, loop, t_post = bundle_plan_facts(bundle)
    try:
        plan = resolve_plan(spec, blocks, scheduler, loop, t_post)
    except ConfigError as exc:  # a preset's form with a value this model refuses (0 steps, a bad range)
        raise _refused(spec, str(exc)) from None
    return _runnable(bundle, spec, plan, preset=True)


class PlanBook:
    """The plans one server or batch runs, by spec: the bundle's, the default (any form, resolved
    once: `auto` is decided at start, not per request), and the specs requests name, each resolved
    once (at most `MAX_EXTRA` kept: presets are cheap to rebuild, the same every time)."""

    MAX_EXTRA = 64

    def __init__(
        self, bundle: Bundle, default: str | None = None, flag: str = "--default-plan", files: bool = False
    ) -> None:
        """`flag` names the default's option in its refusal; `files`: whether a request may name a plan
        file (batch: its rows are the operator's; serve and Triton: no)."""
        self.bundle, self.files = bundle, files
        self.pinned: dict[str, StepPlan] = {name: bundle.plan(name) for name in bundle.plan_names}
        self.default = default or bundle.default_plan
        if self.default not in self.pinned:
            try:
                self.pinned[self.default] = resolve_bundle_plan(bundle, self.default)
            except PlanError as exc:
                raise ConfigError(f"{flag}: {exc.message}") from None
        self._extra: OrderedDict[str, StepPlan] = OrderedDict()

    def __getitem__(self, spec: str) -> StepPlan:
        if spec in self.pinned:
            return self.pinned[spec]
        if spec in self._extra:
            self._extra.move_to_end(spec)
            return self._extra[spec]
        plan = resolve_bundle_plan(self.bundle, spec, files=self.files)
        self._extra[spec] = plan
        if len(self._extra) > self.MAX_EXTRA:
            self._extra.popitem(last=False)
        return plan

    def __iter__(self) -> Iterator[str]:
        """The pinned specs: the bundle's plans, then the default where it is not one of them."""
        return iter(self.pinned)

    def check(self, spec: str) -> None:
        """`spec` resolves (a PlanError otherwise): what the request contract calls."""
        self[spec]

    def label(self, spec: str) -> str:
        """The spec as a metrics label: the bundle's plans and the default by name, others as one."""
        return spec if spec in self.pinned else "other"
