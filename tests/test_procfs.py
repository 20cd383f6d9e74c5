"""/proc read in one place: other processes through psutil, errors translated once."""

from __future__ import annotations

import errno
import os
import subprocess
import threading

import psutil
import pytest

from tests.conftest import wait_for
from xcr0run import procfs


def test_a_missing_process_is_gone() -> None:
    with pytest.raises(procfs.ProcessGone, match="no process with pid 999999999"):
        procfs.identity(999999999)


def test_a_zombie_is_named_as_one() -> None:
    child = subprocess.Popen(["true"])
    try:
        wait_for(lambda: psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE)
        with pytest.raises(procfs.ZombieProcess, match="a zombie, not yet reaped"):
            procfs.identity(child.pid)
    finally:
        child.wait()


def test_identity_matches_what_the_kernel_says() -> None:
    who = procfs.identity(os.getpid())
    with open("/proc/self/comm") as f:
        assert who.comm == f.read().strip()
    assert who.exe == os.readlink("/proc/self/exe")
    with open("/proc/self/status") as f:
        tracer = next(int(line.split()[1]) for line in f if line.startswith("TracerPid:"))
    assert who.tracer == tracer


def test_thread_ids_list_every_thread() -> None:
    started, done = threading.Event(), threading.Event()
    tids: list[int] = []

    def body() -> None:
        tids.append(threading.get_native_id())
        started.set()
        done.wait()

    worker = threading.Thread(target=body)
    worker.start()
    try:
        started.wait()
        assert {os.getpid(), *tids} <= set(procfs.thread_ids(os.getpid()))
    finally:
        done.set()
        worker.join()


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (FileNotFoundError(errno.ENOENT, "gone"), procfs.ProcessGone),
        (ProcessLookupError(errno.ESRCH, "gone"), procfs.ProcessGone),
        (PermissionError(errno.EACCES, "no"), procfs.AccessDenied),
        (psutil.NoSuchProcess(7), procfs.ProcessGone),
        (psutil.ZombieProcess(7), procfs.ZombieProcess),
        (psutil.AccessDenied(7), procfs.AccessDenied),
    ],
)
def test_os_and_psutil_errors_become_ours(error: BaseException, kind: type) -> None:
    with pytest.raises(kind) as caught, procfs._Reading(7):
        raise error
    assert caught.value.pid == 7 and caught.value.__cause__ is error


def test_other_errors_pass_unchanged() -> None:
    with pytest.raises(ValueError), procfs._Reading(7):
        raise ValueError("not about a process")


def test_the_original_environment_is_the_kernels_copy() -> None:
    """Not os.environ, which Python may have changed (locale coercion): every entry, in
    order, as execve received it."""
    with open("/proc/self/environ", "rb") as f:
        block = f.read()
    assert procfs.original_environment() == block.split(b"\0")[:-1]
    assert b"\0".join(procfs.original_environment()) + b"\0" == block
