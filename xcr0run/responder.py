"""CpuidResponder: the one place where a trapped CPUID's answer is decided.

The answer is the host's CPUID for the leaf, passed through the CpuidView. Answers are
cached by (leaf, normalised sub-leaf): ECX is dropped for leaves whose hardware ignores
it (cpuid.cache_key), so glibc's garbage ECX on leaves 0 and 1 does not miss. Leaves
whose answer can depend on the CPU asking (APIC and topology IDs) are probed once on
every CPU the tracer may use; where all CPUs agree (leaf 4 on most machines, anything on
one CPU) the answer is flat and nobody needs to know where the thread ran.

The compiled core gets the same answers handed down (`on_answer`), so both stop loops
answer alike. Trap counts kept here are the traps Python answered itself.
"""

from __future__ import annotations

import os

from xcr0run import _native as n
from xcr0run.cpuid import ECX_IGNORED_LEAVES, PER_CPU_LEAVES, Registers, cache_key

TYPE_CHECKING = False  # typing and collections cost the helper's start-up
if TYPE_CHECKING:
    from collections.abc import Callable

    from xcr0run.view import CpuidView

Key = tuple[int, int]
if TYPE_CHECKING:
    # A new answer: (leaf, normalised sub-leaf), registers on every CPU or per CPU.
    AnswerListener = Callable[[Key, "Registers | dict[int, Registers]"], None]


class CpuidResponder:
    def __init__(self, view: CpuidView, on_answer: AnswerListener | None = None) -> None:
        self.view = view
        self._flat: dict[Key, Registers] = {}
        self._per_cpu: dict[Key, dict[int, Registers]] = {}
        self._on_answer = on_answer
        self.counts: dict[Key, int] = {}

    ignores_ecx = ECX_IGNORED_LEAVES

    def answer(self, leaf: int, subleaf: int, cpu_of: Callable[[], int]) -> Registers:
        """The view's answer to (leaf, subleaf); `cpu_of` says where the asking thread
        ran (-1: unknown) and is called only for a leaf whose answer differs by CPU."""
        k = cache_key(leaf, subleaf)
        regs = self._flat.get(k)
        if regs is not None:
            return regs
        per_cpu = self._per_cpu.get(k)
        if per_cpu is None:
            per_cpu = self._learn(k)
            if per_cpu is None:
                return self._flat[k]
        cpu = cpu_of()
        regs = per_cpu.get(cpu)
        if regs is None:  # a CPU we may not run on: answer from where we are
            regs = self._ask(k, -1)
        return regs

    def count(self, leaf: int, subleaf: int) -> None:
        k = cache_key(leaf, subleaf)
        self.counts[k] = self.counts.get(k, 0) + 1

    def _learn(self, k: Key) -> dict[int, Registers] | None:
        """Compute and remember k's answer: flat (None returned) or per CPU."""
        if k[0] in PER_CPU_LEAVES:
            cpus = sorted(os.sched_getaffinity(0))
            per_cpu = {cpu: self._ask(k, cpu) for cpu in cpus}
            if len(set(per_cpu.values())) > 1:
                self._per_cpu[k] = per_cpu
                if self._on_answer is not None:
                    self._on_answer(k, per_cpu)
                return per_cpu
            regs = per_cpu[cpus[0]]
        else:
            regs = self._ask(k, -1)
        self._flat[k] = regs
        if self._on_answer is not None:
            self._on_answer(k, regs)
        return None

    def _ask(self, k: Key, cpu: int) -> Registers:
        return self.view.answer(k[0], k[1], _on_cpu(cpu, lambda: n.cpuid(*k)))


def _on_cpu(cpu: int, run: Callable[[], Registers]) -> Registers:
    """Run `run` on `cpu` (the answer names that CPU's APIC ID); -1 or a CPU we may not
    use: where we are."""
    if cpu < 0:
        return run()
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {cpu})
    except OSError:
        return run()
    try:
        return run()
    finally:
        os.sched_setaffinity(0, before)
