"""Presentation: the --show tables (rich, imported lazily), JSON, and the start-up
banner (plain text, so the launch path never imports rich).
"""

from __future__ import annotations

import os

from xcr0run import PROG
from xcr0run.masks import format_mask

TYPE_CHECKING = False  # the banner is on the launch path: typing costs start-up time
if TYPE_CHECKING:
    from typing import IO, Any

    from rich.console import Console, RenderableType

    from xcr0run.xstate_report import XStateReport


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


def _without_trailing_blanks(text: str) -> str:
    import re  # with rich, never for the banner

    # Trailing blanks of a line, and any style codes among them (rich pads table cells).
    trailing = re.compile(r"(?:[ \t]|\x1b\[[0-9;]*m)+$")
    return "\n".join(
        trailing.sub(lambda m: m.group(0).replace(" ", "").replace("\t", ""), line)
        for line in text.split("\n")
    )


class _Screen:
    """A rich console for `out`: the terminal's width (or $COLUMNS); 100 columns for a
    pipe, wide enough for the table. Lines are written without trailing blanks."""

    def __init__(self, out: IO[str]) -> None:
        from rich.console import Console

        self.out = out
        width = None if out.isatty() or os.environ.get("COLUMNS") else 100
        self.console = Console(file=out, highlight=False, soft_wrap=False, width=width)

    def __enter__(self) -> Console:
        self._capture = self.console.capture()
        self._capture.__enter__()
        return self.console

    def __exit__(self, *exc: object) -> None:
        self._capture.__exit__(None, None, None)
        self.out.write(_without_trailing_blanks(self._capture.get()))
        self.out.flush()


def _facts(rows: list[tuple[str, str]], indent: int = 0) -> RenderableType:
    """Label and text in two columns: text that wraps stays under its column."""
    from rich.padding import Padding
    from rich.table import Table

    grid = Table.grid(padding=(0, 1, 0, 0))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    for label, text in rows:
        grid.add_row(label, text)
    return Padding(grid, (0, 0, 0, indent)) if indent else grid


def show(report: XStateReport, out: IO[str]) -> None:
    """Human --show output: XCR0 decoded, sizes, kernel state, and an optional plan."""
    from rich.markup import escape
    from rich.table import Table

    data = report.to_json()
    with _Screen(out) as console:
        head = [("XCR0", f"{data['xcr0']}  ({format_mask(report.xcr0)})")]
        if data["xinuse"] is not None:
            head.append(("XINUSE", f"{data['xinuse']}  (components in use by this thread)"))
        console.print(_facts(head))
        # Two blanks between columns where they fit, one on a narrow terminal.
        gap = 2 if console.width >= 90 else 1
        table = Table(box=None, pad_edge=False, header_style="bold", padding=(0, gap, 0, 0))
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
            table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
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
        sizes, kernel = data["xsave_size"], data["kernel"]
        fault, setx = data["cpuid_faulting"], data["arch_set_xcr0"]
        amx = (
            ("permitted" if kernel["amx_permitted"] else "supported, not permitted yet")
            if kernel["amx_supported"]
            else "not supported"
        )
        console.print(
            _facts(
                [
                    (
                        "XSAVE area",
                        f"{sizes['enabled']} bytes for XCR0, {sizes['supported']} for every "
                        f"supported component, {sizes['compacted']} compacted (XSAVES)",
                    ),
                    (
                        "Kernel",
                        f"XSAVE features supported {kernel['xcomp_supported']}, permitted "
                        f"{kernel['xcomp_permitted']}; AMX {amx}",
                    ),
                    (
                        "CPUID faulting",
                        ("available" if fault["supported"] else "unavailable")
                        + (", enabled in this thread" if fault["enabled"] else "")
                        + f" ({escape(fault['detail'])})",
                    ),
                    (
                        "ARCH_SET_XCR0",
                        f"{'available' if setx['available'] else 'unavailable'}"
                        f" ({escape(setx['detail'])})",
                    ),
                    ("psABI level", data["psabi_level"] or "below x86-64-v1"),
                    ("Stop loop", escape(data["stop_loop"]["detail"])),
                    ("CPU", escape(f"{data['cpu']['vendor']} {data['cpu']['brand']}")),
                ]
            )
        )
        plan = data["plan"]
        if plan:
            console.print()
            console.print(f"[bold]With {escape(plan['view'])}[/bold]")
            console.print(_facts(_plan_rows(plan), indent=2))


def _plan_rows(plan: dict[str, Any]) -> list[tuple[str, str]]:
    from rich.markup import escape

    hidden = plan["hidden_features"]
    rows = [
        ("XCR0 seen", f"{plan['xcr0']} ({format_mask(int(plan['xcr0'], 16))})"),
        ("mechanism", escape(f"{plan['mechanism']}: {plan['how']}")),
        ("psABI level", plan["psabi_level"] or "below x86-64-v1"),
        ("hidden", " ".join(hidden) if hidden else "nothing"),
    ]
    if plan.get("profile"):
        prof = plan["profile"]
        rows += [
            ("profile", escape(f"{prof['name']} ({prof['source']})")),
            ("it lacks", " ".join(prof["lacks"]) or "nothing this CPU has"),
            ("it adds", " ".join(prof["extra"]) or "nothing"),
        ]
    rows += [("env", escape(hint)) for hint in plan.get("env_hints", [])]
    rows += [("enforced", escape(line)) for line in plan["enforced"]]
    rows += [("not hidden", escape(line)) for line in plan["limits"]]
    return rows


def show_process(data: dict[str, Any], out: IO[str]) -> None:
    """Human --show -p output: one line per thread."""
    from rich.markup import escape
    from rich.table import Table

    with _Screen(out) as console:
        under = "  [bold]under xcr0run[/bold]" if data["under_xcr0run"] else ""
        tracer = f", traced by pid {data['tracer']}" if data["tracer"] else ""
        console.print(
            f"[bold]pid {data['pid']}[/bold] {escape(data['comm'])} "
            f"({escape(data['exe'])}{tracer}){under}"
        )
        table = Table(box=None, pad_edge=False, header_style="bold")
        for column in ("tid", "comm", "XCR0", "in use"):
            table.add_column(column, overflow="fold")
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
