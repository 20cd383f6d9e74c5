#!/usr/bin/env python3
"""Run one command in a throw-away VM whose kernel offers CPUID faulting.

QEMU's TCG does not implement CPUID faulting (MSR_PLATFORM_INFO reads 0 and its
CPUID helper never faults), but it does emulate AMD SVM.  KVM inside a TCG guest
therefore works, and KVM emulates CPUID faulting for *its* guests on any vendor.
So this harness boots two levels:

  host --(qemu -accel tcg)--> L1 --(qemu -accel kvm, from the host's root)--> L2

Both levels boot the same Debian kernel and the same busybox initramfs; /init
picks its role from the kernel command line.  L2 sees the host's root filesystem
(9p, re-exported by L1) under a tmpfs overlay, so it is writable but nothing is
written back, runs the command there and stores its stdout, stderr and exit
status in a per-run "job" directory shared read-write with the host.

With --xcr0-kernel (xcr0_kernel=True) it boots one level instead: TCG running the
test kernel that has ARCH_SET_XCR0 (tests/kernel/build.sh: Debian's linux-source-6.1 plus
tests/kernel/arch-set-xcr0.patch, everything built in), straight into the role L2 has
above.  TCG emulates XSAVE, XSETBV and AVX, and raises #UD for AVX when XCR0 lacks it.

Usable as a module (run_in_guest, guest_available) or as a script:
    python3 tests/guest/run_in_guest.py [--cwd DIR] [--timeout S] [--xcr0-kernel] -- COMMAND ARGS...
tests/guest/setup.sh installs what it needs (with --xcr0-kernel, also builds that kernel).
"""

from __future__ import annotations

import argparse
import hashlib
import lzma
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

CACHE_DIR = Path(os.environ.get("XCR0RUN_GUEST_CACHE") or Path.home() / ".cache" / "xcr0run-guest")
XCR0_KERNEL_BUILD = Path(__file__).resolve().parent.parent / "kernel" / "build.sh"
BUSYBOX_CANDIDATES = ("/bin/busybox", "/usr/bin/busybox")

# Modules each level loads (dependencies are resolved from the .ko files).
# L1 needs KVM to run L2; L2 needs overlayfs for its writable root.
COMMON_MODULES = ("virtio_pci", "9pnet_virtio", "9p")
L1_MODULES = (*COMMON_MODULES, "kvm_amd")
L2_MODULES = (*COMMON_MODULES, "overlay")

# L1: TCG emulates the CPU.  "max" is AMD-flavoured, has SVM (so kvm_amd loads)
# and AVX2 but no AVX-512; MPX is dropped because KVM will not pass it on anyway.
L1_CPU = "max,-mpx"
L1_MEMORY = "2G"
L1_SMP = 2
# L2: KVM in L1.  Linux 6.1 only probes CPUID faulting on Intel CPUs
# (arch/x86/kernel/cpu/intel.c), so L2 is told it runs on one.  That makes its
# kernel use VMCALL for KVM hypercalls, which TCG's SVM mishandles (seen: an oops
# in kvm_kick_cpu), so the paravirt features that issue hypercalls are off.
L2_CPU = "host,vendor=GenuineIntel,kvm-pv-unhalt=off,kvm-pv-ipi=off,kvm-pv-sched-yield=off"
L2_MEMORY = "1G"
L2_SMP = 1
# The ARCH_SET_XCR0 kernel, one level under TCG.  Two CPUs, so that threads with
# different XCR0 values migrate and meet on each CPU.
XK_CPU = L1_CPU
XK_MEMORY = "2G"
XK_SMP = 2

KERNEL_CMDLINE = (
    "console=ttyS0 quiet panic=-1 mitigations=off random.trust_cpu=on cryptomgr.notests"
)
# Without ACPI the boot is shorter, but SeaBIOS's MP table then shows one CPU
# only, so only L2 (single CPU anyway) does without.
# No transparent huge pages in L1: khugepaged collapsing the memory of L2 (L1's qemu
# maps it MADV_HUGEPAGE) remaps pages under a running nested guest, and TCG's nested
# paging does not survive that reliably: seen in CI, khugepaged stuck for 1200 s in
# one boot, and L2 ending without a word mid-run (qemu exit 0, a triple fault) in the
# next two; L2 also ended twice under bench/loop200.sh.
L1_CMDLINE = f"{KERNEL_CMDLINE} transparent_hugepage=never xcr0run.role=l1"
L2_CMDLINE = f"{KERNEL_CMDLINE} acpi=off xcr0run.role=l2"
XK_CMDLINE = f"{KERNEL_CMDLINE} xcr0run.role=l2"  # the test kernel has no ACPI at all
NINEP_OPTS = "trans=virtio,version=9p2000.L,msize=512000"

# Rarely (a few per cent of boots) L2's vCPU spins in KVM before running its
# first instruction.  Boots that have not reached L2's /init by then are retried.
BOOT_TIMEOUT = 60.0
BOOT_ATTEMPTS = 3

DEFAULT_ENV = {
    "HOME": "/root",
    "LANG": "C.UTF-8",
    "USER": "root",
    "LOGNAME": "root",
    "SHELL": "/bin/sh",
    "TERM": "dumb",
}

# TCG's SVM does not intercept XSETBV, so KVM in L1 never learns the XCR0 that
# L2 sets: it reports the XSAVE size of XCR0=1 in CPUID 0xD and reloads XCR0=1
# on every VM entry.  L2's kernel then finds the sizes inconsistent and turns
# XSAVE (and with it AVX) off.  This LD_PRELOAD shim for L1's qemu starts each
# vCPU with XCR0 already set to everything CPUID 0xD offers, which is exactly
# what L2's kernel will write, so the two views agree.
XCR0_SHIM_SOURCE = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <linux/kvm.h>

static uint64_t guest_xcr0;

int ioctl(int fd, unsigned long req, ...) {
    static int (*real)(int, unsigned long, void *);
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!real) real = (int (*)(int, unsigned long, void *))dlsym(RTLD_NEXT, "ioctl");
    if (req == KVM_SET_CPUID2) {
        struct kvm_cpuid2 *c = arg;
        for (uint32_t i = 0; i < c->nent; i++)
            if (c->entries[i].function == 0xd && c->entries[i].index == 0)
                guest_xcr0 = ((uint64_t)c->entries[i].edx << 32) | c->entries[i].eax;
    } else if (req == KVM_SET_XCRS && guest_xcr0) {
        struct kvm_xcrs *x = arg;
        for (uint32_t i = 0; i < x->nr_xcrs; i++)
            if (x->xcrs[i].xcr == 0 && x->xcrs[i].value == 1) x->xcrs[i].value = guest_xcr0;
    }
    return real(fd, req, arg);
}
"""

# PID 1 of both levels.  /job/config.sh is written per run by _write_job().
# Both levels end with "reboot -f": qemu runs with -no-reboot, so that exits it.
INIT_SCRIPT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
up() { cut -d' ' -f1 /proc/uptime; }
role=l2
for arg in $(cat /proc/cmdline); do
    case "$arg" in xcr0run.role=*) role="${arg#*=}" ;; esac
done
for m in $(cat /lib/modules/$role.order); do
    insmod /lib/modules/$m.ko || echo "xcr0run: insmod $m failed"
done
O=@NINEP_OPTS@
mount -t 9p -o $O job /job || { echo "xcr0run: cannot mount job share"; reboot -f; }
. /job/config.sh

if [ "$role" = l1 ]; then
    # L1 only runs L2's qemu, from the host's root (read-only; L2's mounts live in /run).
    mount -t 9p -o $O,ro,cache=loose hostroot /newroot
    mount -t proc proc /newroot/proc
    mount -t sysfs sys /newroot/sys
    mount -t devtmpfs dev /newroot/dev
    mount -t tmpfs run /newroot/run
    mkdir -p /newroot/run/xcr0run/job
    mount --bind /job /newroot/run/xcr0run/job
    # Legacy virtio notifies by port I/O, which nested SVM exits handle much faster
    # than MMIO (python3 -c pass: 3.7 s instead of 5 s).
    L=disable-modern=on
    set -- -fsdev local,id=job,path=/run/xcr0run/job,security_model=none \
        -device virtio-9p-pci,fsdev=job,mount_tag=job,$L
    while read -r tag guest_path; do
        mkdir -p /newroot/run/xcr0run/$tag
        mount -t 9p -o $O $tag /newroot/run/xcr0run/$tag
        set -- "$@" -fsdev local,id=$tag,path=/run/xcr0run/$tag,security_model=none \
            -device virtio-9p-pci,fsdev=$tag,mount_tag=$tag,$L
    done < /job/shares
    echo "xcr0run: L1 up $(up)s"
    chroot /newroot /usr/bin/env -i LD_PRELOAD="$XCR0RUN_SHIM" "$XCR0RUN_QEMU" \
        -accel kvm -cpu "$XCR0RUN_L2_CPU" -m "$XCR0RUN_L2_MEMORY" -smp "$XCR0RUN_L2_SMP" \
        -M pc -nodefaults -no-user-config -display none -serial stdio -no-reboot \
        -kernel "$XCR0RUN_KERNEL" -initrd "$XCR0RUN_INITRD" -append "$XCR0RUN_CMDLINE" \
        -fsdev local,id=hostroot,path=/,security_model=none,readonly=on,multidevs=remap \
        -device virtio-9p-pci,fsdev=hostroot,mount_tag=hostroot,$L \
        "$@" </dev/null >/job/l2-console.log 2>&1
    echo "xcr0run: L2 qemu exit $? at $(up)s"
    reboot -f
fi

# L2: the host's root under a tmpfs overlay, so the command may write anywhere.
mkdir -p /lower /rw
mount -t 9p -o $O,ro,cache=loose hostroot /lower
mount -t tmpfs -o mode=0755 rw /rw
mkdir -p /rw/upper /rw/work
mount -t overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work overlay /newroot
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
mkdir -p /newroot/dev/pts /newroot/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts /newroot/dev/pts
mount -t tmpfs -o mode=1777 shm /newroot/dev/shm
mount -t tmpfs -o mode=0755 run /newroot/run
mkdir -p /newroot/run/xcr0run/job
mount --bind /job /newroot/run/xcr0run/job
while read -r tag guest_path; do
    mkdir -p "/newroot$guest_path"
    mount -t 9p -o $O $tag "/newroot$guest_path"
done < /job/shares
ip link set lo up
[ -n "$XCR0RUN_HOSTNAME" ] && hostname "$XCR0RUN_HOSTNAME"
echo "xcr0run: L2 up $(up)s"
: >/job/started
# The host watches this file's age: a guest whose kernel stops running (nested KVM under
# TCG wedges now and then, without a word) is told from a slow or hung command.
(while :; do up >/job/heartbeat; sleep 10; done) &
chroot /newroot /usr/bin/env -i /bin/sh /run/xcr0run/job/cmd.sh \
    </dev/null >/job/stdout 2>/job/stderr
echo $? >/job/rc.tmp && mv /job/rc.tmp /job/rc
echo "xcr0run: L2 command done $(up)s"
reboot -f
""".replace("@NINEP_OPTS@", NINEP_OPTS)


@dataclass(frozen=True)
class GuestResult:
    """Outcome of one guest run; returncode follows the shell (128+N: killed by signal N)."""

    returncode: int
    stdout: str
    stderr: str
    console: str  # both levels' kernel consoles and init's progress lines
    elapsed: float  # host wall-clock seconds, including any retried boots
    boot_seconds: float | None  # from the last boot's start until L2 started the command
    boots: int = 1  # boot attempts used (see BOOT_TIMEOUT)


class GuestError(RuntimeError):
    """The guest itself failed (did not boot, crashed, timed out). `output` is what the
    command had written to its stdout by then, for a caller that resumes where it was."""

    def __init__(self, message: str, console: str = "", output: str = "") -> None:
        tail = "\n".join(console.splitlines()[-40:])
        super().__init__(f"{message}\n--- console tail ---\n{tail}" if tail else message)
        self.console = console
        self.output = output


class GuestTimeout(GuestError):
    """The run did not finish within the timeout; the VM was killed."""


@dataclass(frozen=True)
class Kernel:
    version: str
    image: Path  # bzImage, or an ELF vmlinux QEMU boots through PVH
    modules: Path | None  # .../lib/modules/<version>; None: everything built in


def find_qemu() -> str | None:
    return shutil.which("qemu-system-x86_64")


def _version_key(version: str) -> list[tuple[int, int | str]]:
    # Natural sort, so 6.1.0-10 sorts after 6.1.0-9.
    return [(0, int(p)) if p.isdigit() else (1, p) for p in re.split(r"(\d+)", version) if p]


def find_kernel() -> Kernel | None:
    """Newest kernel with its modules: setup.sh's extraction first, then the host's."""
    for root in (CACHE_DIR / "kernel", Path("/")):
        found: list[Kernel] = []
        for image in root.glob("boot/vmlinuz-*"):
            version = image.name.removeprefix("vmlinuz-")
            for moddir in (root / "lib/modules" / version, root / "usr/lib/modules" / version):
                if (moddir / "kernel").is_dir() and os.access(image, os.R_OK):
                    found.append(Kernel(version, image, moddir))
                    break
        if found:
            return max(found, key=lambda k: _version_key(k.version))
    return None


def _find_busybox() -> Path | None:
    for candidate in BUSYBOX_CANDIDATES:
        path = Path(candidate)
        # A dynamically linked busybox cannot run in the initramfs (no libc there).
        if path.is_file() and b"ld-linux" not in path.read_bytes()[:4096]:
            return path
    return None


def guest_available() -> str | None:
    """None if run_in_guest() can work here, else a one-line reason why not."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "needs an x86_64 Linux host"
    if find_qemu() is None:
        return "qemu-system-x86_64 not found (run tests/guest/setup.sh)"
    if _find_busybox() is None:
        return "static busybox not found (install busybox-static; run tests/guest/setup.sh)"
    if shutil.which("gcc") is None or not Path("/usr/include/linux/kvm.h").is_file():
        return "gcc or /usr/include/linux/kvm.h missing (needed for the XCR0 shim)"
    kernel = find_kernel()
    if kernel is None:
        return f"no guest kernel in {CACHE_DIR / 'kernel'} (run tests/guest/setup.sh)"
    return _modules_missing(kernel)


def _modules_missing(kernel: Kernel) -> str | None:
    try:
        _resolve_modules(kernel, (*L1_MODULES, *L2_MODULES))
    except GuestError as exc:
        return str(exc).splitlines()[0]
    return None


def xcr0_kernel_dir() -> Path | None:
    """Where tests/kernel/build.sh keeps (or would keep) the ARCH_SET_XCR0 kernel."""
    if not XCR0_KERNEL_BUILD.is_file():
        return None
    proc = subprocess.run(["bash", str(XCR0_KERNEL_BUILD), "--key"], capture_output=True, text=True)
    return Path(proc.stdout.strip()) if proc.returncode == 0 else None


def find_xcr0_kernel() -> Kernel | None:
    """The built ARCH_SET_XCR0 kernel, or None if it has not been built."""
    directory = xcr0_kernel_dir()
    if directory is None or not (directory / "vmlinux").is_file():
        return None
    release = directory / "release"
    version = release.read_text().strip() if release.is_file() else "xcr0"
    return Kernel(version, directory / "vmlinux", None)


def xcr0_kernel_available(build: bool = False) -> str | None:
    """None if run_in_guest(xcr0_kernel=True) can work here, else why not.  With
    build=True a kernel that can be built is built first (minutes; see build.sh)."""
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        return "needs an x86_64 Linux host"
    if find_qemu() is None:
        return "qemu-system-x86_64 not found (run tests/guest/setup.sh --xcr0-kernel)"
    if _find_busybox() is None:
        return "static busybox not found (run tests/guest/setup.sh --xcr0-kernel)"
    if find_xcr0_kernel() is not None:
        return None
    if xcr0_kernel_dir() is None:
        return "linux-source-6.1 is not installed (run tests/guest/setup.sh --xcr0-kernel)"
    if not build:
        return "the ARCH_SET_XCR0 kernel is not built (run tests/kernel/build.sh)"
    proc = subprocess.run(["bash", str(XCR0_KERNEL_BUILD)], stdout=subprocess.PIPE)
    if proc.returncode != 0 or find_xcr0_kernel() is None:
        return f"tests/kernel/build.sh failed (exit {proc.returncode})"
    return None


# --- kernel modules -------------------------------------------------------------------


def _norm(name: str) -> str:
    return name.replace("-", "_")


def _module_index(kernel: Kernel) -> dict[str, Path]:
    index: dict[str, Path] = {}
    if kernel.modules is None:
        return index
    for path in (kernel.modules / "kernel").rglob("*.ko*"):
        if path.name.endswith((".ko", ".ko.xz")):
            index[_norm(path.name.split(".ko")[0])] = path
    if not index:
        raise GuestError(f"no kernel modules under {kernel.modules}")
    return index


def _module_bytes(path: Path) -> bytes:
    # busybox insmod wants plain ELF; Debian 13+ ships xz-compressed modules.
    data = path.read_bytes()
    return lzma.decompress(data) if path.name.endswith(".xz") else data


def _module_depends(data: bytes) -> list[str]:
    # The .modinfo section is a run of NUL-terminated "key=value" strings.
    match = re.search(rb"(?:^|\x00)depends=([^\x00]*)\x00", data)
    if not match or not match.group(1):
        return []
    return [_norm(d) for d in match.group(1).decode().split(",") if d]


def _resolve_modules(kernel: Kernel, wanted: Iterable[str]) -> list[tuple[str, bytes]]:
    """Wanted modules plus dependencies, dependencies first; built-ins are skipped."""
    if kernel.modules is None:
        return []  # everything is built in
    builtin_file = kernel.modules / "modules.builtin"
    builtin: set[str] = set()
    if builtin_file.is_file():
        builtin = {_norm(Path(p).name.split(".ko")[0]) for p in builtin_file.read_text().split()}
    index = _module_index(kernel)
    ordered: list[tuple[str, bytes]] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in index:
            raise GuestError(f"kernel {kernel.version} lacks module {name}")
        data = _module_bytes(index[name])
        for dep in _module_depends(data):
            visit(dep)
        ordered.append((name, data))

    for name in wanted:
        visit(_norm(name))
    return ordered


# --- cached artefacts: initramfs, uncompressed kernel, shim ---------------------------------


class _Cpio:
    """Minimal writer for the "newc" cpio format the kernel unpacks."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 1

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        raw_name = name.encode() + b"\x00"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(raw_name), 0)
        header = b"070701" + b"".join(b"%08x" % f for f in fields)
        self._ino += 1
        self._parts.append(header + raw_name + b"\x00" * (-(len(header) + len(raw_name)) % 4))
        self._parts.append(data + b"\x00" * (-len(data) % 4))

    def directory(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, executable: bool = False) -> None:
        self._entry(name, 0o100755 if executable else 0o100644, data)

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, 0o020600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _cached(prefix: str, key: str, suffix: str = "") -> tuple[Path, bool]:
    """Cache path for (prefix, key) and whether it exists; drops stale siblings."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    target = CACHE_DIR / f"{prefix}-{digest}{suffix}"
    if target.is_file():
        return target, True
    for stale in CACHE_DIR.glob(f"{prefix}-*{suffix}"):
        if stale.stat().st_mtime < time.time() - 3600:  # spare ones a running job may use
            stale.unlink(missing_ok=True)
    return target, False


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(tmp, mode)
    os.replace(tmp, path)  # concurrent builders race harmlessly


def _stamp(path: Path) -> str:
    st = path.stat()
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _build_initramfs(kernel: Kernel) -> Path:
    busybox = _find_busybox()
    if busybox is None:
        raise GuestError("static busybox not found")
    key = f"{INIT_SCRIPT}{L1_MODULES}{L2_MODULES}{_stamp(busybox)}{_stamp(kernel.image)}"
    target, exists = _cached("initramfs", key, ".cpio")
    if exists:
        return target
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules", "job", "newroot"):
        cpio.directory(d)
    cpio.chardev("dev/console", 5, 1)  # the kernel opens it for init's stdio
    cpio.file("bin/busybox", busybox.read_bytes(), executable=True)
    cpio.file("init", INIT_SCRIPT.encode(), executable=True)
    for name, data in _resolve_modules(kernel, L1_MODULES + L2_MODULES):
        cpio.file(f"lib/modules/{name}.ko", data)
    for role, wanted in (("l1", L1_MODULES), ("l2", L2_MODULES)):
        order = [name for name, _ in _resolve_modules(kernel, wanted)]
        cpio.file(f"lib/modules/{role}.order", ("\n".join(order) + "\n").encode())
    _atomic_write(target, cpio.finish())
    return target


def _decompress_payload(image: bytes) -> bytes | None:
    """The ELF vmlinux inside a bzImage (xz or gzip payload), or None."""
    for magic in (b"\xfd7zXZ\x00", b"\x1f\x8b\x08\x00"):
        offset = image.find(magic)
        while offset != -1:
            try:
                if magic.startswith(b"\xfd"):
                    data = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(image[offset:])
                else:
                    data = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(image[offset:])
            except (lzma.LZMAError, zlib.error):
                data = b""
            if data.startswith(b"\x7fELF"):
                return data
            offset = image.find(magic, offset + 1)
    return None


def _boot_image(kernel: Kernel) -> Path:
    """Prefer an uncompressed ELF kernel: QEMU boots it via PVH, which skips the
    in-guest decompression (seconds under TCG); fall back to the bzImage."""
    config = kernel.image.parent / f"config-{kernel.version}"
    if not config.is_file() or "CONFIG_PVH=y" not in config.read_text():
        return kernel.image
    target, exists = _cached("vmlinux", _stamp(kernel.image))
    if exists:
        return target
    data = _decompress_payload(kernel.image.read_bytes())
    if data is None:
        return kernel.image
    _atomic_write(target, data)
    return target


def _build_shim() -> Path:
    target, exists = _cached("xcr0shim", XCR0_SHIM_SOURCE, ".so")
    if exists:
        return target
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE_DIR) as tmp:
        src, out = Path(tmp) / "shim.c", Path(tmp) / "shim.so"
        src.write_text(XCR0_SHIM_SOURCE)
        cmd = ["gcc", "-O2", "-shared", "-fPIC", "-o", str(out), str(src), "-ldl"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise GuestError(f"building the XCR0 shim failed:\n{proc.stderr}")
        os.replace(out, target)
    return target


# --- one run -----------------------------------------------------------------------------


def _qemu_path_arg(path: str) -> str:
    return path.replace(",", ",,")  # QEMU's option syntax doubles literal commas


def _guest_path() -> str:
    entries = os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin").split(os.pathsep)
    # pyenv's shims are bash scripts costing seconds per call in the guest, so the
    # directory of the interpreter running this goes first: "python3" is then the
    # same interpreter, found directly.
    if any(e.endswith("/.pyenv/shims") for e in entries):
        bindir = os.path.dirname(sys.executable)
        entries = [bindir, *(e for e in entries if e != bindir)]
    return os.pathsep.join(entries)


def _guest_env(env: Mapping[str, str] | None) -> dict[str, str]:
    merged = {"PATH": _guest_path(), **DEFAULT_ENV}
    merged.update(env or {})
    for name in merged:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
            raise ValueError(f"invalid environment variable name: {name!r}")
    return merged


def _write_job(
    job: Path,
    argv: Sequence[str],
    cwd: str,
    env: Mapping[str, str],
    shares: Sequence[tuple[str, str]],
    qemu: str,
    image: Path,
    initrd: Path,
    shim: Path | None,  # None: one level, no L2 to start
) -> None:
    config = {
        "XCR0RUN_QEMU": qemu,
        "XCR0RUN_KERNEL": str(image),
        "XCR0RUN_INITRD": str(initrd),
        "XCR0RUN_SHIM": str(shim or ""),
        "XCR0RUN_CMDLINE": L2_CMDLINE,
        "XCR0RUN_L2_CPU": L2_CPU,
        "XCR0RUN_L2_MEMORY": L2_MEMORY,
        "XCR0RUN_L2_SMP": str(L2_SMP),
        "XCR0RUN_HOSTNAME": os.uname().nodename,
    }
    (job / "config.sh").write_text("".join(f"{k}={shlex.quote(v)}\n" for k, v in config.items()))
    (job / "shares").write_text("".join(f"{tag} {path}\n" for tag, path in shares))
    lines = ["# generated by run_in_guest.py"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f"cd {shlex.quote(cwd)} || exit 125")
    lines.append("exec " + " ".join(shlex.quote(a) for a in argv))
    (job / "cmd.sh").write_text("\n".join(lines) + "\n")


def _read(path: Path) -> str:
    return path.read_bytes().decode(errors="replace") if path.is_file() else ""


def _qemu_command(
    qemu: str,
    image: Path,
    initrd: Path,
    job: Path,
    shares: Sequence[tuple[str, str]],
    one_level: bool = False,
) -> list[str]:
    """The host's qemu: L1 of the nested guest, or (one_level) the ARCH_SET_XCR0 kernel."""
    cpu, memory, smp, cmdline = (
        (XK_CPU, XK_MEMORY, XK_SMP, XK_CMDLINE) if one_level
        else (L1_CPU, L1_MEMORY, L1_SMP, L1_CMDLINE)
    )  # fmt: skip
    cmd = [
        qemu,
        "-accel", "tcg",
        "-cpu", cpu,
        "-m", memory,
        "-smp", str(smp),
        "-M", "pc",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
        "-no-reboot",
        "-kernel", str(image),
        "-initrd", str(initrd),
        "-append", cmdline,
    ]  # fmt: skip
    fsdevs = [("hostroot", "/", ",readonly=on,multidevs=remap"), ("job", str(job), "")]
    fsdevs += [(tag, path, "") for tag, path in shares]
    for tag, path, extra in fsdevs:
        cmd += [
            "-fsdev",
            f"local,id={tag},path={_qemu_path_arg(path)},security_model=none{extra}",
            "-device",
            f"virtio-9p-pci,fsdev={tag},mount_tag={tag}",
        ]
    return cmd


def _boot_once(
    cmd: list[str], job: Path, console_path: Path, deadline: float
) -> tuple[str, float | None]:
    """Run L1 until it exits.  Returns "done", "stalled" (L2 never started the
    command), "lockup" (L1's CPU running L2 hung), "silent" (L2's kernel stopped
    running: no heartbeat) or "timeout", and the seconds it took L2 to start the command."""
    start = time.monotonic()
    started: float | None = None
    checked = start
    with open(console_path, "wb") as console:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=console)
        try:
            while proc.poll() is None:
                now = time.monotonic()
                if started is None and (job / "started").exists():
                    started = now - start
                if now > deadline:
                    return "timeout", started
                if started is None and now > start + BOOT_TIMEOUT:
                    return "stalled", started
                if now > checked + 5:
                    checked = now
                    if _l1_locked_up(console_path):
                        return "lockup", started
                    if started is not None and _heartbeat_age(job) > HEARTBEAT_SECONDS:
                        return "silent", started
                time.sleep(0.05)
            return "done", started
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# KVM nested in TCG sometimes wedges an L1 CPU (the watchdog then reports "soft lockup
# - CPU#n stuck for Ns! [task]" every ~28 s, for qemu-system-x86 running L2 or, before
# THP was off, khugepaged) and L2 never moves again; seen a few times per hour-long run,
# at different tests. Waiting for the run's timeout wastes the hour: after this long
# stuck, give up on the boot.
LOCKUP_SECONDS = 120
_LOCKUP = re.compile(rb"soft lockup - CPU#\d+ stuck for (\d+)s! \[")


# L2 writes /job/heartbeat every 10 s while the command runs. Seen twice: a guest
# making no progress for 13 and 25 minutes with no lockup report from either kernel.
HEARTBEAT_SECONDS = 150  # a busy but healthy L2 was seen at most 13 s late


def _heartbeat_age(job: Path) -> float:
    try:
        return time.time() - (job / "heartbeat").stat().st_mtime
    except FileNotFoundError:
        return time.time() - (job / "started").stat().st_mtime
    except OSError:
        return 0.0


def _l1_locked_up(console_path: Path) -> bool:
    try:
        text = console_path.read_bytes()
    except OSError:
        return False
    return any(int(m.group(1)) >= LOCKUP_SECONDS for m in _LOCKUP.finditer(text))


def run_in_guest(
    argv: Sequence[str],
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = 600.0,
    env: Mapping[str, str] | None = None,
    writable: Sequence[str | os.PathLike[str]] = (),
    xcr0_kernel: bool = False,
) -> GuestResult:
    """Boot the guest, run argv in cwd (default: this process's cwd), return its outcome.

    xcr0_kernel: boot one level, the ARCH_SET_XCR0 test kernel, instead of the nested
    pair (it must have been built: xcr0_kernel_available(build=True) builds it).

    env is layered over a host-like base (host PATH, HOME=/root, LANG=C.UTF-8, ...;
    see _guest_path for one tweak to PATH).
    The guest sees the host's root read-only under a discarded tmpfs overlay; each
    directory in `writable` is instead shared read-write at the same path, so the
    command's files there reach the host.  Raises GuestError if the guest fails and
    GuestTimeout if it takes longer than `timeout` seconds in all.
    """
    if not argv:
        raise ValueError("argv is empty")
    reason = xcr0_kernel_available() if xcr0_kernel else guest_available()
    if reason is not None:
        raise GuestError(f"guest unavailable: {reason}")
    qemu, kernel = find_qemu(), find_xcr0_kernel() if xcr0_kernel else find_kernel()
    assert qemu is not None and kernel is not None
    initrd, image = _build_initramfs(kernel), _boot_image(kernel)
    shim = None if xcr0_kernel else _build_shim()
    cwd_str = os.fspath(cwd) if cwd is not None else os.getcwd()
    shares: list[tuple[str, str]] = []
    for i, path in enumerate(writable):
        host_path = os.path.realpath(path)
        if not os.path.isdir(host_path) or any(c.isspace() for c in host_path):
            raise ValueError(f"writable path must be an existing directory without blanks: {path}")
        shares.append((f"rw{i}", host_path))

    start = time.monotonic()
    deadline = start + timeout
    consoles: list[str] = []
    with tempfile.TemporaryDirectory(prefix="xcr0run-guest-") as tmp:
        job, console_path = Path(tmp) / "job", Path(tmp) / "console.log"
        cmd = _qemu_command(qemu, image, initrd, job, shares, one_level=xcr0_kernel)
        boots = 0
        while boots < BOOT_ATTEMPTS:
            boots += 1
            shutil.rmtree(job, ignore_errors=True)
            job.mkdir()
            _write_job(job, argv, cwd_str, _guest_env(env), shares, qemu, image, initrd, shim)
            outcome, boot_seconds = _boot_once(cmd, job, console_path, deadline)
            consoles.append(
                f"{_read(console_path)}--- L2 console ---\n{_read(job / 'l2-console.log')}"
            )
            console = "\n=== next boot ===\n".join(consoles)
            output = _read(job / "stdout")
            if outcome == "timeout":
                done = output[-300:].strip()
                raise GuestTimeout(
                    f"guest run exceeded {timeout:g}s; its output so far ends: {done!r}",
                    console,
                    output,
                )
            if outcome in ("lockup", "silent"):
                # The command ran part-way: not rebooted here (the time is spent); the
                # caller may run it again from the start.
                what = (
                    "L1 locked up running L2"
                    if outcome == "lockup"
                    else f"L2's kernel stopped (no heartbeat for {HEARTBEAT_SECONDS} s)"
                )
                raise GuestError(f"{what} (nested KVM under TCG)", console, output)
            if outcome == "done":
                break
        else:
            raise GuestError(f"L2 did not start in {BOOT_ATTEMPTS} boots", console)
        rc_file = job / "rc"
        if not rc_file.is_file():
            raise GuestError("guest ended without the command's exit status", console, output)
        return GuestResult(
            returncode=int(rc_file.read_text().strip()),
            stdout=_read(job / "stdout"),
            stderr=_read(job / "stderr"),
            console=console,
            elapsed=time.monotonic() - start,
            boot_seconds=boot_seconds,
            boots=boots,
        )


def main(args: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cwd", default=os.getcwd(), help="working directory in the guest")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    parser.add_argument(
        "--writable", action="append", default=[], metavar="DIR",
        help="host directory shared read-write at the same path (repeatable)",
    )  # fmt: skip
    parser.add_argument("--console", action="store_true", help="print the guest consoles")
    parser.add_argument(
        "--xcr0-kernel", action="store_true",
        help="boot one level with the ARCH_SET_XCR0 test kernel (built first if missing)",
    )  # fmt: skip
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND ARGS...")
    ns = parser.parse_args(args)
    command = ns.command[1:] if ns.command[:1] == ["--"] else ns.command
    if not command:
        parser.error("no command given")
    reason = xcr0_kernel_available(build=True) if ns.xcr0_kernel else guest_available()
    if reason is not None:
        print(f"run_in_guest: unavailable: {reason}", file=sys.stderr)
        return 2
    try:
        result = run_in_guest(
            command, ns.cwd, ns.timeout, writable=ns.writable, xcr0_kernel=ns.xcr0_kernel
        )
    except GuestError as exc:
        print(f"run_in_guest: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(result.stdout)
    sys.stdout.flush()
    sys.stderr.write(result.stderr)
    if ns.console:
        sys.stderr.write(result.console)
    print(
        f"run_in_guest: exit {result.returncode} in {result.elapsed:.1f}s ({result.boots} boot(s))",
        file=sys.stderr,
    )
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
