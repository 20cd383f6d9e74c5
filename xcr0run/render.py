"""Presentation: the --show tables (rich, imported lazily), JSON, and the start-up
banner (plain text, so the launch path never imports rich).
"""

from __future__ import annotations

from typing import IO, Any

from xcr0run import PROG
from xcr0run.inspect import ShowReport
from xcr0run.masks import format_mask


def to_json(data: Any) -> str:
    import json

    return json.dumps(data, indent=2, sort_keys=False)


def banner(plan: dict[str, Any], host_xcr0: int) -> str:
    """The block printed on stderr before the program starts."""
    decoded = format_mask(int(plan["xcr0"], 16))
    lines = [
        f"{PROG}: {plan['view']} -> XCR0 {plan['xcr0']} ({decoded}), host {host_xcr0:#x}",
        f"{PROG}: {plan['mechanism']}: {plan['how']}",
    ]
    hidden = plan["hidden_features"]
    if hidden:
        shown = " ".join(hidden[:12]) + (f" (+{len(hidden) - 12} more)" if len(hidden) > 12 else "")
        lines.append(f"{PROG}: hidden: {shown}")
    if plan.get("added_features"):
        lines.append(
            f"{PROG}: shown although this CPU lacks them: {' '.join(plan['added_features'])}"
        )
    if plan.get("env_hints"):
        lines.append(f"{PROG}: env: {' '.join(plan['env_hints'])}")
    lines.extend(f"{PROG}: enforced: {line}" for line in plan["enforced"])
    lines.extend(f"{PROG}: not hidden: {line}" for line in plan["limits"])
    return "\n".join(lines)


def _yes(value: bool | None) -> str:
    return "—" if value is None else ("yes" if value else "no")


def show(report: ShowReport, out: IO[str]) -> None:
    """Human --show output: XCR0 decoded, sizes, kernel state, and an optional plan."""
    from rich.console import Console
    from rich.table import Table

    # Pipes get a fixed width wide enough for the table (rich's default is 80).
    width = None if out.isatty() else 100
    console = Console(file=out, highlight=False, soft_wrap=False, width=width)
    data = report.to_json()
    console.print(f"[bold]XCR0[/bold] {data['xcr0']}  ({format_mask(report.xcr0)})")
    if data["xinuse"] is not None:
        console.print(f"[bold]XINUSE[/bold] {data['xinuse']}  (components in use by this thread)")
    table = Table(title=None, box=None, pad_edge=False, header_style="bold")
    for column, justify in (
        ("bit", "right"),
        ("name", "left"),
        ("scope", "left"),
        ("supported", "left"),
        ("enabled", "left"),
        ("in use", "left"),
        ("size", "right"),
        ("offset", "right"),
        ("align64", "left"),
        ("xfd", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in report.components:
        if row.scope == "supervisor" and not row.supported:
            continue  # never in XCR0 and absent here: noise
        if not row.supported and not row.enabled:
            style = "dim"
        else:
            style = "" if row.enabled or row.scope == "supervisor" else "yellow"
        table.add_row(
            str(row.number),
            row.name,
            row.scope,
            _yes(row.supported),
            _yes(row.enabled),
            _yes(row.in_use),
            str(row.size) if row.supported else "",
            "" if row.offset is None or not row.supported else str(row.offset),
            _yes(row.align64) if row.supported else "",
            _yes(row.xfd) if row.supported else "",
            style=style,
        )
    console.print(table)
    sizes = data["xsave_size"]
    console.print(
        f"[bold]XSAVE area[/bold] {sizes['enabled']} bytes for XCR0, {sizes['supported']} for "
        f"every supported component, {sizes['compacted']} compacted (XSAVES)"
    )
    kernel = data["kernel"]
    console.print(
        f"[bold]Kernel[/bold] XSAVE features supported {kernel['xcomp_supported']}, "
        f"permitted {kernel['xcomp_permitted']}; AMX "
        + (
            ("permitted" if kernel["amx_permitted"] else "supported, not permitted yet")
            if kernel["amx_supported"]
            else "not supported"
        )
    )
    fault = data["cpuid_faulting"]
    console.print(
        "[bold]CPUID faulting[/bold] "
        + ("available" if fault["supported"] else "unavailable")
        + (", enabled in this thread" if fault["enabled"] else "")
        + f" ({fault['detail']})"
    )
    setx = data["arch_set_xcr0"]
    console.print(
        f"[bold]ARCH_SET_XCR0[/bold] {'available' if setx['available'] else 'unavailable'}"
        f" ({setx['detail']})"
    )
    console.print(
        f"[bold]psABI level[/bold] {data['psabi_level'] or 'below x86-64-v1'}   "
        f"[bold]CPU[/bold] {data['cpu']['vendor']} {data['cpu']['brand']}"
    )
    plan = data["plan"]
    if plan:
        console.print()
        console.print(f"[bold]With {plan['view']}[/bold]")
        console.print(f"  XCR0 seen   {plan['xcr0']} ({format_mask(int(plan['xcr0'], 16))})")
        console.print(f"  mechanism   {plan['mechanism']}: {plan['how']}")
        console.print(f"  psABI level {plan['psabi_level'] or 'below x86-64-v1'}")
        hidden = plan["hidden_features"]
        console.print(f"  hidden      {' '.join(hidden) if hidden else 'nothing'}")
        if plan.get("profile"):
            prof = plan["profile"]
            console.print(f"  profile     {prof['name']} ({prof['source']})")
            console.print(f"  it lacks    {' '.join(prof['lacks']) or 'nothing this CPU has'}")
            console.print(f"  it adds     {' '.join(prof['extra']) or 'nothing'}")
        for hint in plan.get("env_hints", []):
            console.print(f"  env         {hint}")
        for line in plan["enforced"]:
            console.print(f"  enforced    {line}")
        for line in plan["limits"]:
            console.print(f"  not hidden  {line}")


def show_process(data: dict[str, Any], out: IO[str]) -> None:
    """Human --show -p output: one line per thread."""
    from rich.console import Console
    from rich.table import Table

    width = None if out.isatty() else 100
    console = Console(file=out, highlight=False, soft_wrap=False, width=width)
    under = "  [bold]under xcr0run[/bold]" if data["under_xcr0run"] else ""
    tracer = f", traced by pid {data['tracer']}" if data["tracer"] else ""
    console.print(f"[bold]pid {data['pid']}[/bold] {data['comm']} ({data['exe']}{tracer}){under}")
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in ("tid", "comm", "XCR0", "in use"):
        table.add_column(column)
    for t in data["threads"]:
        if t["error"]:
            table.add_row(str(t["tid"]), t["comm"], f"unreadable: {t['error']}", "")
        else:
            table.add_row(
                str(t["tid"]),
                t["comm"],
                f"{t['xcr0']} ({t['xcr0_decoded']})",
                f"{t['in_use']} ({t['in_use_decoded'] or 'none'})",
            )
    console.print(table)
