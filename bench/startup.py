#!/usr/bin/env python3
"""Start-up of xcr0run against bare Python of the same interpreter, as a table.

    python3 bench/startup.py [--runs N] [--python VENV/bin/python]

With --python, that interpreter's installed xcr0run is timed (byte-compiled at install,
as users run it): the runs start in /, since `python -m` puts the current directory
first on sys.path, and from the checkout's root that would time the checkout instead.
Without --python, this checkout's (compiled at every start when PYTHONDONTWRITEBYTECODE
is set, which inflates its rows).

Rows: `python -c pass`; xcr0run with nothing to trap or audit (it execs the program
directly); xcr0run with the tracing helper (`--audit`, which needs no CPUID faulting);
with --python, the same two through the installed `xcr0run` command beside it (the C
entry, or pip's console script where the install had no compiler), whose difference
from the `-m` rows is the command's own cost. Each runs /bin/true N times; min and
median wall times, and the difference of the mins from bare Python (the issue's target
is at most +40 ms)."""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--python", help="an interpreter with xcr0run installed")
    args = parser.parse_args()
    runs, python = args.runs, args.python or sys.executable
    env = dict(os.environ) if args.python else dict(os.environ, PYTHONPATH=str(ROOT))
    cwd = "/" if args.python else None
    xcr0run = [python, "-m", "xcr0run", "-q", "-m", "host"]
    rows = {
        "python -c pass": [python, "-c", "pass"],
        "xcr0run -q -m host -- /bin/true (exec)": [*xcr0run, "--", "/bin/true"],
        "xcr0run -q -m host --audit -- /bin/true (helper)": [
            *xcr0run,
            "--audit",
            "--",
            "/bin/true",
        ],
    }
    command = Path(python).parent / "xcr0run"
    if args.python and command.exists():
        kind = "C entry" if command.read_bytes()[:4] == b"\x7fELF" else "console script"
        installed = [str(command), "-q", "-m", "host"]
        rows[f"installed xcr0run ({kind}) -q -m host -- /bin/true"] = [
            *installed,
            "--",
            "/bin/true",
        ]
        rows[f"installed xcr0run ({kind}) -q -m host --audit -- /bin/true"] = [
            *installed,
            "--audit",
            "--",
            "/bin/true",
        ]
    base = None
    print(f"| start-up, {runs} runs | min [ms] | median [ms] | min - bare Python [ms] |")
    print("|---|---|---|---|")
    for name, argv in rows.items():
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run(argv, env=env, cwd=cwd, check=True)
            times.append((time.perf_counter() - start) * 1000)
        low = min(times)
        base = low if base is None else base
        print(f"| {name} | {low:.1f} | {statistics.median(times):.1f} | {low - base:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
