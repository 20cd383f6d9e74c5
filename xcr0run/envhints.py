"""Library knobs that agree with a view: the environment variables that libraries read
themselves to choose CPU code paths, so that they follow the view even where CPUID is not
trapped. Values the user already set are never overwritten; list-valued knobs
(GLIBC_TUNABLES, GODEBUG) are merged, the user's items first and winning.

Knob names and values from each project's documentation: glibc manual "Hardware
Capability Tunables" (glibc.cpu.hwcaps, names as in sysdeps/x86/cpu-tunables.c); NumPy
"CPU/SIMD Optimizations" (NPY_DISABLE_CPU_FEATURES); OpenSSL OPENSSL_ia32cap(3);
oneMKL "Instruction Set Specific Dispatching" (MKL_ENABLE_INSTRUCTIONS); oneDNN "CPU
Dispatcher Control" (ONEDNN_MAX_CPU_ISA); Go internal/cpu (GODEBUG cpu.X=off); .NET
runtime configuration knobs (DOTNET_EnableX=0). Pure module.
"""

from __future__ import annotations

from xcr0run import features

TYPE_CHECKING = False  # on the launch path with --env-hints: typing costs start-up time
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

_GLIBC = {
    "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "fma4": "FMA4", "bmi1": "BMI1", "bmi2": "BMI2",
    "lzcnt": "LZCNT", "movbe": "MOVBE", "popcnt": "POPCNT", "sse4_1": "SSE4_1",
    "sse4_2": "SSE4_2", "ssse3": "SSSE3", "f16c": "F16C", "avx512f": "AVX512F",
    "avx512cd": "AVX512CD", "avx512bw": "AVX512BW", "avx512dq": "AVX512DQ",
    "avx512er": "AVX512ER", "avx512pf": "AVX512PF", "avx512vl": "AVX512VL",
    "avx512_fp16": "AVX512_FP16", "avx_vnni": "AVX_VNNI", "xsavec": "XSAVEC", "rtm": "RTM",
}  # fmt: skip
_NUMPY = {
    "ssse3": "SSSE3", "sse4_1": "SSE41", "sse4_2": "SSE42", "popcnt": "POPCNT", "avx": "AVX",
    "f16c": "F16C", "fma": "FMA3", "fma4": "FMA4", "xop": "XOP", "avx2": "AVX2",
    "avx512f": "AVX512F", "avx512cd": "AVX512CD", "avx512vl": "AVX512VL",
    "avx512bw": "AVX512BW", "avx512dq": "AVX512DQ", "avx512_vnni": "AVX512VNNI",
    "avx512ifma": "AVX512IFMA", "avx512vbmi": "AVX512VBMI", "avx512_vbmi2": "AVX512VBMI2",
    "avx512_bitalg": "AVX512BITALG", "avx512_vpopcntdq": "AVX512VPOPCNTDQ",
    "avx512_fp16": "AVX512FP16", "avx512er": "AVX512ER", "avx512pf": "AVX512PF",
}  # fmt: skip
# NumPy's named groups of AVX-512 features (NumPy < 2.4) go with AVX512F.
_NUMPY_AVX512_GROUPS = ("AVX512_KNL", "AVX512_KNM", "AVX512_SKX", "AVX512_CLX", "AVX512_CNL")
# NumPy >= 2.4 dispatches on groups: the psABI levels, then two AVX-512 generations, each
# needing the one before. A group goes when any feature it adds is hidden.
_NUMPY_GROUPS = (
    ("X86_V2", tuple(features.PSABI_LEVELS["x86-64-v2"])),
    ("X86_V3", tuple(features.PSABI_LEVELS["x86-64-v3"])),
    ("X86_V4", tuple(features.PSABI_LEVELS["x86-64-v4"])),
    ("AVX512_ICL", ("avx512_vbmi2", "avx512_bitalg", "avx512_vpopcntdq", "avx512_vnni",
                    "avx512ifma", "avx512vbmi", "gfni", "vaes", "vpclmulqdq")),
    ("AVX512_SPR", ("avx512_fp16",)),
)  # fmt: skip
_GO = {
    "aes": "aes", "adx": "adx", "avx": "avx", "avx2": "avx2", "bmi1": "bmi1", "bmi2": "bmi2",
    "erms": "erms", "fma": "fma", "pclmulqdq": "pclmulqdq", "popcnt": "popcnt",
    "rdtscp": "rdtscp", "sha_ni": "sha", "sse3": "sse3", "sse4_1": "sse41", "sse4_2": "sse42",
    "ssse3": "ssse3", "avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl",
}  # fmt: skip
_DOTNET = {
    "sse3": "SSE3", "ssse3": "SSSE3", "sse4_1": "SSE41", "sse4_2": "SSE42", "popcnt": "POPCNT",
    "avx": "AVX", "avx2": "AVX2", "fma": "FMA", "bmi1": "BMI1", "bmi2": "BMI2",
    "lzcnt": "LZCNT", "movbe": "MOVBE", "avx_vnni": "AVXVNNI", "avx512f": "AVX512F",
    "avx512bw": "AVX512BW", "avx512cd": "AVX512CD", "avx512dq": "AVX512DQ",
    "avx512vbmi": "AVX512VBMI", "aes": "AES", "pclmulqdq": "PCLMULQDQ",
}  # fmt: skip


class EnvHint:
    __slots__ = ("merged", "name", "value")

    def __init__(self, name: str, value: str, merged: bool = False) -> None:
        self.name = name
        self.value = value
        self.merged = merged  # the user's value was kept and ours appended

    def __eq__(self, other: object) -> bool:
        return isinstance(other, EnvHint) and (self.name, self.value, self.merged) == (
            other.name,
            other.value,
            other.merged,
        )

    def __hash__(self) -> int:
        return hash((self.name, self.value, self.merged))

    def __repr__(self) -> str:
        return f"EnvHint({self.name!r}, {self.value!r}, merged={self.merged})"


def _mkl(hidden: frozenset[str]) -> str | None:
    if "avx" in hidden:
        return "SSE4_2"
    if "avx2" in hidden:
        return "AVX"
    if "avx512f" in hidden:
        return "AVX2"
    return None


def _onednn(hidden: frozenset[str]) -> str | None:
    if "avx" in hidden:
        return "SSE41"
    if "avx2" in hidden:
        return "AVX"
    if "avx512f" in hidden:
        return "AVX2_VNNI" if "avx_vnni" not in hidden else "AVX2"
    if "amx_tile" in hidden:
        return "AVX512_CORE_FP16"
    return None


def _openssl(cleared: Callable[[int, int], tuple[int, int, int, int]]) -> str | None:
    """OPENSSL_ia32cap: word 0 is CPUID.1 EDX (low) and ECX (high), word 1 is
    CPUID.(7,0) EBX (low) and ECX (high); `~` clears the bits that follow."""
    _, _, ecx1, edx1 = cleared(1, 0)
    _, ebx7, ecx7, _ = cleared(7, 0)
    words = (edx1 | ecx1 << 32, ebx7 | ecx7 << 32)
    if not any(words):
        return None
    return ":".join(f"~{w:#x}" for w in words)


def _merge_list(current: str | None, ours: list[str], sep: str, key: Callable[[str], str]) -> str:
    """The user's items, then ours for the keys the user did not set."""
    mine = [item for item in (current or "").split(sep) if item]
    taken = {key(item) for item in mine}
    return sep.join(mine + [item for item in ours if key(item) not in taken])


def as_mapping(entries: list[bytes]) -> dict[str, str]:
    """What getenv sees in a raw environment: the first value of each name (bytes that
    are no UTF-8 kept as surrogates, as os.environ keeps them, so they survive a merge)."""
    env: dict[str, str] = {}
    for entry in entries:
        name, sep, value = entry.partition(b"=")
        if sep and name:
            env.setdefault(
                name.decode(errors="surrogateescape"), value.decode(errors="surrogateescape")
            )
    return env


def with_values(entries: list[bytes], values: dict[str, str]) -> list[bytes]:
    """`entries` with each name in `values` set as setenv(3) sets it: the first entry
    of that name changed in place, or a new one at the end; the rest left as they are.
    Surrogates (from as_mapping) go back to the bytes they stood for."""
    out = list(entries)
    for name, value in values.items():
        prefix = name.encode(errors="surrogateescape") + b"="
        entry = prefix + value.encode(errors="surrogateescape")
        at = next((i for i, e in enumerate(out) if e.startswith(prefix)), None)
        if at is None:
            out.append(entry)
        else:
            out[at] = entry
    return out


def env_hints(
    hidden: frozenset[str],
    cleared: Callable[[int, int], tuple[int, int, int, int]],
    env: Mapping[str, str],
) -> list[EnvHint]:
    """The knobs to set for a view hiding `hidden`; `cleared(leaf, subleaf)` gives the
    register bits the view clears. `env` is the environment they merge into."""
    out: list[EnvHint] = []

    def single(name: str, value: str | None) -> None:
        if value is not None and name not in env:
            out.append(EnvHint(name, value))

    glibc = [f"-{_GLIBC[f]}" for f in sorted(hidden) if f in _GLIBC]
    if glibc:
        current = env.get("GLIBC_TUNABLES")
        tunables = [t for t in (current or "").split(":") if t]
        hwcaps = next((t for t in tunables if t.startswith("glibc.cpu.hwcaps=")), None)
        if hwcaps is None:
            tunables.append("glibc.cpu.hwcaps=" + ",".join(glibc))
        else:
            items = _merge_list(hwcaps.split("=", 1)[1], glibc, ",", lambda i: i.lstrip("+-"))
            tunables[tunables.index(hwcaps)] = "glibc.cpu.hwcaps=" + items
        out.append(EnvHint("GLIBC_TUNABLES", ":".join(tunables), current is not None))
    numpy = [_NUMPY[f] for f in sorted(hidden) if f in _NUMPY]
    if "avx512f" in hidden:
        numpy += list(_NUMPY_AVX512_GROUPS)
    gone = False
    for group, needs in _NUMPY_GROUPS:
        gone = gone or bool(hidden & set(needs))
        if gone:
            numpy.append(group)
    if numpy:
        single("NPY_DISABLE_CPU_FEATURES", " ".join(numpy))
    single("OPENSSL_ia32cap", _openssl(cleared))
    single("MKL_ENABLE_INSTRUCTIONS", _mkl(hidden))
    single("ONEDNN_MAX_CPU_ISA", _onednn(hidden))
    go = [f"cpu.{_GO[f]}=off" for f in sorted(hidden) if f in _GO]
    if go:
        current = env.get("GODEBUG")
        merged = _merge_list(current, go, ",", lambda i: i.split("=", 1)[0])
        out.append(EnvHint("GODEBUG", merged, current is not None))
    for f in sorted(hidden):
        if f in _DOTNET:
            single(f"DOTNET_Enable{_DOTNET[f]}", "0")
    return out


LIMITS = (
    "knobs only steer libraries that read them; the program's own CPUID and xgetbv, "
    "and any library that reads no knob, still see every host feature"
)
