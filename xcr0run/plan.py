"""Deciding how to present a mask: which mechanism, what gets hidden, what gets enforced.
Pure: the facts about the host come in as arguments.
"""

from __future__ import annotations

from xcr0run import xsave
from xcr0run.errors import UnsupportedError
from xcr0run.view import CpuidView, level_restriction

TYPE_CHECKING = False  # typing's import costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Iterable

    from xcr0run.cpuid import CpuidTable, Registers
    from xcr0run.profiles import CpuidProfile

# The classes here are plain, not dataclasses: a plan is made on the launch path, and
# importing dataclasses (with inspect) would cost more than making it.

# The components the 2020 ARCH_SET_XCR0 patch accepts: bits 0-9, so no AMX (17-18).
PATCH_XCR0_BITS = 0x3FF


class Method:
    """--method's values (strings, not an enum: see ExitStatus in status.py)."""

    AUTO = "auto"
    KERNEL = "kernel"  # ARCH_SET_XCR0 changes the hardware XCR0
    CPUID = "cpuid"  # CPUID faulting under ptrace; XCR0 unchanged
    ENV = "env"  # library knobs only (--env-hints), where nothing else is available
    ALL = (AUTO, KERNEL, CPUID, ENV)


class Capabilities:
    """What the host offers, as probed by host.py."""

    __slots__ = (
        "amx_supported",
        "faulting",
        "faulting_detail",
        "faulting_enabled",
        "set_xcr0",
        "set_xcr0_detail",
        "set_xcr0_limit",
        "xcr0",
    )

    def __init__(
        self,
        xcr0: int,
        faulting: bool,
        faulting_detail: str,
        set_xcr0: bool,
        set_xcr0_detail: str,
        amx_supported: bool,  # the kernel supports AMX tile data (ARCH_GET_XCOMP_SUPP bit 18)
        faulting_enabled: bool = False,  # this thread's CPUID already faults (under xcr0run)
        set_xcr0_limit: int = (1 << 64) - 1,  # XCR0 bits ARCH_SET_XCR0 keeps (RFC patch: 0x3FF)
    ) -> None:
        self.xcr0 = xcr0
        self.faulting = faulting
        self.faulting_detail = faulting_detail
        self.set_xcr0 = set_xcr0
        self.set_xcr0_detail = set_xcr0_detail
        self.amx_supported = amx_supported
        self.faulting_enabled = faulting_enabled
        self.set_xcr0_limit = set_xcr0_limit


class Plan:
    __slots__ = (
        "deny_amx",
        "env_only",
        "grant_amx",
        "mask",
        "set_xcr0",
        "trap_cpuid",
        "view",
        "xcr0_only",
    )

    def __init__(
        self,
        mask: int,
        set_xcr0: bool,  # change the hardware XCR0 in the child (kernel mechanism)
        trap_cpuid: bool,  # supervise with CPUID faulting
        deny_amx: bool,  # make ARCH_REQ_XCOMP_PERM fail for the whole program tree
        view: CpuidView,
        grant_amx: bool = False,  # request AMX permission in every new program image
        env_only: bool = False,  # --method env: the view is carried by library knobs alone
        xcr0_only: bool = False,  # --xcr0-only: XCR0 changed, CPUID left as the host's
    ) -> None:
        self.mask = mask
        self.set_xcr0 = set_xcr0
        self.trap_cpuid = trap_cpuid
        self.deny_amx = deny_amx
        self.view = view
        self.grant_amx = grant_amx
        self.env_only = env_only
        self.xcr0_only = xcr0_only

    @property
    def supervised(self) -> bool:
        return self.trap_cpuid or self.grant_amx

    @property
    def mechanism(self) -> str:
        parts = [name for name, on in (("kernel", self.set_xcr0), ("cpuid", self.trap_cpuid)) if on]
        return "+".join(parts) or ("env" if self.env_only else "none")

    def describe(self) -> str:
        """How the mask is achieved, in one line."""
        if self.set_xcr0 and self.xcr0_only:
            return (
                f"hardware XCR0 set to {self.mask:#x} by the kernel (ARCH_SET_XCR0), CPUID "
                "feature bits left as the host's: enabled in CPUID, not by the OS"
            )
        if self.set_xcr0:
            how = f"hardware XCR0 set to {self.mask:#x} by the kernel (ARCH_SET_XCR0)"
            return how + (", CPUID view masked" if self.trap_cpuid else ", CPUID unmasked")
        if self.trap_cpuid:
            return f"hardware XCR0 unchanged ({self.view.host_xcr0:#x}), CPUID view masked"
        if self.env_only:
            return "CPUID and XCR0 unchanged; only library knobs steer the program"
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
    method: str = Method.AUTO,
    extra_hidden: Iterable[str] = (),
    grant_amx: bool = False,
    added: Iterable[str] = (),
    identity: dict[tuple[int, int], tuple[Registers, Registers]] | None = None,
    xcr0_only: bool = False,
) -> Plan:
    """Choose mechanisms for `mask`, or raise UnsupportedError saying what is missing.
    `extra_hidden`, `added` and `identity` come from --level and --profile; `xcr0_only`
    is --xcr0-only (see xcr0_only_plan)."""
    extra = tuple(extra_hidden)

    def view(xcr0_changed: bool) -> CpuidView:
        return CpuidView.build(mask, caps.xcr0, xcr0_changed, extra, added, identity)

    amx = xsave.NAMES["amx"]
    deny_amx = caps.amx_supported and bool(caps.xcr0 & amx) and not mask & amx
    if grant_amx and not caps.amx_supported:
        raise UnsupportedError("--grant-amx: this CPU and kernel have no AMX")
    if grant_amx and not mask & amx:
        raise UnsupportedError("--grant-amx: the mask hides AMX")
    if xcr0_only:
        return xcr0_only_plan(mask, caps, method, bool(extra or added or identity), grant_amx)
    if method == Method.ENV:
        return Plan(mask, False, False, deny_amx, view(False), grant_amx, env_only=True)
    if mask == caps.xcr0 and not extra and not added and not identity and method == Method.AUTO:
        return Plan(mask, False, False, False, view(False), grant_amx)
    want_kernel = method in (Method.AUTO, Method.KERNEL) and mask != caps.xcr0
    if method == Method.KERNEL and not caps.set_xcr0:
        raise UnsupportedError(f"--method kernel: {caps.set_xcr0_detail}")
    if method == Method.CPUID and not caps.faulting:
        raise UnsupportedError(f"--method cpuid: no CPUID faulting ({caps.faulting_detail})")
    # The 2020 RFC patch refuses components from bit 10 up (AMX): such masks need cpuid.
    kernel_fits = not mask & ~caps.set_xcr0_limit
    if method == Method.KERNEL and not kernel_fits:
        raise UnsupportedError(
            "--method kernel: ARCH_SET_XCR0 (the 2020 patch) refuses components above bit 9 "
            f"({', '.join(c.name for c in xsave.components(mask & ~caps.set_xcr0_limit))})"
        )
    set_xcr0 = want_kernel and caps.set_xcr0 and kernel_fits
    trap = caps.faulting  # the kernel mechanism still wants CPUID to agree with XCR0
    if not set_xcr0 and not trap:
        raise UnsupportedError(
            "cannot present this mask here: no CPUID faulting "
            f"({caps.faulting_detail}) and {caps.set_xcr0_detail} (--method env --env-hints "
            "steers only libraries that read their own knobs)"
        )
    return Plan(mask, set_xcr0, trap, deny_amx, view(set_xcr0), grant_amx)


def plan_for(
    spec: ViewSpec, caps: Capabilities, method: str, grant_amx: bool, xcr0_only: bool = False
) -> Plan:
    """make_plan for what the user asked (`spec`)."""
    return make_plan(
        spec.mask,
        caps,
        method,
        spec.extra_hidden,
        grant_amx=grant_amx,
        added=spec.added,
        identity=spec.identity,
        xcr0_only=xcr0_only,
    )


def xcr0_only_plan(
    mask: int, caps: Capabilities, method: str, cpuid_edits: bool, grant_amx: bool
) -> Plan:
    """--xcr0-only: the state a hypervisor or OS leaves behind when it enables less in
    XCR0 than CPUID advertises (AVX-512 off in XCR0, avx512f still set in CPUID). Only
    ARCH_SET_XCR0 can do that: CPUID stays the host's (OSXSAVE and leaf 0xD follow the
    new XCR0 by themselves), so nothing is trapped and nothing hidden."""
    if method not in (Method.AUTO, Method.KERNEL):
        raise UnsupportedError(f"--xcr0-only works through the kernel, not --method {method}")
    if cpuid_edits:
        raise UnsupportedError(
            "--xcr0-only leaves CPUID as the host's; --level and --profile change CPUID"
        )
    if not caps.set_xcr0:
        raise UnsupportedError(f"--xcr0-only needs ARCH_SET_XCR0: {caps.set_xcr0_detail}")
    if mask & ~caps.set_xcr0_limit:
        raise UnsupportedError(
            "--xcr0-only: this ARCH_SET_XCR0 refuses components above bit 9 "
            f"({', '.join(c.name for c in xsave.components(mask & ~caps.set_xcr0_limit))})"
        )
    amx = xsave.NAMES["amx"]
    deny_amx = caps.amx_supported and bool(caps.xcr0 & amx) and not mask & amx
    unchanged = CpuidView.build(caps.xcr0, caps.xcr0, False)
    return Plan(mask, mask != caps.xcr0, False, deny_amx, unchanged, grant_amx, xcr0_only=True)


class ViewSpec:
    """What the user asked the program to see, before choosing a mechanism."""

    __slots__ = ("added", "extra_hidden", "identity", "label", "mask", "profile")

    def __init__(
        self,
        label: str,  # for messages: the options as given ("--level x86-64-v2")
        mask: int,
        extra_hidden: frozenset[str] = frozenset(),
        added: frozenset[str] = frozenset(),
        identity: dict[tuple[int, int], tuple[Registers, Registers]] | None = None,
        profile: dict[str, object] | None = None,  # --profile facts for --show and --report
    ) -> None:
        self.label = label
        self.mask = mask
        self.extra_hidden = extra_hidden
        self.added = added
        self.identity = identity
        self.profile = profile


def shape_view(
    host_xcr0: int,
    host_table: CpuidTable,
    mask: tuple[str, int] | None = None,
    level: str | None = None,
    profile: CpuidProfile | None = None,
    force: bool = False,
) -> ViewSpec:
    """Combine --mask, --level and --profile: each can only take away from the others."""
    labels = []
    value = host_xcr0
    hidden: frozenset[str] = frozenset()
    added: frozenset[str] = frozenset()
    identity = None
    facts: dict[str, object] | None = None
    if mask is not None:
        labels.append(f"--mask {mask[0]}")
        value &= mask[1]
    if level is not None:
        labels.append(f"--level {level}")
        level_mask, level_hidden = level_restriction(level)
        value &= level_mask
        hidden |= level_hidden
    if profile is not None:
        from xcr0run.profiles import profile_view

        labels.append(f"--profile {profile.name}")
        pv = profile_view(profile, host_table, host_xcr0)
        if pv.missing and not force:
            raise UnsupportedError(
                f"profile {profile.name} has features this CPU lacks: "
                f"{', '.join(sorted(pv.missing))}; the program would die of SIGILL using them "
                "(use --force to present them anyway)"
            )
        value &= pv.mask
        hidden |= pv.hidden
        added = pv.missing if force else frozenset()
        identity = pv.identity
        facts = {
            "name": profile.name,
            "source": profile.source,
            "xcr0": f"{profile.effective_xcr0():#x}",
            "lacks": sorted(pv.hidden),
            "extra": sorted(pv.missing),
        }
    # What is left of XCR0 must still be a valid XCR0 (sse may go, avx512 needs avx...).
    value &= ~xsave.dependents(host_xcr0 & ~value)
    return ViewSpec(" ".join(labels) or "--mask host", value, hidden, added, identity, facts)
