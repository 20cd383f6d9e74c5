"""Where --profile values come from and --dump-cpuid goes: profile files, and the
reference profiles shipped with xcr0run (psABI levels and CPU generations).

The formats themselves are parsed by profiles.py, which does no I/O.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from xcr0run import cpuid, features, host
from xcr0run.errors import Xcr0runError
from xcr0run.view import LEVELS, level_restriction

if TYPE_CHECKING:
    from xcr0run.profiles import CpuidProfile

_PROFILE_DIR = os.path.join(os.path.dirname(__file__), "profiles")


def reference_profiles() -> list[str]:
    """Names --profile accepts besides files: psABI levels and shipped CPU generations."""
    shipped = (f[:-5] for f in os.listdir(_PROFILE_DIR) if f.endswith(".json"))
    return [*LEVELS, *sorted(shipped)]


def load_profile(name: str) -> CpuidProfile:
    from xcr0run import profiles

    if name in LEVELS:
        # The psABI's list, long mode and NX, and all they need (OSXSAVE needs XSAVE).
        needed = features.prerequisites([*features.PSABI_LEVELS[name], "lm", "nx"])
        table = profiles.table_from_features(sorted(needed))
        source = f"the x86-64 psABI's list for {name}"
        return profiles.CpuidProfile(name, table, level_restriction(name)[0], source)
    path, shown = name, name
    shipped = os.path.join(_PROFILE_DIR, f"{name}.json")
    if not os.path.exists(path) and os.path.exists(shipped):
        path = shipped
    try:
        with open(path) as f:
            # Bounded: a profile is a few KiB, and /dev/zero or a huge file is not one.
            text = f.read(_PROFILE_LIMIT + 1)
    except (OSError, UnicodeDecodeError) as err:
        if isinstance(err, UnicodeDecodeError):
            raise Xcr0runError(f"cannot read profile {name}: not a text file") from err
        known = ", ".join(reference_profiles())
        raise Xcr0runError(
            f"cannot read profile {name}: {err.strerror} (built in: {known})"
        ) from err
    if len(text) > _PROFILE_LIMIT:
        raise Xcr0runError(
            f"cannot read profile {name}: longer than {_PROFILE_LIMIT >> 20} MiB, not a profile"
        )
    return profiles.parse(text, shown)


_PROFILE_LIMIT = 4 << 20


def dump_cpuid() -> dict[str, Any]:
    """This machine's whole CPUID table, XCR0 and the kernel's view, as a profile."""
    from xcr0run import profiles

    table = host.full_cpuid_table()
    xcomp = host.xcomp()
    kernel = {
        "xcomp_supported": None if xcomp.supported is None else f"{xcomp.supported:#x}",
        "xcomp_permitted": None if xcomp.permitted is None else f"{xcomp.permitted:#x}",
        "release": os.uname().release,
    }
    return profiles.dump(table, host.xcr0(), kernel, cpuid.brand(table) or cpuid.vendor(table))
