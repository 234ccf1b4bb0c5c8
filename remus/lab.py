"""Two-host lab: three emulated machines (pri, bak, client) on one kernel.

Each host is a network namespace (`remus-lab-<host>`) with a veth `eth0`
plugged into a bridge in a switch namespace, plus a persistent mount
namespace (`<lab_dir>/ns/<host>.mnt`) in which the host's own backing folders
cover /var/lib and /srv and a fresh tmpfs covers /run, plus a freezer cgroup
that holds every process started on the host. Everything else (the checkout,
/tmp, /dev/shm, /usr) is shared, at the same paths.

This module brings the lab up, tears it down and reports its status. The
layout (names, addresses, paths) is remus.lab_layout; entering and crashing
hosts is remus.lab_hosts; the `ip`/mount helpers are remus.lab_tools.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from pathlib import Path
from typing import Any

from remus import cgroup
from remus.errors import HostError
from remus.lab_hosts import LabHosts
from remus.lab_layout import (
    BRIDGE,
    BRIDGE_MAC,
    DEV,
    HOSTS,
    PREFIXLEN,
    SWITCH_NETNS,
    VIP,
    VIP_ADDR,
    HostSpec,
)
from remus.lab_tools import (
    delete_netns,
    ip_batch,
    is_ns_mounted,
    link_up,
    links,
    mountpoints,
    umount,
    which,
)
from remus.netns import netns_exists, netns_path
from remus.proc import run_cmd

log = logging.getLogger(__name__)

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


class Lab(LabHosts):
    """The lab on this kernel. Methods are safe to call in any state.

    `up()` and `down()` are idempotent; `crash(host)` is a power cut. All of
    them take a global lock so concurrent callers do not interleave.
    """

    # ---- up ----------------------------------------------------------------

    def up(self) -> None:
        """Create whatever is missing and repair links that are down. A host
        that crashed is rebooted: fresh netns, /run and cgroup, same disk."""
        with self._locked():
            for tool in ("ip", "nsenter", "unshare", "sysctl", "mount", "umount", "awk"):
                which(tool)
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
        if not netns_exists(SWITCH_NETNS):
            run_cmd(["ip", "netns", "add", SWITCH_NETNS])
        # The switch has no addresses at all, not even IPv6 link-local ones.
        self._sysctl(SWITCH_NETNS, ["net.ipv6.conf.all.disable_ipv6=1",
                                    "net.ipv6.conf.default.disable_ipv6=1"])  # fmt: skip
        lines = ["link set lo up"]
        if BRIDGE not in links(SWITCH_NETNS):
            lines.insert(0, f"link add {BRIDGE} address {BRIDGE_MAC} type bridge stp_state 0")
        ip_batch(SWITCH_NETNS, [*lines, f"link set {BRIDGE} up"])

    def _ensure_host(self, host: str) -> None:
        spec = self.spec(host)
        netns = self.netns_name(host)
        if not netns_exists(netns):
            # A mount namespace left from the old netns would show its /sys.
            self._reset_host(host)
            run_cmd(["ip", "netns", "add", netns])
        Path(self.cgroup_path(host)).mkdir(parents=True, exist_ok=True)
        if DEV not in links(netns) or host not in links(SWITCH_NETNS):
            self._make_veth(spec)
        settings = [f"net.ipv4.conf.{c}.rp_filter=0" for c in ("all", "default", DEV)]
        self._sysctl(netns, [*settings, f"net.ipv4.ip_forward={int(spec.router)}"])
        ip_batch(SWITCH_NETNS, [f"link set {host} master {BRIDGE}", f"link set {host} up"])
        ip_batch(netns, ["link set lo up", f"addr replace {spec.addr}/{PREFIXLEN} dev {DEV}",
                         f"link set {DEV} up"])  # fmt: skip
        self._ensure_mntns(host)

    def _make_veth(self, spec: HostSpec) -> None:
        netns = self.netns_name(spec.name)
        # A half pair cannot exist, but a stale name on either side can.
        for ns, name in ((SWITCH_NETNS, spec.name), (netns, DEV)):
            if name in links(ns):
                # It may vanish by itself meanwhile: a deleted namespace takes its
                # veth peer along asynchronously.
                run_cmd(["ip", "-n", ns, "link", "del", name], check=False)
                if name in links(ns):
                    run_cmd(["ip", "-n", ns, "link", "del", name])
        run_cmd(["ip", "-n", SWITCH_NETNS, "link", "add", spec.name, "address", spec.port_mac,
                 "type", "veth", "peer", "name", DEV, "address", spec.mac,
                 "netns", netns])  # fmt: skip

    def _ensure_mntns(self, host: str) -> None:
        path = Path(self.mntns_path(host))
        if is_ns_mounted(path):
            return
        path.touch()
        hd = self.host_dir(host)
        try:
            run_cmd([which("nsenter"), f"--net={self.netns_path(host)}", "--",
                     "unshare", f"--mount={path}", "--propagation", "private", "--",
                     "/bin/sh", "-c", _MNTNS_SCRIPT, "remus-lab-mnt",
                     str(hd / "var-lib"), str(hd / "srv")])  # fmt: skip
        except HostError:
            if is_ns_mounted(path):
                umount(str(path))
            raise

    @staticmethod
    def _sysctl(netns: str, settings: list[str]) -> None:
        run_cmd([which("nsenter"), f"--net={netns_path(netns)}", "--",
                 "sysctl", "-q", "-w", *settings])  # fmt: skip

    def _reset_host(self, host: str) -> None:
        """Power the host off for good: no processes, netns, mount ns, cgroups."""
        self._kill_host(host)
        netns = self.netns_name(host)
        if netns_exists(netns):
            delete_netns(netns)
        path = self.mntns_path(host)
        if is_ns_mounted(Path(path)):
            umount(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        cgroup.remove_tree(Path(self.cgroup_path(host)))

    # ---- down ----------------------------------------------------------------

    def down(self) -> None:
        """Remove everything the lab made, from any state; idempotent."""
        with self._locked():
            for host in HOSTS:
                self._reset_host(host)
            if netns_exists(SWITCH_NETNS):
                delete_netns(SWITCH_NETNS)
            prefix = str(self.lab_dir) + "/"
            for mp in sorted((m for m in mountpoints() if m.startswith(prefix)), reverse=True):
                umount(mp)
            cgroup.remove_tree(self.cgroup_root)
            if any(m.startswith(prefix) or m == str(self.lab_dir) for m in mountpoints()):
                raise HostError(f"mounts remain under {self.lab_dir}; not removing it")
            shutil.rmtree(self.lab_dir, ignore_errors=True)
        log.info("lab down")

    # ---- status ----------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The lab as a dict (the `status --json` document)."""
        switch = links(SWITCH_NETNS)
        crashed = self._crashed()
        hosts: dict[str, Any] = {}
        for host, spec in HOSTS.items():
            eth0 = links(self.netns_name(host)).get(DEV)
            exists = (
                os.path.exists(self.netns_path(host))
                and is_ns_mounted(Path(self.mntns_path(host)))
                and os.path.isdir(self.cgroup_path(host))
            )
            linked = link_up(eth0) and link_up(switch.get(host))
            hosts[host] = {
                "addr": spec.addr,
                "cidr": f"{spec.addr}/{PREFIXLEN}",
                "mac": spec.mac,
                "netns": self.netns_name(host),
                "netns_path": self.netns_path(host),
                "mntns": self.mntns_path(host),
                "cgroup": self.cgroup_path(host),
                "switch_port": host,
                "link": "up" if linked else ("down" if eth0 else "missing"),
                "crashed": host in crashed,
                "alive": exists and linked and host not in crashed,
                "procs": len(self._host_pids(host)) if exists else 0,
            }
        up = BRIDGE in switch and all(
            os.path.exists(h["netns_path"]) and is_ns_mounted(Path(h["mntns"]))
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
