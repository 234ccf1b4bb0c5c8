"""Run a system call inside another, unmodified process (ptrace, x86_64).

The uffd-wp tracker needs a userfaultfd created *inside* the unit's address
space: the kernel binds a userfaultfd to the mm of the process that made it.
`RemoteTask` seizes one thread of the target, makes it execute syscalls of
our choosing, and puts it back exactly where it was:

    PTRACE_SEIZE + PTRACE_INTERRUPT -> save the registers -> point RIP at a
    `syscall` instruction (0f 05, found in the target's vDSO), rax = nr,
    orig_rax = -1 (no syscall restart), arguments in rdi.. r9 ->
    PTRACE_SYSCALL to the entry stop and again to the exit stop -> rax is the
    result -> restore the registers -> PTRACE_DETACH.

A thread interrupted inside a system call is put back so that it restarts
that call (the same adjustment CRIU's compel makes on every dump: rewind RIP
over the `syscall` instruction for -ERESTART*, -EINTR for
-ERESTART_RESTARTBLOCK).

Contract: every ptrace request comes from the thread that called `__enter__`
(ptrace is per tracer thread), so use one `with RemoteTask(...)` block from
one thread. The target must not be traced by anyone else (not during a CRIU
dump). Errors raise InjectError; the target is detached in every case.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
from types import TracebackType

from remus.errors import HostError

# -- constants (linux/ptrace.h, asm/unistd_64.h, linux/errno.h) -------------

PTRACE_GETREGS = 12
PTRACE_SETREGS = 13
PTRACE_SYSCALL = 24
PTRACE_CONT = 7
PTRACE_DETACH = 17
PTRACE_SEIZE = 0x4206
PTRACE_INTERRUPT = 0x4207
PTRACE_O_TRACESYSGOOD = 0x1
PTRACE_EVENT_STOP = 128
WALL = 0x40000000  # __WALL: wait for clone children (threads) too

SYS_CLOSE = 3
SYS_USERFAULTFD = 323
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438
SYS_TGKILL = 234

ERESTARTSYS = 512
ERESTARTNOINTR = 513
ERESTARTNOHAND = 514
ERESTART_RESTARTBLOCK = 516

SYSCALL_INSN = b"\x0f\x05"

# struct user_regs_struct (arch/x86/include/asm/user_64.h), in order
_REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax",
              "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", "rsp", "ss",
              "fs_base", "gs_base", "ds", "es", "fs", "gs")
_ARG_REGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")


class Regs(ctypes.Structure):
    _fields_ = [(n, ctypes.c_ulonglong) for n in _REG_NAMES]

    def copy(self) -> Regs:
        r = Regs()
        ctypes.memmove(ctypes.byref(r), ctypes.byref(self), ctypes.sizeof(Regs))
        return r


class InjectError(HostError):
    """A syscall could not be run inside the target."""


_libc = ctypes.CDLL(None, use_errno=True)
_libc.ptrace.restype = ctypes.c_long
_libc.ptrace.argtypes = [ctypes.c_long, ctypes.c_long, ctypes.c_void_p, ctypes.c_void_p]
_libc.syscall.restype = ctypes.c_long


def _ptrace(req: int, tid: int, addr: int | None = None, data: object = None) -> int:
    ctypes.set_errno(0)
    ret = int(_libc.ptrace(req, tid, addr, data))
    if ret == -1 and ctypes.get_errno():
        e = ctypes.get_errno()
        raise InjectError(f"ptrace({req:#x}, {tid}): {os.strerror(e)}")
    return ret


def syscall(nr: int, *args: int) -> int:
    """A syscall in this process; OSError on failure."""
    ret = int(_libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)))
    if ret == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"syscall {nr}: {os.strerror(e)}")
    return ret


def pidfd_getfd(pid: int, remote_fd: int) -> int:
    """Duplicate fd `remote_fd` of process `pid` into this process (O_CLOEXEC)."""
    pidfd = syscall(SYS_PIDFD_OPEN, pid, 0)
    try:
        return syscall(SYS_PIDFD_GETFD, pidfd, remote_fd, 0)
    finally:
        os.close(pidfd)


def find_syscall_insn(pid: int) -> int:
    """Address of a `syscall` instruction in pid's vDSO."""
    with open(f"/proc/{pid}/maps") as f:
        for line in f:
            if line.rstrip().endswith("[vdso]"):
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                break
        else:
            raise InjectError(f"pid {pid} has no vDSO (booted with vdso=0?)")
    fd = os.open(f"/proc/{pid}/mem", os.O_RDONLY)
    try:
        code = os.pread(fd, hi - lo, lo)
    finally:
        os.close(fd)
    at = code.find(SYSCALL_INSN)
    if at < 0:
        raise InjectError(f"no syscall instruction in the vDSO of pid {pid}")
    return lo + at


def restartable(regs: Regs) -> Regs:
    """Registers that resume an interrupted syscall the way the kernel would."""
    r = regs.copy()
    orig = ctypes.c_longlong(r.orig_rax).value
    rax = ctypes.c_longlong(r.rax).value
    if orig >= 0:
        if -rax in (ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND):
            r.rax = r.orig_rax
            r.rip -= len(SYSCALL_INSN)
        elif -rax == ERESTART_RESTARTBLOCK:
            r.rax = ctypes.c_ulonglong(-errno.EINTR).value
    return r


class RemoteTask:
    """One seized thread of a target process that runs our syscalls."""

    def __init__(self, pid: int, tid: int | None = None) -> None:
        self.pid = pid
        self.tid = tid if tid is not None else pid
        self._saved: Regs | None = None
        self._insn = 0
        self._seized = False
        self._deferred: list[int] = []  # signals held back while our syscalls ran

    def __enter__(self) -> RemoteTask:
        self._insn = find_syscall_insn(self.pid)
        _ptrace(PTRACE_SEIZE, self.tid, None, ctypes.c_void_p(PTRACE_O_TRACESYSGOOD))
        self._seized = True
        try:
            _ptrace(PTRACE_INTERRUPT, self.tid)
            self._wait_interrupt()
            regs = Regs()
            _ptrace(PTRACE_GETREGS, self.tid, None, ctypes.byref(regs))
            self._saved = restartable(regs)
        except BaseException:
            self._detach()
            raise
        return self

    def __exit__(self, t: type[BaseException] | None, v: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if self._saved is not None:
                _ptrace(PTRACE_SETREGS, self.tid, None, ctypes.byref(self._saved))
        finally:
            self._detach()

    def call(self, nr: int, *args: int) -> int:
        """Run syscall nr(args) in the target; its return value (negative errno)."""
        if self._saved is None:
            raise InjectError("call() outside the with block")
        r = self._saved.copy()
        r.rip = self._insn
        r.rax = nr
        r.orig_rax = ctypes.c_ulonglong(-1).value
        for name, value in zip(_ARG_REGS, args, strict=False):
            setattr(r, name, ctypes.c_ulonglong(value).value)
        _ptrace(PTRACE_SETREGS, self.tid, None, ctypes.byref(r))
        self._step_syscall()  # to the entry stop
        self._step_syscall()  # to the exit stop
        out = Regs()
        _ptrace(PTRACE_GETREGS, self.tid, None, ctypes.byref(out))
        return int(ctypes.c_longlong(out.rax).value)

    # -- plumbing -----------------------------------------------------------
    def _wait_interrupt(self) -> None:
        """Wait for the stop PTRACE_INTERRUPT asked for, passing signals through."""
        while True:
            _, status = os.waitpid(self.tid, WALL)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._seized = False
                raise InjectError(f"pid {self.pid} exited while being seized")
            if not os.WIFSTOPPED(status):
                continue
            sig = os.WSTOPSIG(status)
            if status >> 16 == PTRACE_EVENT_STOP:
                if sig in (signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU):
                    raise InjectError(f"pid {self.pid} is stopped (job control); not touched")
                return
            # A signal arrived first: deliver it; the interrupt stop follows.
            _ptrace(PTRACE_CONT, self.tid, None, ctypes.c_void_p(sig))

    def _step_syscall(self) -> None:
        _ptrace(PTRACE_SYSCALL, self.tid)
        while True:
            _, status = os.waitpid(self.tid, WALL)
            if os.WIFEXITED(status) or os.WIFSIGNALED(status):
                self._seized = False
                self._saved = None
                raise InjectError(f"pid {self.pid} exited during an injected syscall")
            if os.WIFSTOPPED(status) and os.WSTOPSIG(status) == (signal.SIGTRAP | 0x80):
                return
            # A signal-delivery stop: hold the signal back and raise it again once
            # the target is detached (so our syscall runs, and nothing is lost).
            if os.WIFSTOPPED(status) and status >> 16 == 0:
                self._deferred.append(os.WSTOPSIG(status))
            _ptrace(PTRACE_SYSCALL, self.tid)

    def _detach(self) -> None:
        if self._seized:
            self._seized = False
            try:
                _ptrace(PTRACE_DETACH, self.tid)
            except InjectError:
                return  # gone
        for sig in self._deferred:
            try:
                syscall(SYS_TGKILL, self.pid, self.tid, sig)
            except OSError:
                pass  # the thread is gone
        self._deferred.clear()
