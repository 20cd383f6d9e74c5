"""CPUID feature bits and the graph of what depends on what: the one table xcr0run trusts.

Every feature the launcher can hide is a `CpuidFeature`: where its bit lives (leaf,
sub-leaf, register, bit), how users and Linux spell it, and which other features it
directly `requires`. Hiding a feature hides everything that transitively requires it
(`dependents`), so the masked CPUID view a program sees is always one that real hardware
running under a real OS could plausibly present.

What "requires" means here. An edge A -> B is recorded when any of these says A is not
usable, or not meaningful, without B:

* the architecture (Intel SDM, AMD APM): e.g. AVX state (XCR0 bit 2) cannot be enabled
  without SSE state (bit 1); VEX-encoded vector instructions need the YMM state that the
  AVX bit stands for; EVEX-encoded ones need AVX-512 (or AVX10) state;
* Linux's clear-cpu-cap dependency table (arch/x86/kernel/cpu/cpuid-deps.c): the kernel
  clears B's dependents when it disables B, so a Linux process never sees A without B;
* glibc's "usable" rules (sysdeps/x86/cpu-features.c, update_active): a feature glibc
  only marks usable when another one is (e.g. AVX needs OSXSAVE and the XMM|YMM state);
* Xen's deep-dependency table (xen/tools/gen-cpuid.py), which encodes "no real CPU has A
  without B" and is stricter than Linux for several vector extensions.

Where those sources disagree, the stricter edge wins (hiding more is safe; showing an
impossible combination is not), and the row carries a comment naming the disagreement.
Edges that only make sense for a hypervisor (Xen's "NX -> SMAP", "LM -> CX16/LAHF_LM/...")
are left out: a launcher never hides long mode from a 64-bit process.

Sources (facts only; all wording and code here are our own):

* Intel 64 and IA-32 Architectures Software Developer's Manual, vol. 2A, CPUID
  (feature-flag tables for leaves 01H, 06H, 07H, 0DH, 14H, 19H, 24H) and vol. 1, ch. 13
  (XSAVE state components, XCR0 rules); Intel Architecture Instruction Set Extensions
  Programming Reference (leaf 07H sub-leaf 1 bits); Intel AVX10 and APX architecture
  specifications (leaf 24H, CPUID.(7,1):EDX[19] and [21], leaf 29H).
* AMD64 Architecture Programmer's Manual, vol. 3, appendix E (Fn8000_0001 ECX/EDX,
  Fn8000_0008 EBX).
* Linux: arch/x86/include/asm/cpufeatures.h (bit positions and /proc/cpuinfo names; in
  current kernels a flag is shown only when its comment starts with a quoted name),
  arch/x86/kernel/cpu/cpuid-deps.c (dependency table), arch/x86/kernel/fpu/xstate.c
  (XSAVE component -> feature map), arch/x86/kvm/cpuid.c (whole leaves KVM zeroes when
  their feature is absent: 0x14, 0x1D, 0x1E, 0x24, ...), arch/x86/kvm/reverse_cpuid.h
  (7.1 EDX and 24H bits).
* glibc: sysdeps/x86/cpu-features.c (update_active), sysdeps/x86/include/cpu-features.h
  (bit names), sysdeps/x86/get-isa-level.h and sysdeps/x86/isa-level.h (what the dynamic
  loader checks for each x86-64 ISA level).
* Xen: xen/include/public/arch-x86/cpufeatureset.h and xen/tools/gen-cpuid.py.
* x86-64 psABI, section "Micro-architecture levels" (x86-64-v1 .. v4).

Pure module: standard library only, no I/O, no ctypes. Run it (`python -m
xcr0run.features`) to print the self-check and the table's size.
"""

from __future__ import annotations

from xcr0run.cpuid import REGISTERS

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from xcr0run.cpuid import CpuidTable, Register

    # Where one bit lives: (leaf, sub-leaf, register, bit).
    Location = tuple[int, int, Register, int]

# Plain classes, not dataclasses: this module is on the launch path, and importing
# dataclasses (with inspect) costs more than the whole table.


class CpuidFeature:
    """One feature bit: where it lives, how it is spelt, what it directly requires."""

    __slots__ = (
        "aliases",
        "bit",
        "cpuinfo",
        "leaf",
        "name",
        "os_managed",
        "register",
        "requires",
        "subleaf",
        "system",
        "title",
    )

    def __init__(
        self,
        name: str,  # canonical, lower-case, user-facing
        leaf: int,
        subleaf: int,  # 0 for leaves without sub-leaves
        register: Register,
        bit: int,
        title: str,  # short human description
        requires: tuple[str, ...] = (),  # direct prerequisites (canonical feature names)
        # Linux /proc/cpuinfo spelling when it differs from `name`; "" when Linux never
        # shows this bit; None when Linux shows it as `name`.
        cpuinfo: str | None = None,
        aliases: tuple[str, ...] = (),  # other real spellings (Linux, glibc, GCC, Xen, SDM)
        os_managed: bool = False,  # set by the OS, not the CPU (OSXSAVE, OSPKE)
        # A platform, virtualization or supervisor facility rather than an instruction a
        # user program runs: a profile may claim it on a host that lacks it without the
        # program dying of SIGILL (SDM vol. 2A CPUID tables, by what each bit enables).
        system: bool = False,
    ) -> None:
        self.name = name
        self.leaf = leaf
        self.subleaf = subleaf
        self.register = register
        self.bit = bit
        self.title = title
        self.requires = requires
        self.cpuinfo = cpuinfo
        self.aliases = aliases
        self.os_managed = os_managed
        self.system = system

    def __repr__(self) -> str:
        where = f"{self.leaf:#x}.{self.subleaf} {self.register}:{self.bit}"
        return f"CpuidFeature({self.name!r} at {where})"

    @property
    def location(self) -> Location:
        return (self.leaf, self.subleaf, self.register, self.bit)

    @property
    def mask(self) -> int:
        return 1 << self.bit


class _Row:
    """One table line; `requires` and `aliases` are space-separated to keep rows short."""

    __slots__ = ("aliases", "bit", "cpuinfo", "name", "os_managed", "requires", "system", "title")

    def __init__(
        self,
        bit: int,
        name: str,
        title: str,
        requires: str = "",
        cpuinfo: str | None = None,
        aliases: str = "",
        os_managed: bool = False,
        system: bool = False,
    ) -> None:
        self.bit = bit
        self.name = name
        self.title = title
        self.requires = requires
        self.cpuinfo = cpuinfo
        self.aliases = aliases
        self.os_managed = os_managed
        self.system = system


def _table(
    leaf: int, subleaf: int, register: Register, rows: Iterable[_Row]
) -> tuple[CpuidFeature, ...]:
    return tuple(
        CpuidFeature(
            name=r.name,
            leaf=leaf,
            subleaf=subleaf,
            register=register,
            bit=r.bit,
            title=r.title,
            requires=tuple(r.requires.split()),
            cpuinfo=r.cpuinfo,
            aliases=tuple(r.aliases.split()),
            os_managed=r.os_managed,
            system=r.system,
        )
        for r in rows
    )


_HIDDEN = ""  # cpuinfo value: Linux does not print this bit in /proc/cpuinfo

# -- leaf 01H EDX -------------------------------------------------------------------------
# SDM vol. 2A table "Feature Information Returned in the EDX Register"; names and cpuinfo
# spellings from Linux cpufeatures.h word 0. Edges: cpuid-deps.c (FXSR->FPU, MMX->FXSR,
# CMOV->FXSR, XMM->FXSR, XMM2->XMM); gen-cpuid.py (PSE->PSE36, FPU->MMX). CMOV->FXSR is a
# Linux-only edge (neither the SDM nor Xen relate them); kept because a Linux process
# never sees CMOV once FXSR is cleared.
_LEAF1_EDX = _table(
    0x1,
    0,
    "edx",
    (
        _Row(0, "fpu", "x87 floating-point unit on chip"),
        _Row(1, "vme", "Virtual-8086 mode enhancements", system=True),
        _Row(2, "de", "Debugging extensions (CR4.DE, I/O breakpoints)", system=True),
        _Row(3, "pse", "Page size extension (4 MiB pages)", system=True),
        _Row(4, "tsc", "Time-stamp counter and RDTSC"),
        _Row(5, "msr", "Model-specific registers, RDMSR/WRMSR", system=True),
        _Row(6, "pae", "Physical address extension", system=True),
        _Row(7, "mce", "Machine-check exception", system=True),
        _Row(8, "cx8", "CMPXCHG8B instruction", aliases="cmpxchg8b"),
        _Row(9, "apic", "On-chip local APIC", system=True),
        _Row(11, "sep", "SYSENTER/SYSEXIT instructions", system=True),
        _Row(12, "mtrr", "Memory type range registers", system=True),
        _Row(13, "pge", "Global pages (CR4.PGE)", system=True),
        _Row(14, "mca", "Machine-check architecture", system=True),
        _Row(15, "cmov", "CMOVcc (and FCMOVcc/FCOMI with x87)", "fxsr"),
        _Row(16, "pat", "Page attribute table", system=True),
        _Row(17, "pse36", "36-bit page size extension", "pse", aliases="pse_36", system=True),
        _Row(18, "pn", "Processor serial number", aliases="psn", system=True),
        _Row(19, "clflush", "CLFLUSH instruction", aliases="clfsh"),
        _Row(21, "ds", "Debug store", cpuinfo="dts", aliases="dts", system=True),
        _Row(22, "acpi", "Thermal monitor and clock-control MSRs", system=True),
        _Row(23, "mmx", "MMX instructions (aliased on the x87 registers)", "fpu fxsr"),
        _Row(24, "fxsr", "FXSAVE/FXRSTOR, CR4.OSFXSR", "fpu"),
        _Row(25, "sse", "SSE: XMM registers and instructions", "fxsr"),
        _Row(26, "sse2", "SSE2 instructions", "sse"),
        _Row(27, "ss", "Self snoop", system=True),
        _Row(
            28,
            "ht",
            "Multi-threading / core topology fields valid (HTT)",
            aliases="htt",
            system=True,
        ),
        _Row(29, "tm", "Thermal monitor 1", aliases="tm1", system=True),
        _Row(31, "pbe", "Pending break enable", system=True),
    ),
)

# -- leaf 01H ECX -------------------------------------------------------------------------
# SDM vol. 2A table "Feature Information Returned in the ECX Register"; Linux word 4.
# Disagreements, stricter kept:
# * SSSE3/SSE4.1/SSE4.2: Linux requires only SSE2; Xen chains SSE3->SSSE3->SSE4.1->SSE4.2.
# * F16C: Linux requires SSE2; Xen and glibc (usable only with AVX) require AVX. F16C is
#   VEX-encoded and writes YMM registers, so AVX it is.
# * AVX: Linux requires XSAVE; the SDM forbids XCR0[2] (YMM) without XCR0[1] (SSE), and
#   glibc marks AVX usable only when OSXSAVE is set and XCR0 enables XMM and YMM state.
# * FMA: Linux and Xen agree on AVX. AES/PCLMULQDQ: Linux and Xen agree on SSE2.
# * X2APIC and TSC_DEADLINE on APIC/TSC: Xen only (architectural, harmless here).
# Bit 31 is documented by Intel as unused (always 0); hypervisors set it by convention.
_LEAF1_ECX = _table(
    0x1,
    0,
    "ecx",
    (
        _Row(0, "sse3", "SSE3 instructions", "sse2", cpuinfo="pni", aliases="pni"),
        _Row(1, "pclmulqdq", "PCLMULQDQ carry-less multiply", "sse2", aliases="pclmul"),
        _Row(2, "dtes64", "64-bit debug store area", system=True),
        _Row(3, "monitor", "MONITOR/MWAIT instructions", aliases="mwait", system=True),
        _Row(4, "ds_cpl", "CPL-qualified debug store", system=True),
        _Row(5, "vmx", "Virtual machine extensions (VT-x)", system=True),
        _Row(6, "smx", "Safer mode extensions (TXT)", system=True),
        _Row(7, "est", "Enhanced SpeedStep", aliases="eist", system=True),
        _Row(8, "tm2", "Thermal monitor 2", system=True),
        _Row(9, "ssse3", "Supplemental SSE3 instructions", "sse3"),
        _Row(10, "cid", "L1 context ID", aliases="cnxt_id", system=True),
        _Row(11, "sdbg", "Silicon debug interface MSR", system=True),
        _Row(12, "fma", "FMA3 fused multiply-add (VEX)", "avx"),
        _Row(13, "cx16", "CMPXCHG16B instruction", aliases="cmpxchg16b"),
        _Row(14, "xtpr", "xTPR update control", system=True),
        _Row(15, "pdcm", "Perfmon and debug capability MSR", system=True),
        _Row(17, "pcid", "Process-context identifiers", system=True),
        _Row(18, "dca", "Direct cache access", system=True),
        _Row(19, "sse4_1", "SSE4.1 instructions", "ssse3", aliases="sse4.1 sse41"),
        _Row(20, "sse4_2", "SSE4.2 instructions", "sse4_1", aliases="sse4.2 sse42"),
        _Row(21, "x2apic", "x2APIC mode", "apic", system=True),
        _Row(22, "movbe", "MOVBE instruction"),
        _Row(23, "popcnt", "POPCNT instruction"),
        _Row(
            24,
            "tsc_deadline_timer",
            "TSC-deadline timer",
            "apic tsc",
            aliases="tsc_deadline",
            system=True,
        ),
        _Row(25, "aes", "AES-NI instructions", "sse2", aliases="aesni"),
        _Row(26, "xsave", "XSAVE/XRSTOR/XSETBV/XGETBV", "fxsr"),
        _Row(27, "osxsave", "OS enabled XSAVE (CR4.OSXSAVE)", "xsave", _HIDDEN, os_managed=True),
        _Row(28, "avx", "AVX: YMM registers and VEX vector instructions", "xsave osxsave sse"),
        _Row(29, "f16c", "Half-precision conversion (VEX)", "avx"),
        _Row(30, "rdrand", "RDRAND instruction", aliases="rdrnd"),
        _Row(31, "hypervisor", "Running under a hypervisor (by convention)", system=True),
    ),
)

# -- leaf 06H EAX -------------------------------------------------------------------------
# Thermal and power management (SDM vol. 2A); Linux word 14. Listed because XSAVE
# components 13 (HDC) and 16 (HWP) are enumerated here; the HWP sub-features need HWP.
# Linux has no flag for HDC.
_LEAF6_EAX = _table(
    0x6,
    0,
    "eax",
    (
        _Row(0, "dtherm", "Digital thermal sensor"),
        _Row(1, "ida", "Turbo Boost (dynamic acceleration)"),
        _Row(2, "arat", "APIC timer always running"),
        _Row(4, "pln", "Power limit notification"),
        _Row(6, "pts", "Package thermal status"),
        _Row(7, "hwp", "Hardware-controlled P-states"),
        _Row(8, "hwp_notify", "HWP notification interrupt", "hwp"),
        _Row(9, "hwp_act_window", "HWP activity window", "hwp"),
        _Row(10, "hwp_epp", "HWP energy/performance preference", "hwp"),
        _Row(11, "hwp_pkg_req", "HWP package-level request", "hwp"),
        _Row(13, "hdc", "Hardware duty cycling", cpuinfo=_HIDDEN),
        _Row(19, "hfi", "Hardware feedback interface"),
    ),
)

# -- leaf 07H sub-leaf 0 EBX --------------------------------------------------------------
# SDM vol. 2A "Structured Extended Feature Flags"; Linux word 9.
# * AVX512F: Linux requires AVX; Xen requires AVX2 ("if you want AVX-512, AVX2 must be
#   supported"); glibc needs the opmask/ZMM state, which the SDM only allows with YMM.
#   Both kept. Every other AVX-512 subset requires AVX512F (Linux, Xen, glibc agree).
# * MPX: Linux requires XSAVE; its BND state (XCR0 bits 3-4) also needs OSXSAVE.
# * SHA: Linux requires SSE2. TSC_ADJUST on TSC: Xen only.
_LEAF7_EBX = _table(
    0x7,
    0,
    "ebx",
    (
        _Row(0, "fsgsbase", "RDFSBASE/RDGSBASE/WRFSBASE/WRGSBASE"),
        _Row(1, "tsc_adjust", "IA32_TSC_ADJUST MSR", "tsc", system=True),
        _Row(2, "sgx", "Software Guard Extensions", system=True),
        _Row(3, "bmi1", "Bit manipulation set 1 (VEX, GPR only)", aliases="bmi"),
        _Row(4, "hle", "Hardware lock elision (TSX)"),
        _Row(5, "avx2", "AVX2 instructions", "avx"),
        _Row(
            6, "fdp_excptn_only", "x87 FDP updated only on exceptions", cpuinfo=_HIDDEN, system=True
        ),
        _Row(7, "smep", "Supervisor-mode execution prevention", system=True),
        _Row(8, "bmi2", "Bit manipulation set 2 (VEX, GPR only)"),
        _Row(9, "erms", "Enhanced REP MOVSB/STOSB"),
        _Row(10, "invpcid", "INVPCID instruction", system=True),
        _Row(11, "rtm", "Restricted transactional memory (TSX)"),
        _Row(
            12, "cqm", "Resource Director Technology monitoring", aliases="rdt_m pqm", system=True
        ),
        _Row(
            13,
            "zero_fcs_fds",
            "x87 FCS/FDS deprecated, stored as zero",
            cpuinfo=_HIDDEN,
            system=True,
        ),
        _Row(14, "mpx", "Memory protection extensions", "xsave osxsave"),
        _Row(15, "rdt_a", "Resource Director Technology allocation", aliases="pqe", system=True),
        _Row(16, "avx512f", "AVX-512 Foundation", "avx avx2"),
        _Row(17, "avx512dq", "AVX-512 doubleword and quadword", "avx512f"),
        _Row(18, "rdseed", "RDSEED instruction"),
        _Row(19, "adx", "ADCX/ADOX instructions"),
        _Row(20, "smap", "Supervisor-mode access prevention", system=True),
        _Row(21, "avx512ifma", "AVX-512 integer FMA", "avx512f", aliases="avx512_ifma"),
        _Row(23, "clflushopt", "CLFLUSHOPT instruction"),
        _Row(24, "clwb", "CLWB instruction"),
        _Row(25, "intel_pt", "Intel Processor Trace", system=True),
        _Row(26, "avx512pf", "AVX-512 prefetch (Xeon Phi)", "avx512f"),
        _Row(27, "avx512er", "AVX-512 exponential and reciprocal (Xeon Phi)", "avx512f"),
        _Row(28, "avx512cd", "AVX-512 conflict detection", "avx512f"),
        _Row(29, "sha_ni", "SHA-1/SHA-256 instructions", "sse2", aliases="sha"),
        _Row(30, "avx512bw", "AVX-512 byte and word", "avx512f"),
        _Row(31, "avx512vl", "AVX-512 128/256-bit vector lengths", "avx512f"),
    ),
)

# -- leaf 07H sub-leaf 0 ECX --------------------------------------------------------------
# SDM vol. 2A; Linux word 16. Bits 17-21 are the MPX MAWAU value, not flags.
# * AVX512_VBMI: Linux requires AVX512F; Xen requires AVX512BW (byte/word masks). Kept BW.
# * AVX512_VBMI2, AVX512_BITALG: Linux requires AVX512VL, Xen AVX512BW: both kept.
# * AVX512_VNNI: Linux AVX512VL, Xen AVX512F: VL kept (it implies F).
# * VAES, VPCLMULQDQ: Linux and glibc require AVX; Xen requires AVX2 plus the legacy AES /
#   PCLMULQDQ bit: Xen's stricter edges kept.
# * PKU: Linux requires XSAVE (PKRU is XSAVE-managed); OSPKE requires PKU. glibc instead
#   treats PKU as usable only when OSPKE is set; that reverse edge would make a cycle, so
#   the OS bit is simply a dependent here.
# * SHSTK, ENQCMD: Linux requires XSAVES (their state is supervisor XSAVE state).
# Linux has no /proc/cpuinfo flag for PREFETCHWT1, Key Locker or PKS, and shows the
# synthetic "user_shstk" instead of the raw shadow-stack bit.
_LEAF7_ECX = _table(
    0x7,
    0,
    "ecx",
    (
        _Row(0, "prefetchwt1", "PREFETCHWT1 instruction (Xeon Phi)", cpuinfo=_HIDDEN),
        _Row(1, "avx512vbmi", "AVX-512 VBMI", "avx512bw", aliases="avx512_vbmi"),
        _Row(2, "umip", "User-mode instruction prevention", system=True),
        _Row(3, "pku", "Protection keys for user pages", "xsave"),
        _Row(4, "ospke", "OS has enabled protection keys (CR4.PKE)", "pku", os_managed=True),
        _Row(5, "waitpkg", "UMONITOR/UMWAIT/TPAUSE"),
        _Row(6, "avx512_vbmi2", "AVX-512 VBMI2", "avx512bw avx512vl", aliases="avx512vbmi2"),
        _Row(7, "shstk", "CET shadow stacks", "xsaves", _HIDDEN, "cet_ss user_shstk"),
        _Row(8, "gfni", "Galois-field instructions", "sse2"),
        _Row(9, "vaes", "Vector AES (VEX.256/EVEX)", "aes avx2"),
        _Row(10, "vpclmulqdq", "Vector carry-less multiply (VEX.256/EVEX)", "pclmulqdq avx2"),
        _Row(11, "avx512_vnni", "AVX-512 VNNI", "avx512f avx512vl", aliases="avx512vnni"),
        _Row(12, "avx512_bitalg", "AVX-512 BITALG", "avx512bw avx512vl", aliases="avx512bitalg"),
        _Row(13, "tme", "Total memory encryption", system=True),
        _Row(14, "avx512_vpopcntdq", "AVX-512 VPOPCNTD/Q", "avx512f", aliases="avx512vpopcntdq"),
        _Row(16, "la57", "5-level paging", system=True),
        _Row(22, "rdpid", "RDPID instruction"),
        _Row(23, "kl", "Key Locker", cpuinfo=_HIDDEN, aliases="keylocker"),
        _Row(24, "bus_lock_detect", "Bus-lock debug exception", system=True),
        _Row(25, "cldemote", "CLDEMOTE instruction"),
        _Row(27, "movdiri", "MOVDIRI instruction"),
        _Row(28, "movdir64b", "MOVDIR64B instruction"),
        _Row(29, "enqcmd", "ENQCMD/ENQCMDS instructions", "xsaves"),
        _Row(30, "sgx_lc", "SGX launch configuration", "sgx", system=True),
        _Row(31, "pks", "Protection keys for supervisor pages", cpuinfo=_HIDDEN, system=True),
    ),
)

# -- leaf 07H sub-leaf 0 EDX --------------------------------------------------------------
# SDM vol. 2A; Linux word 18.
# * AMX_TILE: Linux requires XFD (the kernel grants AMX state per process through XFD);
#   Xen requires XSAVE; glibc needs OSXSAVE and the XTILECFG/XTILEDATA state. Kept XFD
#   and OSXSAVE (XFD implies XSAVES, XGETBV1, XSAVE). Every AMX_* requires AMX_TILE.
# * AVX512_FP16: Linux and Xen agree on AVX512BW.
# * AVX512_VP2INTERSECT: Linux AVX512VL, Xen AVX512F: VL kept.
# * UINTR: never merged into Linux; like SHSTK and ENQCMD its state is supervisor XSAVE
#   state (component 14), so it requires XSAVES by the same reasoning (our edge).
# * TSXLDTRK on RTM: Xen only ("could also be considered independent"); kept.
# * SGX_KEYS on SGX: our edge (the bit describes an SGX service).
# * INTEL_STIBP, SPEC_CTRL_SSBD on SPEC_CTRL: Xen and Linux (SSBD) respectively.
# Linux shows the speculation-control bits only as synthetic flags ("ibrs", "ibpb",
# "stibp", "ssbd") that AMD bits also set, so the raw bits count as hidden.
_LEAF7_EDX = _table(
    0x7,
    0,
    "edx",
    (
        _Row(1, "sgx_keys", "SGX attestation services", "sgx", _HIDDEN, system=True),
        _Row(2, "avx512_4vnniw", "AVX-512 4VNNIW (Xeon Phi)", "avx512f", aliases="avx5124vnniw"),
        _Row(3, "avx512_4fmaps", "AVX-512 4FMAPS (Xeon Phi)", "avx512f", aliases="avx5124fmaps"),
        _Row(4, "fsrm", "Fast short REP MOVSB"),
        _Row(5, "uintr", "User interrupts", "xsaves", _HIDDEN),
        _Row(
            8,
            "avx512_vp2intersect",
            "AVX-512 VP2INTERSECT",
            "avx512f avx512vl",
            aliases="avx512vp2intersect",
        ),
        _Row(9, "srbds_ctrl", "SRBDS mitigation control MSR", cpuinfo=_HIDDEN, system=True),
        _Row(10, "md_clear", "VERW clears CPU buffers", system=True),
        _Row(11, "rtm_always_abort", "RTM transactions always abort", cpuinfo=_HIDDEN, system=True),
        _Row(13, "tsx_force_abort", "TSX_FORCE_ABORT MSR", cpuinfo=_HIDDEN, system=True),
        _Row(14, "serialize", "SERIALIZE instruction"),
        _Row(
            15,
            "hybrid_cpu",
            "Hybrid (mixed core types)",
            cpuinfo=_HIDDEN,
            aliases="hybrid",
            system=True,
        ),
        _Row(16, "tsxldtrk", "TSX suspend load-address tracking", "rtm"),
        _Row(18, "pconfig", "PCONFIG instruction", system=True),
        _Row(19, "arch_lbr", "Architectural last-branch records", system=True),
        _Row(20, "ibt", "CET indirect-branch tracking", aliases="cet_ibt"),
        _Row(22, "amx_bf16", "AMX bfloat16 tile multiply", "amx_tile"),
        _Row(23, "avx512_fp16", "AVX-512 FP16", "avx512bw", aliases="avx512fp16"),
        _Row(24, "amx_tile", "AMX tile architecture", "osxsave xfd"),
        _Row(25, "amx_int8", "AMX 8-bit integer tile multiply", "amx_tile"),
        _Row(26, "spec_ctrl", "IBRS and IBPB", cpuinfo=_HIDDEN, aliases="ibrs_ibpb", system=True),
        _Row(
            27,
            "intel_stibp",
            "Single-thread indirect branch predictors",
            "spec_ctrl",
            _HIDDEN,
            system=True,
        ),
        _Row(28, "flush_l1d", "L1D flush command MSR", aliases="l1d_flush", system=True),
        _Row(29, "arch_capabilities", "IA32_ARCH_CAPABILITIES MSR", system=True),
        _Row(30, "core_capabilities", "IA32_CORE_CAPABILITIES MSR", cpuinfo=_HIDDEN, system=True),
        _Row(
            31,
            "spec_ctrl_ssbd",
            "Speculative store bypass disable",
            "spec_ctrl",
            _HIDDEN,
            system=True,
        ),
    ),
)

# -- leaf 07H sub-leaf 1 EAX --------------------------------------------------------------
# SDM vol. 2A / ISE reference; Linux word 12 (most of it hidden from /proc/cpuinfo).
# * AVX_VNNI: Linux requires AVX; Xen AVX2: AVX2 kept. AVX_IFMA: glibc AVX, Xen AVX2: kept.
# * SHA512 and SM4 on AVX2, SM3 on AVX: Xen (VEX.256 integer vs. VEX.128 forms).
# * AVX512_BF16: Linux AVX512VL, Xen AVX512BW: both kept.
# * LASS on SMAP and FRED on LKGS: Linux. AMX_FP16 on AMX_TILE: Linux and Xen.
# * "lass" is shown by the LASS patch series' cpufeatures.h; treat it as unverified on
#   older kernels.
_LEAF7_1_EAX = _table(
    0x7,
    1,
    "eax",
    (
        _Row(0, "sha512", "SHA-512 instructions (VEX.256)", "avx2", _HIDDEN),
        _Row(1, "sm3", "SM3 hash instructions (VEX.128)", "avx", _HIDDEN),
        _Row(2, "sm4", "SM4 cipher instructions (VEX.256)", "avx2", _HIDDEN),
        _Row(3, "rao_int", "Remote atomic integer operations", cpuinfo=_HIDDEN, aliases="raoint"),
        _Row(4, "avx_vnni", "AVX (VEX) vector neural network", "avx2", aliases="avxvnni"),
        _Row(5, "avx512_bf16", "AVX-512 bfloat16", "avx512bw avx512vl", aliases="avx512bf16"),
        _Row(6, "lass", "Linear address space separation", "smap"),
        _Row(7, "cmpccxadd", "CMPccXADD instructions", cpuinfo=_HIDDEN),
        _Row(8, "arch_perfmon_ext", "Architectural perfmon extension leaf", cpuinfo=_HIDDEN),
        _Row(10, "fzrm", "Fast zero-length REP MOVSB", cpuinfo=_HIDDEN, aliases="fzlrm"),
        _Row(11, "fsrs", "Fast short REP STOSB", cpuinfo=_HIDDEN),
        _Row(12, "fsrc", "Fast short REP CMPSB/SCASB", cpuinfo=_HIDDEN, aliases="fsrcs"),
        _Row(17, "fred", "Flexible return and event delivery", "lkgs"),
        _Row(18, "lkgs", "LKGS instruction", cpuinfo=_HIDDEN),
        _Row(19, "wrmsrns", "Non-serializing WRMSR", cpuinfo=_HIDDEN),
        _Row(21, "amx_fp16", "AMX half-precision tile multiply", "amx_tile", _HIDDEN),
        _Row(22, "hreset", "HRESET instruction", cpuinfo=_HIDDEN),
        _Row(23, "avx_ifma", "AVX (VEX) integer fused multiply-add", "avx2", _HIDDEN, "avxifma"),
        _Row(26, "lam", "Linear address masking"),
        _Row(27, "msrlist", "RDMSRLIST/WRMSRLIST instructions", cpuinfo=_HIDDEN),
        _Row(31, "movrs", "MOVRS read-shared instructions", cpuinfo=_HIDDEN),
    ),
)

# -- leaf 07H sub-leaf 1 EDX --------------------------------------------------------------
# ISE reference, AVX10 and APX specifications; Linux KVM reverse_cpuid.h (these bits have
# no /proc/cpuinfo flag; Linux's APX flag is synthetic and unnamed).
# * AVX_VNNI_INT8/INT16 on AVX2, AVX_NE_CONVERT on AVX: Xen (glibc: AVX).
# * AVX10 on AVX512F: our decision. AVX10 is EVEX-encoded and uses the opmask/ZMM state
#   (XCR0 bits 5-7) that xsave.py ties to AVX512F, and the AVX10 spec
#   has AVX10.1 parts enumerate the AVX-512 flags as well (a proposed Xen patch also lets
#   AVX10 stand in for AVX512F as owner of the ZMM state). glibc disagrees: it marks AVX10
#   itself usable on OSXSAVE alone and gates only the 512-bit length on the ZMM state.
# * APX_F on XSAVE: Linux; OSXSAVE too, as glibc requires XCR0[19] for APX usability.
_LEAF7_1_EDX = _table(
    0x7,
    1,
    "edx",
    (
        _Row(4, "avx_vnni_int8", "AVX VNNI on 8-bit integers", "avx2", _HIDDEN, "avxvnniint8"),
        _Row(5, "avx_ne_convert", "AVX-NE-CONVERT", "avx", _HIDDEN, "avxneconvert"),
        _Row(8, "amx_complex", "AMX complex-number tile multiply", "amx_tile", _HIDDEN),
        _Row(10, "avx_vnni_int16", "AVX VNNI on 16-bit integers", "avx2", _HIDDEN, "avxvnniint16"),
        _Row(14, "prefetchi", "PREFETCHIT0/1 instructions", cpuinfo=_HIDDEN, aliases="prefetchiti"),
        _Row(15, "user_msr", "URDMSR/UWRMSR instructions", cpuinfo=_HIDDEN, aliases="usermsr"),
        _Row(17, "uiret_uif", "UIRET sets UIF from the stack", "uintr", _HIDDEN),
        _Row(19, "avx10", "AVX10 converged vector ISA (leaf 24H)", "avx512f", _HIDDEN),
        _Row(21, "apx_f", "APX foundation (R16-R31)", "xsave osxsave", _HIDDEN, "apx apxf"),
    ),
)

# -- leaf 0DH sub-leaf 1 EAX --------------------------------------------------------------
# SDM vol. 1 ch. 13 / vol. 2A; Linux word 10; cpuid-deps.c: all on XSAVE, XFD on XSAVES
# and XGETBV1. glibc treats XSAVEOPT, XSAVEC, XGETBV(ECX=1) and XFD as usable only with
# OSXSAVE (the instructions fault while CR4.OSXSAVE is clear), so those require it too;
# XSAVES is CPL0-only and keeps Linux's edge alone.
_LEAFD_1_EAX = _table(
    0xD,
    1,
    "eax",
    (
        _Row(0, "xsaveopt", "XSAVEOPT instruction", "xsave osxsave"),
        _Row(1, "xsavec", "XSAVEC (compacted XSAVE)", "xsave osxsave"),
        _Row(2, "xgetbv1", "XGETBV with ECX=1 (XINUSE)", "xsave osxsave", aliases="xgetbv_ecx_1"),
        _Row(3, "xsaves", "XSAVES/XRSTORS and IA32_XSS", "xsave"),
        _Row(4, "xfd", "Extended feature disable (IA32_XFD)", "xsaves xgetbv1", _HIDDEN),
    ),
)

# -- leaf 14H sub-leaf 0 EBX: Intel PT capabilities (SDM vol. 2A); glibc PTWRITE ---------
_LEAF14_EBX = _table(
    0x14,
    0,
    "ebx",
    (_Row(4, "ptwrite", "PTWRITE instruction", "intel_pt", _HIDDEN),),
)

# -- leaf 19H EBX: Key Locker (SDM vol. 2A); glibc: WIDE_KL usable only with AESKLE ------
_LEAF19_EBX = _table(
    0x19,
    0,
    "ebx",
    (
        _Row(0, "aeskle", "AES Key Locker instructions enabled", "kl", _HIDDEN),
        _Row(2, "wide_kl", "Wide Key Locker instructions", "aeskle", _HIDDEN, "widekl"),
    ),
)

# -- leaf 24H: AVX10 converged vector ISA leaf (AVX10 spec; KVM reverse_cpuid.h) ---------
# Sub-leaf 0 EBX[7:0] is the version (not a flag); bits 16-18 the supported vector
# lengths (glibc AVX10_XMM/YMM/ZMM). Sub-leaf 1 ECX[2] is AVX10_VNNI_INT (KVM's
# "Advertise AVX10_VNNI_INT" change; lightly verified).
_LEAF24_EBX = _table(
    0x24,
    0,
    "ebx",
    (
        _Row(16, "avx10_128", "AVX10 128-bit vector length", "avx10", _HIDDEN, "avx10_xmm"),
        _Row(17, "avx10_256", "AVX10 256-bit vector length", "avx10", _HIDDEN, "avx10_ymm"),
        _Row(18, "avx10_512", "AVX10 512-bit vector length", "avx10", _HIDDEN, "avx10_zmm"),
    ),
)
_LEAF24_1_ECX = _table(
    0x24,
    1,
    "ecx",
    (_Row(2, "avx10_vnni_int", "AVX10 VNNI on 8/16-bit integers", "avx10", _HIDDEN),),
)

# -- leaf 80000001H ECX -------------------------------------------------------------------
# AMD APM vol. 3 appendix E (Fn8000_0001_ECX); Intel defines only bits 0, 5 and 8. Linux
# word 6. LZCNT is AMD's "ABM" bit; Linux shows it as "abm".
# * XOP, FMA4 on AVX: Xen and glibc (Linux has no edge).
# * SSE4A on SSE3, MISALIGNSSE on SSE, LWP on XSAVE: Xen; LWP's state is XCR0 bit 62, so
#   it needs OSXSAVE as well.
_LEAF_E1_ECX = _table(
    0x80000001,
    0,
    "ecx",
    (
        _Row(0, "lahf_lm", "LAHF/SAHF in 64-bit mode", aliases="lahf lahf_sahf sahf"),
        _Row(1, "cmp_legacy", "Core multi-processing legacy mode", system=True),
        _Row(2, "svm", "Secure virtual machine (AMD-V)", system=True),
        _Row(3, "extapic", "Extended APIC register space", system=True),
        _Row(4, "cr8_legacy", "CR8 access in 32-bit mode", aliases="altmovcr8", system=True),
        _Row(5, "lzcnt", "LZCNT instruction", cpuinfo="abm", aliases="abm"),
        _Row(6, "sse4a", "SSE4a instructions", "sse3"),
        _Row(7, "misalignsse", "Misaligned SSE mode", "sse"),
        _Row(8, "3dnowprefetch", "PREFETCH/PREFETCHW instructions", aliases="prefetchw prfchw"),
        _Row(9, "osvw", "OS-visible workarounds", system=True),
        _Row(10, "ibs", "Instruction-based sampling", system=True),
        _Row(11, "xop", "XOP instructions", "avx"),
        _Row(12, "skinit", "SKINIT/STGI instructions", system=True),
        _Row(13, "wdt", "Watchdog timer", system=True),
        _Row(15, "lwp", "Lightweight profiling", "xsave osxsave"),
        _Row(16, "fma4", "FMA4 four-operand fused multiply-add", "avx"),
        _Row(17, "tce", "Translation cache extension", system=True),
        _Row(19, "nodeid_msr", "Node ID MSR", system=True),
        _Row(21, "tbm", "Trailing bit manipulation"),
        _Row(22, "topoext", "Topology extension leaves", system=True),
        _Row(23, "perfctr_core", "Core performance counter extensions", system=True),
        _Row(24, "perfctr_nb", "Northbridge performance counter extensions", system=True),
        _Row(26, "bpext", "Data breakpoint extension", aliases="dbext", system=True),
        _Row(27, "ptsc", "Performance time-stamp counter", system=True),
        _Row(28, "perfctr_llc", "Last-level-cache performance counter extensions", system=True),
        _Row(29, "mwaitx", "MONITORX/MWAITX instructions", aliases="monitorx"),
    ),
)

# -- leaf 80000001H EDX -------------------------------------------------------------------
# AMD APM vol. 3 appendix E; Intel defines only bits 11, 20, 26, 27 and 29. Linux word 1.
# AMD also mirrors 18 leaf-1 EDX bits here: see AMD_E1_EDX_MIRRORS below.
# MMXEXT on MMX: Linux and Xen. 3DNOW on MMX, 3DNOWEXT on 3DNOW, RDTSCP on TSC, NX and LM
# on PAE, FFXSR on FXSR: Xen (FFXSR on FXSR also Linux).
_LEAF_E1_EDX = _table(
    0x80000001,
    0,
    "edx",
    (
        _Row(11, "syscall", "SYSCALL/SYSRET instructions", aliases="sce"),
        _Row(20, "nx", "No-execute page protection", "pae", aliases="xd"),
        _Row(22, "mmxext", "AMD MMX extensions", "mmx"),
        _Row(25, "fxsr_opt", "Fast FXSAVE/FXRSTOR", "fxsr", aliases="ffxsr"),
        _Row(26, "pdpe1gb", "1 GiB pages", aliases="gbpages page1gb", system=True),
        _Row(27, "rdtscp", "RDTSCP instruction", "tsc"),
        _Row(29, "lm", "Long mode (x86-64)", "pae"),
        _Row(30, "3dnowext", "AMD 3DNow! extensions", "3dnow"),
        _Row(31, "3dnow", "AMD 3DNow!", "mmx"),
    ),
)

# -- leaf 80000008H EBX -------------------------------------------------------------------
# AMD APM vol. 3 appendix E (Fn8000_0008_EBX); Linux word 13. The speculation-control
# bits of this register are left out. CLZERO on CLFLUSH and the FP error-pointer bit on
# FPU: Xen.
_LEAF_E8_EBX = _table(
    0x80000008,
    0,
    "ebx",
    (
        _Row(0, "clzero", "CLZERO instruction", "clflush"),
        _Row(1, "irperf", "Instructions-retired counter MSR"),
        _Row(2, "xsaveerptr", "x87 error pointers always saved", "fpu", aliases="rstr_fp_err_ptrs"),
        _Row(4, "rdpru", "RDPRU instruction"),
        _Row(9, "wbnoinvd", "WBNOINVD instruction"),
    ),
)

FEATURES: tuple[CpuidFeature, ...] = (
    *_LEAF1_EDX,
    *_LEAF1_ECX,
    *_LEAF6_EAX,
    *_LEAF7_EBX,
    *_LEAF7_ECX,
    *_LEAF7_EDX,
    *_LEAF7_1_EAX,
    *_LEAF7_1_EDX,
    *_LEAFD_1_EAX,
    *_LEAF14_EBX,
    *_LEAF19_EBX,
    *_LEAF24_EBX,
    *_LEAF24_1_ECX,
    *_LEAF_E1_ECX,
    *_LEAF_E1_EDX,
    *_LEAF_E8_EBX,
)

SYSTEM_FEATURES: frozenset[str] = frozenset(f.name for f in FEATURES if f.system)

# AMD processors repeat these leaf-1 EDX bits at the same positions of CPUID 80000001H EDX
# (AMD APM vol. 3, Fn8000_0001_EDX; Xen's common_1d set). Intel leaves them zero. A view
# that hides one of these features must clear both places: see `locations`.
AMD_E1_EDX_MIRRORS: Mapping[str, int] = {
    name: bit
    for bit, name in (
        (0, "fpu"),
        (1, "vme"),
        (2, "de"),
        (3, "pse"),
        (4, "tsc"),
        (5, "msr"),
        (6, "pae"),
        (7, "mce"),
        (8, "cx8"),
        (9, "apic"),
        (12, "mtrr"),
        (13, "pge"),
        (14, "mca"),
        (15, "cmov"),
        (16, "pat"),
        (17, "pse36"),
        (23, "mmx"),
        (24, "fxsr"),
    )
}

# Leaves that exist only to describe one feature; when that feature is hidden the whole
# leaf (every sub-leaf) must read as zero. KVM's cpuid.c does the same for 0x14, 0x1D,
# 0x1E and 0x24; the rest follow the SDM's "leaf NNH is valid if CPUID.(...)[bit]" notes.
LEAF_OWNERS: Mapping[int, str] = {
    0x0F: "cqm",  # RDT monitoring enumeration
    0x10: "rdt_a",  # RDT allocation enumeration
    0x12: "sgx",  # SGX capability and EPC sections
    0x14: "intel_pt",  # Processor Trace enumeration
    0x19: "kl",  # Key Locker
    0x1B: "pconfig",  # PCONFIG targets
    0x1C: "arch_lbr",  # architectural LBR
    0x1D: "amx_tile",  # tile information (palettes)
    0x1E: "amx_tile",  # TMUL information
    0x20: "hreset",  # processor history reset
    0x23: "arch_perfmon_ext",  # architectural performance monitoring extension
    0x24: "avx10",  # AVX10 converged vector ISA
    0x29: "apx_f",  # APX sub-features (APX spec; KVM CPUID_29_0_EBX)
}


def _cumulative(*steps: str) -> tuple[tuple[str, ...], ...]:
    levels: list[tuple[str, ...]] = []
    acc: tuple[str, ...] = ()
    for step in steps:
        acc = (*acc, *step.split())
        levels.append(acc)
    return tuple(levels)


# The x86-64 psABI micro-architecture levels, lowest first.
LEVEL_NAMES = ("x86-64-v1", "x86-64-v2", "x86-64-v3", "x86-64-v4")

# x86-64 psABI micro-architecture levels, cumulative. The psABI baseline also lists
# OSFXSR, an OS setting with no CPUID bit; SCE is SYSCALL. v3 lists OSXSAVE.
PSABI_LEVELS: Mapping[str, tuple[str, ...]] = dict(
    zip(
        LEVEL_NAMES,
        _cumulative(
            "cmov cx8 fpu fxsr mmx syscall sse sse2",
            "cx16 lahf_lm popcnt sse3 sse4_1 sse4_2 ssse3",
            "avx avx2 bmi1 bmi2 f16c fma lzcnt movbe osxsave",
            "avx512f avx512bw avx512cd avx512dq avx512vl",
        ),
    )
)

# What glibc's loader actually tests (get-isa-level.h): the psABI lists without SYSCALL
# and without OSXSAVE (glibc folds OSXSAVE into "AVX usable", as `avx` requires here).
GLIBC_ISA_LEVELS: Mapping[str, tuple[str, ...]] = dict(
    zip(
        LEVEL_NAMES,
        _cumulative(
            "cmov cx8 fpu fxsr mmx sse sse2",
            "cx16 lahf_lm popcnt sse3 sse4_1 sse4_2 ssse3",
            "avx avx2 bmi1 bmi2 f16c fma lzcnt movbe",
            "avx512f avx512bw avx512cd avx512dq avx512vl",
        ),
    )
)


def _build_by_name() -> dict[str, CpuidFeature]:
    table: dict[str, CpuidFeature] = {}
    for f in FEATURES:
        table.setdefault(f.name, f)
    for f in FEATURES:
        for alias in f.aliases:
            table.setdefault(alias, f)
    return table


BY_NAME: Mapping[str, CpuidFeature] = _build_by_name()  # canonical names and aliases

_CANONICAL: Mapping[str, CpuidFeature] = {f.name: f for f in FEATURES}


def _build_dependents_of() -> dict[str, tuple[str, ...]]:
    reverse: dict[str, list[str]] = {f.name: [] for f in FEATURES}
    for f in FEATURES:
        for req in f.requires:
            reverse.setdefault(req, []).append(f.name)
    return {name: tuple(users) for name, users in reverse.items()}


_DEPENDENTS_OF: Mapping[str, tuple[str, ...]] = _build_dependents_of()


# -- lookups ------------------------------------------------------------------------------


def normalize_name(name: str) -> str:
    """The spelling BY_NAME is keyed on: lower case, '-' as '_' ("AMX-TILE" -> "amx_tile")."""
    return name.strip().lower().replace("-", "_")


def feature(name: str) -> CpuidFeature:
    """The feature called `name` (canonical name or alias, any case; "sse4.1" works).

    Raises KeyError carrying `name` when nothing matches.
    """
    key = normalize_name(name)
    found = BY_NAME.get(key)
    if found is None:
        found = BY_NAME.get(key.replace(".", "_"))
    if found is None:
        raise KeyError(name)
    return found


def canonical(name: str) -> str:
    """The canonical name of `name` (KeyError if unknown)."""
    return feature(name).name


def present_in(table: CpuidTable, among: Iterable[str] | None = None) -> frozenset[str]:
    """The features whose bit is set in `table` (at their own location, not AMD's
    mirror); only those `among` (canonical names) when given."""
    pool = FEATURES if among is None else [_CANONICAL[name] for name in among]
    return frozenset(f.name for f in pool if table.has_bit(*f.location))


def locations(name: str) -> tuple[Location, ...]:
    """Every place the bit of `name` appears: its own, plus AMD's 80000001H EDX mirror."""
    f = feature(name)
    mirror = AMD_E1_EDX_MIRRORS.get(f.name)
    if mirror is None:
        return (f.location,)
    return (f.location, (0x80000001, 0, "edx", mirror))


# -- the dependency graph -----------------------------------------------------------------


# Closures already walked. A dict, not functools.lru_cache: functools (with collections)
# would be one more import at start-up. A process asks for a few; the bound is a guard.
_CLOSURES: dict[tuple[frozenset[str], bool], frozenset[str]] = {}


def _closure(start: frozenset[str], downward: bool) -> frozenset[str]:
    found = _CLOSURES.get((start, downward))
    if found is None:
        if len(_CLOSURES) >= 256:
            _CLOSURES.clear()
        found = _CLOSURES[(start, downward)] = _walk(start, downward)
    return found


def _walk(start: frozenset[str], downward: bool) -> frozenset[str]:
    seen = set(start)
    todo = list(start)
    while todo:
        name = todo.pop()
        nexts = _DEPENDENTS_OF.get(name, ()) if downward else _CANONICAL[name].requires
        for other in nexts:
            if other not in seen:
                seen.add(other)
                todo.append(other)
    return frozenset(seen)


def dependents(hidden: Iterable[str]) -> frozenset[str]:
    """Every feature that transitively requires one of `hidden`, the hidden ones included.

    Names may be aliases; the result holds canonical names. KeyError for unknown names.
    """
    return _closure(frozenset(canonical(n) for n in hidden), True)


def prerequisites(names: Iterable[str]) -> frozenset[str]:
    """Every feature `names` transitively require, `names` included (canonical names)."""
    return _closure(frozenset(canonical(n) for n in names), False)


# What a running 64-bit Linux program already depends on to be executing at all, so no
# view may hide it, whatever a mask, a level or a profile leaves out: long mode, SYSCALL
# (every 64-bit system call), and what an x86-64 kernel refuses to boot without
# (arch/x86/include/asm/required-features.h, CONFIG_X86_64: FPU, MSR, PAE, CX8, FXSR,
# CMOV, XMM, XMM2, LM; PSE and PGE only when not paravirtualized, so left out), with all
# they require. SSE2 is also the psABI baseline every x86-64 program is compiled for.
RUNNING_64BIT: frozenset[str] = prerequisites(
    ["lm", "syscall", "fpu", "msr", "pae", "cx8", "fxsr", "cmov", "sse", "sse2"]
)


def hideable(names: Iterable[str]) -> frozenset[str]:
    """`names` (canonical) without what a running 64-bit program depends on: the roots a
    view may hide. Take `dependents` of the result, never the other way round, or a
    feature that needs a kept one (NX on PAE) would be hidden with it."""
    return frozenset(canonical(n) for n in names) - RUNNING_64BIT


def register_masks(names: Iterable[str]) -> dict[tuple[int, int, Register], int]:
    """The bits of exactly `names` (no closure), grouped by (leaf, subleaf, register).

    Pass `dependents(hidden)` to get the bits a consistent view must clear.
    """
    masks: dict[tuple[int, int, Register], int] = {}
    for name in names:
        for leaf, subleaf, register, bit in locations(name):
            masks[(leaf, subleaf, register)] = masks.get((leaf, subleaf, register), 0) | 1 << bit
    return masks


def owned_leaves(names: Iterable[str]) -> frozenset[int]:
    """The LEAF_OWNERS leaves that must read as zero when `names` are hidden (no closure)."""
    gone = {canonical(n) for n in names}
    return frozenset(leaf for leaf, owner in LEAF_OWNERS.items() if owner in gone)


def psabi_level(
    visible: Iterable[str], levels: Mapping[str, tuple[str, ...]] | None = None
) -> str | None:
    """The highest level (of PSABI_LEVELS, or `levels`) whose features are all visible."""
    have = {canonical(n) for n in visible}
    best = None
    for level, needed in (PSABI_LEVELS if levels is None else levels).items():
        if not have.issuperset(needed):
            break
        best = level
    return best


# -- self-check ---------------------------------------------------------------------------

_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_")


def _find_cycle() -> list[str] | None:
    """One dependency cycle as a path (first name repeated at the end), or None."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(_CANONICAL, white)
    for root in _CANONICAL:
        if colour[root] != white:
            continue
        path = [root]
        stack = [iter(_CANONICAL[root].requires)]
        colour[root] = grey
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                colour[path.pop()] = black
                stack.pop()
                continue
            if nxt not in colour:
                continue  # unknown names are reported separately
            if colour[nxt] == grey:
                return [*path[path.index(nxt) :], nxt]
            if colour[nxt] == white:
                colour[nxt] = grey
                path.append(nxt)
                stack.append(iter(_CANONICAL[nxt].requires))
    return None


def _check_rows() -> list[str]:
    problems: list[str] = []
    seen_names: set[str] = set()
    seen_at: dict[Location, str] = {}
    for f in FEATURES:
        if not f.name or not set(f.name) <= _NAME_CHARS:
            problems.append(f"{f.name!r}: name must be lower-case letters, digits and '_'")
        if f.name in seen_names:
            problems.append(f"{f.name}: defined twice")
        seen_names.add(f.name)
        if f.register not in REGISTERS:
            problems.append(f"{f.name}: unknown register {f.register!r}")
        if not 0 <= f.bit <= 31 or f.leaf < 0 or f.subleaf < 0:
            problems.append(f"{f.name}: bad location {f.location}")
        if f.location in seen_at:
            problems.append(f"{f.name}: same bit as {seen_at[f.location]} at {f.location}")
        seen_at.setdefault(f.location, f.name)
        if f.cpuinfo == f.name:
            problems.append(f"{f.name}: cpuinfo equals the name; use None")
        if f.cpuinfo and BY_NAME.get(f.cpuinfo) is not f:
            problems.append(f"{f.name}: cpuinfo spelling {f.cpuinfo!r} is not an alias of it")
        for req in f.requires:
            if req == f.name:
                problems.append(f"{f.name}: requires itself")
            elif req not in _CANONICAL:
                problems.append(f"{f.name}: requires unknown feature {req!r}")
        if len(set(f.requires)) != len(f.requires):
            problems.append(f"{f.name}: repeated prerequisite")
    for name, bit in AMD_E1_EDX_MIRRORS.items():
        where: Location = (0x80000001, 0, "edx", bit)
        if name not in _CANONICAL:
            problems.append(f"AMD mirror names unknown feature {name!r}")
        elif where in seen_at:
            problems.append(f"AMD mirror of {name} collides with {seen_at[where]} at {where}")
        seen_at.setdefault(where, name)
    return problems


def _check_aliases() -> list[str]:
    problems: list[str] = []
    owner: dict[str, str] = {f.name: f.name for f in FEATURES}
    for f in FEATURES:
        for alias in f.aliases:
            if alias != alias.lower() or " " in alias:
                problems.append(f"{f.name}: alias {alias!r} must be lower case, no spaces")
            if alias == f.name:
                problems.append(f"{f.name}: alias {alias!r} repeats its own name")
            # Both the alias and the spelling `feature()` falls back to must be unambiguous.
            for spelling in {alias, normalize_name(alias).replace(".", "_")}:
                other = owner.setdefault(spelling, f.name)
                if other != f.name:
                    problems.append(f"{f.name}: alias {alias!r} already names {other}")
    return problems


def _check_tables() -> list[str]:
    problems: list[str] = []
    for leaf, owner in LEAF_OWNERS.items():
        if owner not in _CANONICAL:
            problems.append(f"LEAF_OWNERS[{leaf:#x}] names unknown feature {owner!r}")
            continue
        for f in FEATURES:
            if f.leaf == leaf and owner not in prerequisites([f.name]):
                problems.append(f"{f.name} lives in leaf {leaf:#x} but does not require {owner}")
    for title, levels in (("PSABI_LEVELS", PSABI_LEVELS), ("GLIBC_ISA_LEVELS", GLIBC_ISA_LEVELS)):
        previous: tuple[str, ...] = ()
        for level, names in levels.items():
            unknown = sorted(set(names) - set(_CANONICAL))
            if unknown:
                problems.append(f"{title}[{level}] names unknown features {unknown}")
            if not set(previous) <= set(names):
                problems.append(f"{title}[{level}] is not cumulative")
            if len(set(names)) != len(names):
                problems.append(f"{title}[{level}] repeats a feature")
            previous = names
    return problems


def check_graph() -> list[str]:
    """Problems with the tables: unknown names, cycles, clashing bits or aliases, ..."""
    problems = _check_rows() + _check_aliases()
    cycle = _find_cycle()
    if cycle:
        problems.append("dependency cycle: " + " -> ".join(cycle))
    else:
        problems.extend(_check_tables())  # these walk the graph, so need it acyclic
    return problems


if __name__ == "__main__":
    found = check_graph()
    print("check_graph():", found if found else "no problems")
    counts: dict[tuple[int, int, str], int] = {}
    for f in FEATURES:
        counts[(f.leaf, f.subleaf, f.register)] = counts.get((f.leaf, f.subleaf, f.register), 0) + 1
    for (leaf, subleaf, register), n in sorted(counts.items()):
        print(f"  leaf {leaf:#010x}.{subleaf} {register}: {n}")
    print(f"  {len(FEATURES)} features, {len(BY_NAME)} names, {len(LEAF_OWNERS)} owned leaves")
    if found:
        raise SystemExit(1)
