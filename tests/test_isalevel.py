"""ISA-level markers (GNU property notes) read from real files, and the refusal."""

from __future__ import annotations

import os
import subprocess

import pytest

from xcr0run import isalevel, launcher
from xcr0run.errors import UnsupportedError


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def test_interpreter_of_a_dynamic_program() -> None:
    assert isalevel.interpreter(_read("/bin/true")) == "/lib64/ld-linux-x86-64.so.2"


def test_marker_agrees_with_readelf(cbuild) -> None:
    path = cbuild("isa_v4.c", "-Wl,-z,x86-64-v4")
    notes = subprocess.run(["readelf", "-n", path], capture_output=True, text=True).stdout
    if "x86 ISA needed" not in notes:
        pytest.skip("this linker does not write ISA-level markers (binutils < 2.36)")
    assert "x86-64-v4" in notes
    assert isalevel.needed_level(_read(path)) == "x86-64-v4"


def test_unmarked_and_non_elf_files() -> None:
    assert isalevel.needed_level(b"#!/bin/sh\n") is None
    assert isalevel.interpreter(b"") is None


def test_refuses_a_view_below_what_the_program_needs(cbuild) -> None:
    path = cbuild("isa_v4.c", "-Wl,-z,x86-64-v4")
    if isalevel.needed_level(_read(path)) != "x86-64-v4":
        pytest.skip("no ISA-level marker written")
    with pytest.raises(UnsupportedError, match="needs x86-64-v4 but the view is x86-64-v3"):
        launcher.check_isa_level(path, "x86-64-v3")
    launcher.check_isa_level(path, "x86-64-v4")


def test_libc_needs_at_least_baseline() -> None:
    needs = launcher.isa_needs("/bin/true")
    if not needs:
        pytest.skip("this distribution's libc carries no ISA-level marker")
    with pytest.raises(UnsupportedError, match="CPU ISA level is lower than required"):
        launcher.check_isa_level("/bin/true", None)


def _loader_and_libc() -> list[str]:
    loader = os.path.realpath("/lib64/ld-linux-x86-64.so.2")
    libc = os.path.join(os.path.dirname(loader), "libc.so.6")
    return ["/bin/true", loader, *([libc] if os.path.exists(libc) else [])]


@pytest.mark.parametrize("path", _loader_and_libc())
def test_examine_reads_only_the_headers_and_the_parts_it_needs(path: str) -> None:
    """Found as the whole file would have it, reading a few KiB: libc.so.6 has its
    PT_INTERP 1.7 MB in, and reading up to it cost most of a launch's own work."""
    whole = _read(path)
    asked: list[int] = []

    def read(offset: int, size: int) -> bytes:
        asked.append(size)
        return whole[offset : offset + size]

    found = isalevel.examine(whole[:4096], read)
    assert found == (isalevel.interpreter(whole), isalevel.needed_level(whole))
    assert sum(asked) < 4096
