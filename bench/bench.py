#!/usr/bin/env python3
"""xcr0run benchmarks, in one run, printed as a table.

    python3 bench/bench.py [--quick] [--markdown FILE] [--guest]

Workloads: the cost of one emulated CPUID; start-up on /bin/true and `python3 -c pass`;
a shell loop starting 200 processes; a CPU-bound program. Each runs natively, under
xcr0run, under a minimal C ptrace tracer doing the compiled core's work with the same
system calls and following every process (bench/floor_tracer.c, the floor), under the
compiled core driven by tests/core_driver.py, under qemu-user (`qemu-x86_64 -cpu max`,
installed with apt-get if missing) and under valgrind (`--tool=none`); the one-CPUID row
also has a program answering its own traps in a SIGSEGV handler (bench/sigsegv_cpuid.c:
the limit for any design that keeps ptrace out of the trap). Times are medians of
several runs; ratios are against native and taken within this one run.

CPUID faulting is needed for xcr0run and the floor; without it those cells read n/a
and --guest runs the whole script inside the TCG guest of tests/guest instead.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))


# The in-process handler column is a program of its own, not a prefix: per-trap row only.
IN_PROCESS = "in-process"


def sh(cmd: Sequence[str], **kw: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, **kw)  # type: ignore[call-overload]


def build(out: Path) -> dict[str, str]:
    bins = {}
    for name in ("cpuid_loop", "cpu_bound", "floor_tracer", "sigsegv_cpuid"):
        target = out / name
        sh(["gcc", "-O2", "-o", str(target), str(HERE / f"{name}.c")], check=True)
        bins[name] = str(target)
    # The compiled core, with setup.py's flags, for the core column (tests/core_driver.py).
    flags = runpy.run_path(str(ROOT / "setup.py"), run_name="bench")["CORE"].extra_compile_args
    core = out / "libxcr0run_core.so"
    sh(["gcc", *flags, "-fPIC", "-shared", "-o", str(core), str(ROOT / "xcr0run" / "_core.c")])
    bins["core"] = str(core)
    return bins


def ensure_qemu_user() -> str | None:
    path = shutil.which("qemu-x86_64")
    if path is None and os.geteuid() == 0 and shutil.which("apt-get"):
        sh(["apt-get", "update", "-qq"])
        sh(["apt-get", "install", "-y", "-qq", "qemu-user"])
        path = shutil.which("qemu-x86_64")
    return path


def wall(cmd: Sequence[str], runs: int) -> float | None:
    """Median wall time in seconds, or None if the command fails."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        result = sh(cmd)
        times.append(time.perf_counter() - start)
        if result.returncode != 0:
            return None
    return statistics.median(times)


def per_cpuid(cmd: Sequence[str], runs: int) -> float | None:
    """Median ns per CPUID as cpuid_loop reports it."""
    values = []
    for _ in range(runs):
        result = sh(cmd)
        if result.returncode != 0:
            return None
        values.append(float(result.stdout.split()[1]))
    return statistics.median(values)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--markdown", metavar="FILE", help="also write the table as Markdown")
    parser.add_argument("--guest", action="store_true", help="run inside the TCG guest")
    parser.add_argument("--runners", help="comma-separated subset of the columns (default: all)")
    parser.add_argument(
        "--cpu-iterations",
        type=int,
        default=2_000_000_000,
        help="size of the CPU-bound program (default: about 3 s natively)",
    )
    args = parser.parse_args()
    if args.guest:
        from tests.guest.run_in_guest import run_in_guest

        argv = [sys.executable, str(HERE / "bench.py")] + (["--quick"] if args.quick else [])
        if args.runners:
            argv += ["--runners", args.runners]
        argv += ["--cpu-iterations", str(args.cpu_iterations)]
        if args.markdown:
            argv += ["--markdown", str(Path(args.markdown).resolve())]
        result = run_in_guest(
            argv,
            cwd=str(ROOT),
            timeout=3600,
            writable=[str(Path(args.markdown).parent)] if args.markdown else (),
        )
        sys.stdout.write(result.stdout)
        sys.stderr.write(result.stderr)
        return result.returncode

    from xcr0run import host

    runs = 3 if args.quick else 7
    loops = 2000 if args.quick else 10000
    faulting = host.cpuid_faulting()
    xcr0 = host.xcr0()
    mask = "no-avx512" if xcr0 & 0xE0 else "x87,sse" if xcr0 & 0x4 else "host"
    tmp = Path(tempfile.mkdtemp(prefix="xcr0run-bench-"))
    bins = build(tmp)
    qemu = ensure_qemu_user()
    valgrind = shutil.which("valgrind")
    py = sys.executable
    xcr0run = [py, "-m", "xcr0run", "-q", "--mask", mask, "--"]
    floor = [bins["floor_tracer"]]
    os.environ["XCR0RUN_CORE_LIBRARY"] = bins["core"]
    core = [py, str(ROOT / "tests" / "core_driver.py"), "--engine", "core", "--mask", mask]
    core += ["--report", os.devnull, "--"]
    loop200 = ["sh", "-c", "i=0; while [ $i -lt 200 ]; do /bin/true; i=$((i+1)); done"]

    runners: dict[str, list[str] | None] = {
        "native": [],
        "xcr0run": xcr0run if faulting.supported else None,
        "xcr0run --no-audit": [*xcr0run[:-1], "--no-audit", "--"] if faulting.supported else None,
        "C floor": floor if faulting.supported else None,
        # The compiled core, driven by a small script until the supervisor uses it.
        "core": core if faulting.supported and os.path.exists(bins["core"]) else None,
        # The program answers its own trapped CPUIDs: the limit without ptrace.
        "in-process handler": [IN_PROCESS] if faulting.supported else None,
        # Following the tree (ptrace, audit) without trapping CPUID: runs anywhere.
        "xcr0run follow-only": [py, "-m", "xcr0run", "-q", "--mask", "host", "--audit", "--"],
        "core follow-only": [*core[:-1], "--no-trap", "--"],
        "qemu-user": [qemu, "-cpu", "max"] if qemu else None,
        "valgrind": [valgrind, "-q", "--tool=none"] if valgrind else None,
    }
    if args.runners:
        keep = [r.strip() for r in args.runners.split(",")]
        runners = {name: runners[name] for name in keep}
    rows: list[tuple[str, str, dict[str, float | None]]] = []

    def row(name: str, unit: str, measure) -> None:  # type: ignore[no-untyped-def]
        cells = {}
        for runner, prefix in runners.items():
            cells[runner] = None if prefix is None else measure(prefix)
        rows.append((name, unit, cells))
        # Each row as it is measured: a run cut short (a slow guest) still leaves figures.
        native = cells.get("native")
        done = ", ".join(f"{r} {_cell(v, native)}" for r, v in cells.items())
        print(f"  measured {name} [{unit}]: {done}", file=sys.stderr)

    def one_cpuid(p: list[str]) -> float | None:
        if p == [IN_PROCESS]:
            return _us(per_cpuid([bins["sigsegv_cpuid"], str(loops)], runs))
        return _us(per_cpuid([*p, bins["cpuid_loop"], str(loops)], runs))

    def timed(p: list[str], argv: list[str], repeat: int) -> float | None:
        return None if p == [IN_PROCESS] else _ms(wall([*p, *argv], repeat))

    row("one CPUID (leaf 7)", "µs", one_cpuid)
    row("start /bin/true", "ms", lambda p: timed(p, ["/bin/true"], runs))
    row("start python3 -c pass", "ms", lambda p: timed(p, [py, "-c", "pass"], runs))
    row("200 processes (sh loop)", "ms", lambda p: timed(p, loop200, max(3, runs // 2)))
    work = [bins["cpu_bound"], str(args.cpu_iterations)]
    row("CPU-bound program", "ms", lambda p: timed(p, work, max(3, runs // 2)))
    bare_python = _ms(wall([py, "-c", "pass"], runs))

    print(render(rows, list(runners), mask, faulting.detail, bare_python))
    if args.markdown:
        Path(args.markdown).write_text(
            markdown(rows, list(runners), mask, faulting.detail, bare_python)
        )
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _us(seconds_or_ns: float | None) -> float | None:
    return None if seconds_or_ns is None else seconds_or_ns / 1000


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _cell(value: float | None, native: float | None) -> str:
    if value is None:
        return "n/a"
    ratio = f" ({value / native:.2f}x)" if native else ""
    return f"{value:.1f}{ratio}"


def _context(mask: str, faulting: str, bare_python: float | None) -> list[str]:
    return [
        f"machine: {os.uname().release}, {os.cpu_count()} CPUs; mask {mask}; CPUID faulting: "
        f"{faulting}",
        f"bare `python3 -c pass`: {bare_python:.1f} ms" if bare_python else "",
    ]


def render(rows, runners, mask, faulting, bare_python) -> str:  # type: ignore[no-untyped-def]
    header = ["workload", *runners]
    lines = [header]
    for name, unit, cells in rows:
        native = cells.get("native")
        lines.append([f"{name} [{unit}]", *(_cell(cells[r], native) for r in runners)])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
    return "\n".join([*_context(mask, faulting, bare_python), "", *out])


def markdown(rows, runners, mask, faulting, bare_python) -> str:  # type: ignore[no-untyped-def]
    out = [f"| workload | {' | '.join(runners)} |", "|---" * (len(runners) + 1) + "|"]
    for name, unit, cells in rows:
        native = cells.get("native")
        out.append(
            f"| {name} [{unit}] | " + " | ".join(_cell(cells[r], native) for r in runners) + " |"
        )
    return "\n".join(
        [*(f"{line}  " for line in _context(mask, faulting, bare_python) if line), "", *out, ""]
    )


if __name__ == "__main__":
    sys.exit(main())
