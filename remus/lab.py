"""Two-host lab: three emulated machines (pri, bak, client) on one kernel.

Each host is a network namespace (`remus-lab-<host>`) with a veth `eth0`
plugged into a bridge in a switch namespace, plus a persistent mount
namespace (`<lab_dir>/ns/<host>.mnt`) in which the host's own backing folders
cover /var/lib and /srv and a fresh tmpfs covers /run, plus a freezer cgroup
that holds every process started on the host. Everything else (the checkout,
/tmp, /dev/shm, /usr) is shared, at the same paths.

Hosts are entered with `nsenter --net --mount`, never `ip netns exec`: the
latter makes a new mount namespace per call, which CRIU cannot dump or
restore into ("unreachable sharing").
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import json
import logging
import os
import re
import select
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from remus import cgroup
from remus.errors import ConfigError, HostError
from remus.proc import run_cmd

log = logging.getLogger(__name__)

LAB_DIR = Path("/run/remus-lab")
LAB_DIR_ENV = "REMUS_LAB_DIR"
# The lab's names (netns, cgroups) are global, so one lock for every lab dir.
LOCK_FILE = Path("/run/remus-lab.lock")
NETNS_DIR = Path("/run/netns")
NETNS_PREFIX = "remus-lab-"
SWITCH_NETNS = "remus-lab-sw"
BRIDGE = "br0"
BRIDGE_MAC = "02:77:00:00:02:00"
DEV = "eth0"
PREFIXLEN = 24
VIP_ADDR = "10.77.0.100"
VIP = f"{VIP_ADDR}/{PREFIXLEN}"
CGROUP_NAME = "remus-lab"
HOST_ENV = "REMUS_LAB_HOST"  # set in every process `exec` starts
KILL_TIMEOUT = 10.0


@dataclass(frozen=True)
class HostSpec:
    """One emulated machine: its address, eth0 MAC and switch-port MAC."""

    name: str
    addr: str
    mac: str
    port_mac: str
    router: bool  # pri and bak route to units in nested namespaces


HOSTS: dict[str, HostSpec] = {
    h.name: h
    for h in (
        HostSpec("pri", "10.77.0.1", "02:77:00:00:00:01", "02:77:00:00:01:01", True),
        HostSpec("bak", "10.77.0.2", "02:77:00:00:00:02", "02:77:00:00:01:02", True),
        HostSpec("client", "10.77.0.3", "02:77:00:00:00:03", "02:77:00:00:01:03", False),
    )
}

# Runs in the fresh mount namespace, in the host's netns. Binds come first:
# the backing folders live under /run, which the tmpfs hides. Submounts of
# /run are detached so the host does not pin other namespaces (copies of
# /run/netns/*). /sys is replaced by a sysfs mounted from the host's netns
# (else /sys/class/net shows the root namespace's links), keeping its
# submounts such as /sys/fs/cgroup.
_MNTNS_SCRIPT = r"""set -e
mount --bind "$1" /var/lib
mount --bind "$2" /srv
runs=$(awk '$5 == "/run" || index($5, "/run/") == 1 {print $5}' /proc/self/mountinfo | sort -r)
for m in $runs; do umount -l "$m" 2>/dev/null || true; done
mount -t tmpfs -o mode=0755,nosuid,nodev remus-run /run
sys=$(awk '$5 == "/sys" {id = $1} END {print id}' /proc/self/mountinfo)
subs=$(awk -v p="$sys" '$2 == p {print $5}' /proc/self/mountinfo)
mkdir /run/.sys
mount -t sysfs sysfs /run/.sys
for m in $subs; do mount --move "$m" "/run/.sys${m#/sys}"; done
umount -l /sys
mount --move /run/.sys /sys
rmdir /run/.sys
"""

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


def lab_dir_default() -> Path:
    return Path(os.environ.get(LAB_DIR_ENV) or LAB_DIR)


def _ip_batch(netns: str, lines: Sequence[str], check: bool = True) -> None:
    """Several `ip` commands in one netns; check=False is best effort."""
    argv, script = ["ip", "-n", netns, "-batch", "-"], "\n".join(lines) + "\n"
    if check or (NETNS_DIR / netns).exists():
        run_cmd(argv, stdin=script, check=check)


def _links(netns: str) -> dict[str, dict[str, Any]]:
    """Links of a namespace by name ({} if the namespace is missing)."""
    if not (NETNS_DIR / netns).exists():
        return {}
    res = run_cmd(["ip", "-n", netns, "-j", "link", "show"], check=False)
    if res.returncode != 0:
        return {}
    return {link["ifname"]: link for link in json.loads(res.stdout or "[]")}


def _link_up(link: dict[str, Any] | None) -> bool:
    return link is not None and "UP" in link.get("flags", [])


def mountpoints() -> list[str]:
    """Mount points of the caller's mount namespace (octal escapes decoded)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    unescape = functools.partial(re.sub, r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)))
    return [unescape(line.split()[4]) for line in lines]


def _umount(path: str) -> None:
    res = run_cmd(["umount", "-l", path], check=False)
    if res.returncode != 0 and os.path.ismount(path):
        raise HostError(f"umount {path}: {res.stderr.strip()}")


def _ns_id(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _is_ns_mounted(path: Path) -> bool:
    """A namespace file bind mount shows nsfs's device, not its directory's."""
    try:
        return os.stat(path).st_dev != os.stat(path.parent).st_dev
    except OSError:
        return False


class Lab:
    """The lab on this kernel. Methods are safe to call in any state.

    `up()` and `down()` are idempotent; `crash(host)` is a power cut. All of
    them take a global lock so concurrent callers do not interleave.
    """

    def __init__(self, lab_dir: str | Path | None = None) -> None:
        self.lab_dir = Path(lab_dir) if lab_dir is not None else lab_dir_default()
        self.ns_dir = self.lab_dir / "ns"
        self.state_file = self.lab_dir / "state.json"
        self.cgroup_v2 = cgroup.is_v2()
        self.cgroup_root = cgroup.freezer_root(self.cgroup_v2) / CGROUP_NAME

    vip = VIP  # "10.77.0.100/24", the service address that moves on failover
    vip_addr = VIP_ADDR
    dev = DEV  # the hosts' link to the switch, where the VIP goes
    hosts = tuple(HOSTS)

    # ---- names and paths -------------------------------------------------

    def spec(self, host: str) -> HostSpec:
        try:
            return HOSTS[host]
        except KeyError:
            raise ConfigError(f"unknown lab host {host!r} (hosts: {', '.join(HOSTS)})") from None

    def addr(self, host: str) -> str:
        return self.spec(host).addr

    def netns_name(self, host: str) -> str:
        return NETNS_PREFIX + self.spec(host).name

    def netns_path(self, host: str) -> str:
        return str(NETNS_DIR / self.netns_name(host))

    def mntns_path(self, host: str) -> str:
        return str(self.ns_dir / f"{self.spec(host).name}.mnt")

    def cgroup_path(self, host: str) -> str:
        return str(self.cgroup_root / self.spec(host).name)

    def host_dir(self, host: str) -> Path:
        """Backing folders of the host's disk: var-lib/ and srv/."""
        return self.lab_dir / "hosts" / self.spec(host).name

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
            str(Path(self.cgroup_path(host)) / "cgroup.procs"), _which("nsenter"),
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
        if missing or not _is_ns_mounted(Path(self.mntns_path(host))):
            raise LabNotUp(f"lab host {host} is not up (run `remus lab up`)")
        if host in self._crashed():
            raise LabNotUp(f"lab host {host} is crashed (run `remus lab up` to reboot it)")

    # ---- state -----------------------------------------------------------

    def _crashed(self) -> set[str]:
        try:
            return set(json.loads(self.state_file.read_text()).get("crashed", []))
        except (OSError, ValueError):
            return set()

    def _save_state(self, crashed: set[str]) -> None:
        state = {"lab_dir": str(self.lab_dir), "crashed": sorted(crashed), "time": time.time()}
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1) + "\n")
        tmp.replace(self.state_file)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if os.geteuid() != 0:
            raise HostError("the lab needs root (namespaces, mounts, cgroups)")
        LOCK_FILE.parent.mkdir(parents=True, exist_ok=True)
        with open(LOCK_FILE, "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield

    # ---- up ----------------------------------------------------------------

    def up(self) -> None:
        """Create whatever is missing and repair links that are down. A host
        that crashed is rebooted: fresh netns, /run and cgroup, same disk."""
        with self._locked():
            for tool in ("ip", "nsenter", "unshare", "sysctl", "mount", "umount", "awk"):
                _which(tool)
            crashed = self._crashed()
            self._ensure_dirs()
            self._ensure_switch()
            for host in HOSTS:
                if host in crashed:
                    log.info("rebooting crashed host %s", host)
                    self._reset_host(host)
                self._ensure_host(host)
            self._save_state(set())
        log.info("lab up in %s", self.lab_dir)

    def _ensure_dirs(self) -> None:
        for host in HOSTS:
            for sub in ("var-lib", "srv"):
                (self.host_dir(host) / sub).mkdir(parents=True, exist_ok=True)
        self.ns_dir.mkdir(parents=True, exist_ok=True)
        if str(self.ns_dir) not in mountpoints():
            run_cmd(["mount", "--bind", str(self.ns_dir), str(self.ns_dir)])
        # unshare refuses to bind a namespace file on a shared mount.
        run_cmd(["mount", "--make-private", str(self.ns_dir)])

    def _ensure_switch(self) -> None:
        if not (NETNS_DIR / SWITCH_NETNS).exists():
            run_cmd(["ip", "netns", "add", SWITCH_NETNS])
        # The switch has no addresses at all, not even IPv6 link-local ones.
        self._sysctl(SWITCH_NETNS, ["net.ipv6.conf.all.disable_ipv6=1",
                                    "net.ipv6.conf.default.disable_ipv6=1"])  # fmt: skip
        lines = ["link set lo up"]
        if BRIDGE not in _links(SWITCH_NETNS):
            lines.insert(0, f"link add {BRIDGE} address {BRIDGE_MAC} type bridge stp_state 0")
        _ip_batch(SWITCH_NETNS, [*lines, f"link set {BRIDGE} up"])

    def _ensure_host(self, host: str) -> None:
        spec = self.spec(host)
        netns = self.netns_name(host)
        if not (NETNS_DIR / netns).exists():
            # A mount namespace left from the old netns would show its /sys.
            self._reset_host(host)
            run_cmd(["ip", "netns", "add", netns])
        Path(self.cgroup_path(host)).mkdir(parents=True, exist_ok=True)
        if DEV not in _links(netns) or host not in _links(SWITCH_NETNS):
            self._make_veth(spec)
        settings = [f"net.ipv4.conf.{c}.rp_filter=0" for c in ("all", "default", DEV)]
        self._sysctl(netns, [*settings, f"net.ipv4.ip_forward={int(spec.router)}"])
        _ip_batch(SWITCH_NETNS, [f"link set {host} master {BRIDGE}", f"link set {host} up"])
        _ip_batch(netns, ["link set lo up", f"addr replace {spec.addr}/{PREFIXLEN} dev {DEV}",
                          f"link set {DEV} up"])  # fmt: skip
        self._ensure_mntns(host)

    def _make_veth(self, spec: HostSpec) -> None:
        netns = self.netns_name(spec.name)
        # A half pair cannot exist, but a stale name on either side can.
        for ns, name in ((SWITCH_NETNS, spec.name), (netns, DEV)):
            if name in _links(ns):
                # It may vanish by itself meanwhile: a deleted namespace takes its
                # veth peer along asynchronously.
                run_cmd(["ip", "-n", ns, "link", "del", name], check=False)
                if name in _links(ns):
                    run_cmd(["ip", "-n", ns, "link", "del", name])
        run_cmd(["ip", "-n", SWITCH_NETNS, "link", "add", spec.name, "address", spec.port_mac,
                 "type", "veth", "peer", "name", DEV, "address", spec.mac,
                 "netns", netns])  # fmt: skip

    def _ensure_mntns(self, host: str) -> None:
        path = Path(self.mntns_path(host))
        if _is_ns_mounted(path):
            return
        path.touch()
        hd = self.host_dir(host)
        try:
            run_cmd([_which("nsenter"), f"--net={self.netns_path(host)}", "--",
                     "unshare", f"--mount={path}", "--propagation", "private", "--",
                     "/bin/sh", "-c", _MNTNS_SCRIPT, "remus-lab-mnt",
                     str(hd / "var-lib"), str(hd / "srv")])  # fmt: skip
        except HostError:
            if _is_ns_mounted(path):
                _umount(str(path))
            raise

    @staticmethod
    def _sysctl(netns: str, settings: list[str]) -> None:
        run_cmd([_which("nsenter"), f"--net={NETNS_DIR / netns}", "--",
                 "sysctl", "-q", "-w", *settings])  # fmt: skip

    def _reset_host(self, host: str) -> None:
        """Power the host off for good: no processes, netns, mount ns, cgroups."""
        self._kill_host(host)
        netns = self.netns_name(host)
        if (NETNS_DIR / netns).exists():
            _delete_netns(netns)
        path = self.mntns_path(host)
        if _is_ns_mounted(Path(path)):
            _umount(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        cgroup.remove_tree(Path(self.cgroup_path(host)))

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
            _ip_batch(SWITCH_NETNS, [f"link set {host} down"], check=False)
            _ip_batch(self.netns_name(host), [f"link set {DEV} down"], check=False)
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

    # ---- down ----------------------------------------------------------------

    def down(self) -> None:
        """Remove everything the lab made, from any state; idempotent."""
        with self._locked():
            for host in HOSTS:
                self._reset_host(host)
            if (NETNS_DIR / SWITCH_NETNS).exists():
                _delete_netns(SWITCH_NETNS)
            prefix = str(self.lab_dir) + "/"
            for mp in sorted((m for m in mountpoints() if m.startswith(prefix)), reverse=True):
                _umount(mp)
            cgroup.remove_tree(self.cgroup_root)
            if any(m.startswith(prefix) or m == str(self.lab_dir) for m in mountpoints()):
                raise HostError(f"mounts remain under {self.lab_dir}; not removing it")
            shutil.rmtree(self.lab_dir, ignore_errors=True)
        log.info("lab down")

    # ---- status ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The lab as a dict (the `status --json` document)."""
        switch = _links(SWITCH_NETNS)
        crashed = self._crashed()
        hosts: dict[str, Any] = {}
        for host, spec in HOSTS.items():
            eth0 = _links(self.netns_name(host)).get(DEV)
            exists = (
                os.path.exists(self.netns_path(host))
                and _is_ns_mounted(Path(self.mntns_path(host)))
                and os.path.isdir(self.cgroup_path(host))
            )
            link_up = _link_up(eth0) and _link_up(switch.get(host))
            hosts[host] = {
                "addr": spec.addr,
                "cidr": f"{spec.addr}/{PREFIXLEN}",
                "mac": spec.mac,
                "netns": self.netns_name(host),
                "netns_path": self.netns_path(host),
                "mntns": self.mntns_path(host),
                "cgroup": self.cgroup_path(host),
                "switch_port": host,
                "link": "up" if link_up else ("down" if eth0 else "missing"),
                "crashed": host in crashed,
                "alive": exists and link_up and host not in crashed,
                "procs": len(self._host_pids(host)) if exists else 0,
            }
        up = BRIDGE in switch and all(
            os.path.exists(h["netns_path"]) and _is_ns_mounted(Path(h["mntns"]))
            for h in hosts.values()
        )
        return {
            "up": up,
            "lab_dir": str(self.lab_dir),
            "hosts": hosts,
            "vip": VIP,
            "vip_addr": VIP_ADDR,
            "dev": DEV,
            "switch": {"netns": SWITCH_NETNS, "bridge": BRIDGE},
            "cgroup_version": 2 if self.cgroup_v2 else 1,
        }


def _which(tool: str) -> str:
    path = shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not path:
        raise HostError(f"the lab needs `{tool}` (util-linux/iproute2/procps)")
    return path


def _delete_netns(name: str) -> None:
    res = run_cmd(["ip", "netns", "del", name], check=False)
    path = NETNS_DIR / name
    if path.exists():  # e.g. the file exists but is not a mount any more
        if os.path.ismount(path):
            _umount(str(path))
        with contextlib.suppress(OSError):
            path.unlink()
    if path.exists():
        raise HostError(f"cannot delete netns {name}: {res.stderr.strip()}")


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
