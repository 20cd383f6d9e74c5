"""Run one program under a stop loop and report what happened, as JSON:

    python tests/core_driver.py --engine core|python [--mask M] [--tables lazy|full]
        [--no-answer-flag] [--no-trap] [--call CODE:ARG:required|optional]...
        --report FILE -- PROGRAM ARGS...

`core` is the compiled core (xcr0run/_core.c) with the least Python around it: what the
supervisor will do once it is wired in, and the core column of bench/bench.py. `python`
is today's Python loop (xcr0run.supervisor.Supervisor), the reference the differential
tests compare the core with. The program's own output goes to this process's stdout;
the report (exit status, CPUID traps per (leaf, normalised sub-leaf), events, the core's
statistics) goes to FILE.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import errno
import json
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xcr0run import _native as n
from xcr0run import masks
from xcr0run.cpuid import ECX_IGNORED_LEAVES, PER_CPU_LEAVES, cache_key, read_table
from xcr0run.view import CpuidView

OPTIONS = (
    n.PTRACE_O_TRACEFORK
    | n.PTRACE_O_TRACEVFORK
    | n.PTRACE_O_TRACECLONE
    | n.PTRACE_O_TRACEEXEC
    | n.PTRACE_O_EXITKILL
)
STOP_SIGNALS = {signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU}


def start_stopped(argv: Sequence[str], wait: bool = True) -> int:
    """A child that stops itself, to be seized, then execs the program."""
    pid = os.fork()
    if pid == 0:
        try:
            os.kill(os.getpid(), signal.SIGSTOP)
            os.execvp(argv[0], list(argv))
        finally:
            os._exit(127)
    if wait:
        _, status = os.waitpid(pid, os.WUNTRACED)
        assert os.WIFSTOPPED(status)
    return pid


def on_cpu(cpu: int, leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        return n.cpuid(leaf, subleaf)
    finally:
        os.sched_setaffinity(0, before)


def proc_cpu(tid: int) -> int:
    with open(f"/proc/{tid}/stat", "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[36])


def counts_json(counts: dict[tuple[int, int], int]) -> dict[str, int]:
    merged: collections.Counter[tuple[int, int]] = collections.Counter()
    for (leaf, subleaf), traps in counts.items():
        merged[cache_key(leaf, subleaf)] += traps
    return {f"{leaf:#x}.{sub}": merged[leaf, sub] for leaf, sub in sorted(merged)}


def run_python(argv: Sequence[str], view: CpuidView, trap: bool) -> dict[str, Any]:
    from xcr0run.supervisor import Supervisor

    supervisor = Supervisor(view, trap_cpuid=trap, use_core=False)
    pid = start_stopped(argv)
    supervisor.seize(pid)
    os.kill(pid, signal.SIGCONT)
    outcome = supervisor.run()
    raw = {}
    for name, traps in outcome.leaves.items():
        leaf, _, sub = name.partition(".")
        raw[int(leaf, 16), int(sub)] = traps
    return {
        "exit_code": outcome.exit_code,
        "signal": outcome.signal,
        "leaves": counts_json(raw),
        "execs": outcome.execs,
        "processes": outcome.processes,
        "threads": outcome.threads,
    }


def fill_tables(core: Any, view: CpuidView) -> None:
    """Every leaf this CPU reports, answered as the view says; per-CPU leaves probed on
    each CPU this process may use."""
    table = read_table(n.cpuid)
    cpus = sorted(os.sched_getaffinity(0))
    per_cpu_keys = [k for k in table.entries if k[0] in PER_CPU_LEAVES]
    for (leaf, subleaf), regs in table.entries.items():
        if leaf not in PER_CPU_LEAVES:
            core.put_answer(leaf, subleaf, view.answer(leaf, subleaf, regs))
    for cpu in cpus:
        for leaf, subleaf in per_cpu_keys:
            regs = view.answer(leaf, subleaf, on_cpu(cpu, leaf, subleaf))
            core.put_cpu_answer(cpu, leaf, subleaf, regs)


def run_core(
    argv: Sequence[str],
    view: CpuidView,
    *,
    tables: str,
    answer_flag: bool,
    calls: Sequence[tuple[int, int, bool]],
) -> dict[str, Any]:
    from xcr0run import _core

    cpus = os.sched_getaffinity(0)
    core = _core.Core(max(cpus) + 1, default_flags=_core.ANSWER if answer_flag else 0)
    core.set_options(OPTIONS)
    core.set_ignores_ecx(ECX_IGNORED_LEAVES)
    for code, arg, required in calls:
        core.add_exec_call(code, arg, required)
    if tables == "full":
        fill_tables(core, view)
    pid = start_stopped(argv)
    core.seize(pid, _core.ANSWER if answer_flag else 0)
    os.kill(pid, signal.SIGCONT)
    report: dict[str, Any] = {"exit_code": None, "signal": None, "arm_failed": None}
    returns: collections.Counter[str] = collections.Counter()
    events: list[_core.Event] = []
    misses: set[str] = set()  # traps the core sent up for want of an answer
    while True:
        stop = core.run()
        reason = stop.reason
        returns[_core.Reason.name_of(reason)] += 1
        events += core.take_events()
        if reason == _core.Reason.NO_TRACEES:
            break
        tid, status = stop.tid, stop.status
        try:
            if reason == _core.Reason.STATUS:
                if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                    if tid == pid:
                        report["exit_code"] = os.waitstatus_to_exitcode(status)
                        if os.WIFSIGNALED(status):
                            report["exit_code"] = None
                            report["signal"] = os.WTERMSIG(status)
                    continue
                sig, event = os.WSTOPSIG(status), status >> 16
                if event == n.PTRACE_EVENT_STOP and sig in STOP_SIGNALS:
                    n.ptrace_listen(tid)  # a group-stop: stays stopped until SIGCONT
                else:
                    n.ptrace_cont(tid, 0 if event else sig)
            elif reason == _core.Reason.CPUID:
                leaf, subleaf = stop.leaf, stop.subleaf
                misses.add(f"{leaf:#x}.{subleaf}")
                if leaf in PER_CPU_LEAVES:
                    cpu = stop.cpu if stop.cpu >= 0 else proc_cpu(tid)
                    regs = view.answer(leaf, subleaf, on_cpu(cpu, leaf, subleaf))
                    if answer_flag:
                        core.put_cpu_answer(cpu, leaf, subleaf, regs)
                else:
                    regs = view.answer(leaf, subleaf, n.cpuid(leaf, subleaf))
                    if answer_flag:
                        core.put_answer(leaf, subleaf, regs)  # the next trap is the core's
                core.complete_cpuid(tid, regs)
            elif reason == _core.Reason.EXEC:
                n.ptrace_cont(tid)
            elif reason == _core.Reason.ARM_FAILED:
                report["arm_failed"] = {"code": stop.code, "result": stop.result}
                os.kill(tid, signal.SIGKILL)
            elif reason == _core.Reason.ERROR:
                raise n.NativeError(stop.err, "xc_run", tid)
        except n.NativeError as err:
            if err.errno != errno.ESRCH:
                raise
    kinds = collections.Counter(_core.EventKind.name_of(e.kind) for e in events)
    report.update(
        leaves=counts_json(core.counts()),
        events=dict(kinds),
        failed_calls=[
            [e.tid, e.code, e.result] for e in events if e.kind == _core.EventKind.CALL_FAILED
        ],
        execs=kinds["EXEC"],
        processes=1 + kinds["FORK"] + kinds["VFORK"] + kinds["CLONE_PROCESS"],
        threads=1 + kinds["CLONE_THREAD"],
        stats=core.stats(),
        returns=dict(returns),
        misses=sorted(misses),
    )
    core.close()
    return report


def parse_call(text: str) -> tuple[int, int, bool]:
    code, arg, kind = text.split(":")
    return int(code, 0), int(arg, 0), kind == "required"


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("core", "python"), required=True)
    parser.add_argument("--mask", default="host")
    parser.add_argument("--tables", choices=("lazy", "full"), default="lazy")
    parser.add_argument("--no-answer-flag", action="store_true")
    parser.add_argument("--no-trap", action="store_true", help="follow without faulting")
    parser.add_argument("--call", action="append", type=parse_call, default=None)
    parser.add_argument("--report", required=True)
    parser.add_argument("argv", nargs="+")
    opts = parser.parse_args(args)
    xcr0 = n.xgetbv(0)
    view = CpuidView.build(masks.parse_mask(opts.mask, xcr0), xcr0)
    calls = opts.call if opts.call is not None else [(n.ARCH_SET_CPUID, 0, True)]
    if opts.no_trap:
        calls = opts.call or []
    if opts.engine == "python":
        report = run_python(opts.argv, view, trap=not opts.no_trap)
    else:
        report = run_core(
            opts.argv,
            view,
            tables=opts.tables,
            answer_flag=not opts.no_answer_flag,
            calls=calls,
        )
    with contextlib.suppress(BrokenPipeError):
        sys.stdout.flush()
    Path(opts.report).write_text(json.dumps(report, indent=1, sort_keys=True))
    code = report["exit_code"]
    return code if isinstance(code, int) else 128 + (report["signal"] or 0)


if __name__ == "__main__":
    sys.exit(main())
