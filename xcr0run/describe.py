"""A plan in words: what a view hides and how it is presented here, for the start-up
banner, `--show --mask` and --report's "plan".
"""

from __future__ import annotations

from xcr0run import procfs, xsave
from xcr0run.errors import UnsupportedError
from xcr0run.plan import Plan, plan_for
from xcr0run.view import CpuidView, psabi_level

TYPE_CHECKING = False  # typing's import costs start-up time (the banner is on its path)
if TYPE_CHECKING:
    from typing import Any

    from xcr0run.cpuid import CpuidTable
    from xcr0run.envhints import EnvHint
    from xcr0run.plan import Capabilities, ViewSpec


def env_hints(plan: Plan) -> list[EnvHint]:
    from xcr0run import envhints

    env = envhints.as_mapping(procfs.original_environment())
    return envhints.env_hints(plan.view.hidden, plan.view.cleared, env)


def describe_plan(
    plan: Plan, spec: ViewSpec, table: CpuidTable, hints: list[EnvHint] | None = None
) -> dict[str, Any]:
    """What a view means here, for `--show --mask` and the start-up banner."""
    seen = plan.view.apply(table)
    limits = plan.view.limits()
    if plan.env_only:
        from xcr0run.envhints import LIMITS

        limits = [LIMITS]
    return {
        "view": spec.label,
        "xcr0": f"{plan.mask:#x}",
        "xcr0_decoded": [c.name for c in xsave.components(plan.mask)],
        "mechanism": plan.mechanism,
        "how": plan.describe(),
        "hidden_features": plan.view.hidden_present(table),
        "added_features": sorted(plan.view.added),
        "psabi_level": psabi_level(seen, plan.mask),
        "enforced": plan.enforced(),
        "limits": limits,
        "env_hints": [f"{h.name}={h.value}" for h in hints or []],
        "profile": spec.profile,
    }


def describe_spec(
    spec: ViewSpec,
    caps: Capabilities,
    method: str,
    table: CpuidTable,
    with_hints: bool,
    xcr0_only: bool = False,
) -> dict[str, Any]:
    """describe_plan, also when no mechanism can present the view here."""
    try:
        plan = plan_for(spec, caps, method, False, xcr0_only)
    except UnsupportedError as err:
        view = CpuidView.build(
            spec.mask, caps.xcr0, False, spec.extra_hidden, spec.added, spec.identity
        )
        described = describe_plan(Plan(spec.mask, False, False, False, view), spec, table)
        described.update(mechanism="unavailable", how=str(err))
        return described
    hints = env_hints(plan) if with_hints or plan.env_only else []
    return describe_plan(plan, spec, table, hints)
