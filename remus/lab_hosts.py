"""Operating on a lab host: entering it (exec_argv, run, popen) and crashing it.

Hosts are entered with `nsenter --net --mount`, never `ip netns exec`: the
latter makes a new mount namespace per call, which CRIU cannot dump or
restore into ("unreachable sharing"). A crash is a power cut: freeze, cut the
link, SIGKILL every process of the host through pidfds, thaw.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from remus import cgroup
from remus.errors import ConfigError, HostError
from remus.lab_layout import CGROUP_NAME, DEV, SWITCH_NETNS, LabLayout
from remus.lab_tools import ip_batch, is_ns_mounted, which

log = logging.getLogger(__name__)

HOST_ENV = "REMUS_LAB_HOST"  # set in every process `exec` starts
KILL_TIMEOUT = 10.0

# Trampoline of exec_argv. Outer shell (caller's namespaces): join the host
# cgroup, remember the cwd by path, exec nsenter. Inner shell (host): cd back
# by path (setns to a mount namespace resets the cwd to its root, and
# nsenter --wd would keep a directory of the caller's namespace), exec argv.
_OUTER = (
    'echo $$ >"$1" || exit 125; ns=$2 net=$3 mnt=$4 host=$5 sh=$6 inner=$7; shift 7; '
    'w=$(pwd -P 2>/dev/null) || w=/; '
    'exec "$ns" --net="$net" --mount="$mnt" -- "$sh" -c "$inner" "$w" "$host" "$@"'
)
_INNER = f'cd "$0" 2>/dev/null || cd /; {HOST_ENV}=$1; export {HOST_ENV}; shift; exec "$@"'


class LabNotUp(HostError):
    """The lab (or the host asked for) is not up."""


class LabHosts(LabLayout):
    """Entering and crashing the hosts of a lab that is up."""

    # ---- entering hosts --------------------------------------------------

    def exec_argv(self, host: str, argv: Sequence[str]) -> list[str]:
        """The argv that runs `argv` on `host`: its netns, mount namespace and
        cgroup, with the caller's cwd (by path) and environment plus
        REMUS_LAB_HOST. The last process exec's argv, so its exit status and
        stdio are argv's. Raises LabNotUp if the host is not running."""
        spec = self.spec(host)
        if not argv:
            raise ConfigError("nothing to run (empty command)")
        self._require_running(spec.name)
        return [
            "/bin/sh", "-c", _OUTER, "remus-lab-enter",
            str(Path(self.cgroup_path(host)) / "cgroup.procs"), which("nsenter"),
            self.netns_path(host), self.mntns_path(host), spec.name, "/bin/sh", _INNER,
            *argv,
        ]  # fmt: skip

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        return subprocess.Popen(self.exec_argv(host, argv), **kwargs)

    def run(
        self, host: str, argv: Sequence[str], **kwargs: Any
    ) -> subprocess.CompletedProcess[Any]:
        return subprocess.run(self.exec_argv(host, argv), **kwargs)

    def _require_running(self, host: str) -> None:
        missing = [
            p for p in (self.netns_path(host), self.cgroup_path(host)) if not os.path.exists(p)
        ]
        if missing or not is_ns_mounted(Path(self.mntns_path(host))):
            raise LabNotUp(f"lab host {host} is not up (run `remus lab up`)")
        if host in self._crashed():
            raise LabNotUp(f"lab host {host} is crashed (run `remus lab up` to reboot it)")

    # ---- crash ---------------------------------------------------------------

    def crash(self, host: str) -> None:
        """Power cut: freeze the host's processes, cut its link (both ends),
        SIGKILL every process of the host, thaw, and return once they are all
        gone. Disk (/var/lib, /srv) survives; `up()` reboots the host."""
        self.spec(host)
        with self._locked():
            if not Path(self.cgroup_path(host)).is_dir():
                raise LabNotUp(f"lab host {host} is not up (run `remus lab up`)")
            self._save_state(self._crashed() | {host})
            self._kill_host(host, cut_link=True)
        log.info("crashed host %s", host)

    def _kill_host(self, host: str, cut_link: bool = False) -> None:
        cg = Path(self.cgroup_path(host))
        self._freeze(cg, True)
        if cut_link:
            ip_batch(SWITCH_NETNS, [f"link set {host} down"], check=False)
            ip_batch(self.netns_name(host), [f"link set {DEV} down"], check=False)
        pidfds: dict[int, int] = {}
        seen: set[int] = set()
        try:
            # Rounds: a process outside the frozen cgroup could fork meanwhile.
            for _ in range(50):
                fresh = self._host_pids(host) - seen
                if not fresh:
                    break
                seen |= fresh
                for pid in fresh:
                    fd = self._signal_if_ours(pid, host)
                    if fd is not None:
                        pidfds[pid] = fd
                self._freeze(cg, False)  # SIGKILL lands when thawed (v1)
            _wait_pidfds(pidfds, KILL_TIMEOUT)
        finally:
            for fd in pidfds.values():
                os.close(fd)
            self._freeze(cg, False)
        if pidfds:
            log.info("killed %d processes of host %s", len(pidfds), host)

    def _signal_if_ours(self, pid: int, host: str) -> int | None:
        """SIGKILL pid through a pidfd, after checking it is still the host's
        (the pidfd pins the process, so the pid cannot be reused meanwhile)."""
        if pid == os.getpid():
            return None
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return None
        if not self._belongs(pid, host):
            os.close(fd)
            return None
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        except OSError as e:
            if e.errno != errno.ESRCH:
                os.close(fd)
                raise HostError(f"cannot kill pid {pid} of host {host}: {e}") from e
        return fd

    def _host_pids(self, host: str) -> set[int]:
        """Every pid of the host: its cgroup subtree, plus anything in its
        mount or network namespace (units leave the netns, keep the mount ns)."""
        pids = set(cgroup.procs(Path(self.cgroup_path(host))))
        ids = {i for i in (_ns_id(self.mntns_path(host)), _ns_id(self.netns_path(host))) if i}
        if ids:
            pids |= {pid for pid, pid_ids in _proc_ns_ids().items() if pid_ids & ids}
        pids.discard(os.getpid())
        return pids

    def _belongs(self, pid: int, host: str) -> bool:
        rel = f"/{CGROUP_NAME}/{host}"
        try:
            path = cgroup.cgroup_of(pid, None if self.cgroup_v2 else "freezer")
        except OSError:
            return False
        if path is not None and (path == rel or path.startswith(rel + "/")):
            return True
        ids = {_ns_id(self.mntns_path(host)), _ns_id(self.netns_path(host))} - {None}
        return bool(ids & _pid_ns_ids(pid))

    def _freeze(self, cg: Path, on: bool) -> None:
        """Freeze or thaw, and wait (up to 2 s) until the kernel reports it."""
        if cg.is_dir():
            cgroup.freeze(cg, on, self.cgroup_v2, wait=2.0)


def _ns_id(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _pid_ns_ids(pid: int | str) -> set[tuple[int, int] | None]:
    return {_ns_id(f"/proc/{pid}/ns/mnt"), _ns_id(f"/proc/{pid}/ns/net")}


def _proc_ns_ids() -> dict[int, set[tuple[int, int] | None]]:
    """Mount and network namespace ids of every process."""
    return {int(p): _pid_ns_ids(p) for p in os.listdir("/proc") if p.isdigit()}


def _wait_pidfds(pidfds: dict[int, int], timeout: float) -> None:
    """Wait until every process has exited (a pidfd turns readable then)."""
    poller = select.poll()
    left = dict(pidfds)
    for fd in left.values():
        poller.register(fd, select.POLLIN)
    by_fd = {fd: pid for pid, fd in left.items()}
    deadline = time.monotonic() + timeout
    while left:
        wait_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        events = poller.poll(wait_ms)
        if not events:
            raise HostError(f"processes survived SIGKILL: {sorted(left)}")
        for fd, _ev in events:
            poller.unregister(fd)
            left.pop(by_fd[fd], None)
