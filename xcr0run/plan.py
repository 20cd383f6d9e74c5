"""Deciding how to present a mask: which mechanism, what gets hidden, what gets enforced.
Pure: the facts about the host come in as arguments.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from xcr0run import xsave
from xcr0run.errors import UnsupportedError
from xcr0run.view import CpuidView


class Method(str, enum.Enum):
    AUTO = "auto"
    KERNEL = "kernel"  # ARCH_SET_XCR0 changes the hardware XCR0
    CPUID = "cpuid"  # CPUID faulting under ptrace; XCR0 unchanged


@dataclass(frozen=True)
class Capabilities:
    """What the host offers, as probed by host.py."""

    xcr0: int
    faulting: bool
    faulting_detail: str
    set_xcr0: bool
    set_xcr0_detail: str
    amx_supported: bool  # the kernel supports AMX tile data (ARCH_GET_XCOMP_SUPP bit 18)


@dataclass(frozen=True)
class Plan:
    mask: int
    set_xcr0: bool  # change the hardware XCR0 in the child (kernel mechanism)
    trap_cpuid: bool  # supervise with CPUID faulting
    deny_amx: bool  # make ARCH_REQ_XCOMP_PERM fail for the whole program tree
    view: CpuidView
    grant_amx: bool = False  # request AMX permission in every new program image

    @property
    def supervised(self) -> bool:
        return self.trap_cpuid or self.grant_amx

    @property
    def mechanism(self) -> str:
        parts = [name for name, on in (("kernel", self.set_xcr0), ("cpuid", self.trap_cpuid)) if on]
        return "+".join(parts) or "none"

    @property
    def hides_anything(self) -> bool:
        return bool(self.view.hidden) or self.mask != self.view.host_xcr0

    def describe(self) -> str:
        """How the mask is achieved, in one line."""
        if self.set_xcr0:
            how = f"hardware XCR0 set to {self.mask:#x} by the kernel (ARCH_SET_XCR0)"
            return how + (", CPUID view masked" if self.trap_cpuid else ", CPUID unmasked")
        if self.trap_cpuid:
            return f"hardware XCR0 unchanged ({self.view.host_xcr0:#x}), CPUID view masked"
        return "nothing to hide: the program runs as usual"

    def enforced(self) -> list[str]:
        if self.deny_amx:
            return ["AMX: permission requests (ARCH_REQ_XCOMP_PERM) fail, tile use raises SIGILL"]
        if self.grant_amx:
            return ["AMX: permission granted in every program image (--grant-amx)"]
        return []


def make_plan(
    mask: int,
    caps: Capabilities,
    method: Method = Method.AUTO,
    extra_hidden: Iterable[str] = (),
    grant_amx: bool = False,
) -> Plan:
    """Choose mechanisms for `mask`, or raise UnsupportedError saying what is missing."""
    extra = tuple(extra_hidden)
    amx = xsave.NAMES["amx"]
    deny_amx = caps.amx_supported and bool(caps.xcr0 & amx) and not mask & amx
    if grant_amx and not caps.amx_supported:
        raise UnsupportedError("--grant-amx: this CPU and kernel have no AMX")
    if grant_amx and not mask & amx:
        raise UnsupportedError("--grant-amx: the mask hides AMX")
    if mask == caps.xcr0 and not extra and method is Method.AUTO:
        return Plan(mask, False, False, False, CpuidView.build(mask, caps.xcr0), grant_amx)
    want_kernel = method in (Method.AUTO, Method.KERNEL) and mask != caps.xcr0
    if method is Method.KERNEL and not caps.set_xcr0:
        raise UnsupportedError(f"--method kernel: {caps.set_xcr0_detail}")
    if method is Method.CPUID and not caps.faulting:
        raise UnsupportedError(f"--method cpuid: no CPUID faulting ({caps.faulting_detail})")
    set_xcr0 = want_kernel and caps.set_xcr0
    trap = caps.faulting  # the kernel mechanism still wants CPUID to agree with XCR0
    if not set_xcr0 and not trap:
        raise UnsupportedError(
            "cannot present this mask here: no CPUID faulting "
            f"({caps.faulting_detail}) and {caps.set_xcr0_detail}"
        )
    view = CpuidView.build(mask, caps.xcr0, set_xcr0, extra)
    return Plan(mask, set_xcr0, trap, deny_amx, view, grant_amx)
