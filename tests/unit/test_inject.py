"""The register arithmetic of syscall injection (pure; the ptrace half runs in
tests/integration/test_uffd_wp.py against real processes)."""

from __future__ import annotations

import ctypes
import errno

from remus.checkpoint.inject import (
    ERESTART_RESTARTBLOCK,
    ERESTARTNOHAND,
    ERESTARTNOINTR,
    ERESTARTSYS,
    Regs,
    restartable,
)


def regs(orig_rax: int, rax: int, rip: int = 0x1000) -> Regs:
    r = Regs()
    r.orig_rax = ctypes.c_ulonglong(orig_rax).value
    r.rax = ctypes.c_ulonglong(rax).value
    r.rip = rip
    return r


def signed(v: int) -> int:
    return ctypes.c_longlong(v).value


def test_interrupted_syscall_is_rewound_to_restart() -> None:
    for code in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
        r = restartable(regs(232, -code))  # epoll_wait interrupted by our stop
        assert (r.rax, r.rip) == (232, 0x1000 - 2)


def test_restart_block_becomes_eintr() -> None:
    r = restartable(regs(230, -ERESTART_RESTARTBLOCK))  # clock_nanosleep
    assert signed(r.rax) == -errno.EINTR and r.rip == 0x1000


def test_user_code_and_finished_syscalls_are_left_alone() -> None:
    r = restartable(regs(-1, 5))  # stopped in user code
    assert (signed(r.orig_rax), r.rax, r.rip) == (-1, 5, 0x1000)
    r = restartable(regs(0, 17))  # read() returned 17
    assert (r.rax, r.rip) == (17, 0x1000)
    r = restartable(regs(0, -errno.EAGAIN))
    assert signed(r.rax) == -errno.EAGAIN


def test_restartable_copies() -> None:
    before = regs(232, -ERESTARTSYS)
    restartable(before)
    assert signed(before.rax) == -ERESTARTSYS and before.rip == 0x1000
