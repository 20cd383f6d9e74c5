"""Choosing the mechanism. A kernel with ARCH_SET_XCR0 cannot exist on this machine, so
its capabilities are faked here, under a name that says so."""

from __future__ import annotations

import pytest

from xcr0run.errors import UnsupportedError
from xcr0run.plan import Capabilities, Method, make_plan

HOST = 0x602E7


def caps(
    *, faulting: bool, set_xcr0: bool, amx: bool = True, limit: int = (1 << 64) - 1
) -> Capabilities:
    return Capabilities(
        xcr0=HOST,
        faulting=faulting,
        faulting_detail="ARCH_SET_CPUID available" if faulting else "ARCH_SET_CPUID: ENODEV",
        set_xcr0=set_xcr0,
        set_xcr0_detail="sets XCR0" if set_xcr0 else "no ARCH_SET_XCR0 at code 0x1021",
        amx_supported=amx,
        set_xcr0_limit=limit,
    )


# A fake: what a kernel carrying the out-of-tree ARCH_SET_XCR0 patch would report.
FakeKernelWithSetXcr0 = caps(faulting=True, set_xcr0=True)
FakeKernelWithSetXcr0NoFaulting = caps(faulting=False, set_xcr0=True)
MAINLINE = caps(faulting=True, set_xcr0=False)
NOTHING = caps(faulting=False, set_xcr0=False)


def test_auto_prefers_the_kernel_and_keeps_cpuid_consistent() -> None:
    plan = make_plan(0x7, FakeKernelWithSetXcr0)
    assert plan.set_xcr0 and plan.trap_cpuid
    assert plan.mechanism == "kernel+cpuid"
    assert plan.view.xcr0_changed
    assert plan.view.limits() == []  # XCR0, XSAVE and leaf 0xD really follow the mask


def test_auto_with_kernel_alone_needs_no_supervisor() -> None:
    plan = make_plan(0x7, FakeKernelWithSetXcr0NoFaulting)
    assert plan.set_xcr0 and not plan.trap_cpuid
    assert "CPUID unmasked" in plan.describe()


def test_auto_on_mainline_uses_cpuid_faulting() -> None:
    plan = make_plan(0x7, MAINLINE)
    assert (plan.set_xcr0, plan.trap_cpuid) == (False, True)
    assert not plan.view.xcr0_changed
    assert plan.describe() == f"hardware XCR0 unchanged ({HOST:#x}), CPUID view masked"


def test_forcing_cpuid_on_a_patched_kernel_leaves_xcr0_alone() -> None:
    plan = make_plan(0x7, FakeKernelWithSetXcr0, Method.CPUID)
    assert (plan.set_xcr0, plan.trap_cpuid) == (False, True)


def test_forcing_a_missing_mechanism_fails_with_the_reason() -> None:
    with pytest.raises(UnsupportedError, match="--method kernel: no ARCH_SET_XCR0"):
        make_plan(0x7, MAINLINE, Method.KERNEL)
    with pytest.raises(UnsupportedError, match="--method cpuid: no CPUID faulting"):
        make_plan(0x7, FakeKernelWithSetXcr0NoFaulting, Method.CPUID)


def test_neither_mechanism_refuses_instead_of_running_unmasked() -> None:
    with pytest.raises(UnsupportedError, match="cannot present this mask here"):
        make_plan(0x7, NOTHING)


def test_the_host_mask_needs_no_mechanism() -> None:
    plan = make_plan(HOST, NOTHING)
    assert plan.mechanism == "none" and not plan.deny_amx


def test_hiding_amx_denies_the_permission_where_the_kernel_has_amx() -> None:
    assert make_plan(0x2E7, MAINLINE).deny_amx
    assert "SIGILL" in make_plan(0x2E7, MAINLINE).enforced()[0]
    assert not make_plan(0x602E7 & ~0xE0, MAINLINE).deny_amx
    assert not make_plan(0x2E7, caps(faulting=True, set_xcr0=False, amx=False)).deny_amx


def test_xcr0_only_changes_xcr0_and_leaves_cpuid_alone() -> None:
    plan = make_plan(0x7, FakeKernelWithSetXcr0, xcr0_only=True)
    assert plan.set_xcr0 and not plan.trap_cpuid  # faulting exists but is not used
    assert plan.mechanism == "kernel"
    assert plan.view.hidden == frozenset() and plan.view.limits() == []
    assert "enabled in CPUID, not by the OS" in plan.describe()


def test_xcr0_only_needs_the_kernel_path() -> None:
    with pytest.raises(UnsupportedError, match="--xcr0-only needs ARCH_SET_XCR0: no ARCH_SET"):
        make_plan(0x7, MAINLINE, xcr0_only=True)
    with pytest.raises(UnsupportedError, match="not --method cpuid"):
        make_plan(0x7, FakeKernelWithSetXcr0, Method.CPUID, xcr0_only=True)
    with pytest.raises(UnsupportedError, match="--level and --profile change CPUID"):
        make_plan(0x7, FakeKernelWithSetXcr0, extra_hidden=["popcnt"], xcr0_only=True)


def test_the_rfc_patch_keeps_amx_out_of_reach_ours_does_not() -> None:
    rfc = caps(faulting=False, set_xcr0=True, limit=0x3FF)
    with pytest.raises(UnsupportedError, match="refuses components above bit 9"):
        make_plan(0x60007, rfc, Method.KERNEL)
    assert make_plan(0x60007, FakeKernelWithSetXcr0NoFaulting, Method.KERNEL).set_xcr0


def test_a_refused_set_xcr0_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's EPERM (state not initial) reaches the user as one sentence, before
    anything is executed."""
    import errno

    from xcr0run import _native, launcher

    plan = make_plan(0x7, caps(faulting=False, set_xcr0=True, amx=False), Method.KERNEL)
    refused = (_native.XCR0_NOT_SET, -errno.EPERM)
    monkeypatch.setattr(_native, "exec_with_xcr0", lambda *a: refused)
    with pytest.raises(UnsupportedError) as err:
        launcher.exec_direct("/bin/true", ["true"], plan, 0x1014, {})
    assert str(err.value) == (
        "ARCH_SET_XCR0(0x7) refused: a component being turned off is in use "
        "(not in its initial state)"
    )
