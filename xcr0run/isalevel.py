"""The x86-64 ISA level an ELF file declares it needs (GNU property notes).

glibc's loader aborts with "CPU ISA level is lower than required" when an object marks
GNU_PROPERTY_X86_ISA_1_NEEDED above what CPUID reports. Layout from the ELF gABI, the
"Linux Extensions to gABI" (GNU property notes) and the x86-64 psABI. Pure: bytes in.
"""

from __future__ import annotations

import struct

from xcr0run.features import LEVEL_NAMES  # ISA_1 bits, lowest first: baseline, v2, v3, v4

PT_INTERP = 3
PT_NOTE = 4
PT_GNU_PROPERTY = 0x6474E553
NT_GNU_PROPERTY_TYPE_0 = 5
GNU_PROPERTY_X86_ISA_1_NEEDED = 0xC0008002

TYPE_CHECKING = False  # typing's import costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from collections.abc import Callable

    Reader = Callable[[int, int], bytes]  # (offset, size) -> those bytes of the file


def _segments(elf: bytes) -> list[tuple[int, int, int]]:
    """(p_type, p_offset, p_filesz) of each program header of a 64-bit ELF file; none for
    anything else, truncated files included."""
    if len(elf) < 0x40 or elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        return []
    (phoff,) = struct.unpack_from("<Q", elf, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    out = []
    for i in range(phnum):
        at = phoff + i * phentsize
        if at + 56 > len(elf):
            break
        (p_type,) = struct.unpack_from("<I", elf, at)
        (p_offset,) = struct.unpack_from("<Q", elf, at + 8)
        (p_filesz,) = struct.unpack_from("<Q", elf, at + 32)
        out.append((p_type, p_offset, p_filesz))
    return out


def examine(head: bytes, read: Reader) -> tuple[str | None, str | None]:
    """(interpreter, needed level) of an ELF file whose start is `head`: its program
    headers must lie in it, and `read(offset, size)` gives the other parts asked for. So
    a caller reads a few hundred bytes where a note lies far into a file (glibc's
    libc.so.6 has its PT_INTERP 1.7 MB in)."""
    segments = _segments(head)
    return _interpreter(segments, read), _needed_level(segments, read)


def interpreter(elf: bytes) -> str | None:
    """The PT_INTERP path (the dynamic loader), if any."""
    return _interpreter(_segments(elf), lambda offset, size: elf[offset : offset + size])


def needed_level(elf: bytes) -> str | None:
    """The highest ISA level the file marks as needed, or None when it marks none."""
    return _needed_level(_segments(elf), lambda offset, size: elf[offset : offset + size])


def _interpreter(segments: list[tuple[int, int, int]], read: Reader) -> str | None:
    for p_type, offset, size in segments:
        if p_type == PT_INTERP:
            return read(offset, size).rstrip(b"\0").decode(errors="replace")
    return None


def _needed_level(segments: list[tuple[int, int, int]], read: Reader) -> str | None:
    notes = [s for s in segments if s[0] == PT_GNU_PROPERTY] or [
        s for s in segments if s[0] == PT_NOTE
    ]
    needed = 0
    for _, offset, size in notes:
        needed |= _isa_needed(read(offset, size))
    return LEVEL_NAMES[needed.bit_length() - 1] if needed else None


def _isa_needed(notes: bytes) -> int:
    at, found = 0, 0
    while at + 12 <= len(notes):
        namesz, descsz, ntype = struct.unpack_from("<III", notes, at)
        name_end = at + 12 + ((namesz + 3) & ~3)
        desc = notes[name_end : name_end + descsz]
        if ntype == NT_GNU_PROPERTY_TYPE_0 and notes[at + 12 : at + 12 + namesz] == b"GNU\0":
            p = 0
            while p + 8 <= len(desc):
                pr_type, pr_size = struct.unpack_from("<II", desc, p)
                if pr_type == GNU_PROPERTY_X86_ISA_1_NEEDED and pr_size >= 4:
                    found |= struct.unpack_from("<I", desc, p + 8)[0]
                p += 8 + ((pr_size + 7) & ~7)
        at = name_end + (
            (descsz + 7) & ~7 if ntype == NT_GNU_PROPERTY_TYPE_0 else (descsz + 3) & ~3
        )
    return found
