"""A protected service in the lab, end to end: used by the demo and the tests.

`Scenario` starts a backup agent on `bak`, a real server protected by
`remus run` on `pri`, and clients on `client`; it polls both agents' status
and can pull the plug on `pri`. Everything it starts, it stops (by pid).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from remus.lab import Lab
from remus.paths import REPO

log = logging.getLogger(__name__)

REMUS = [sys.executable, "-m", "remus.cli"]
SERVERS: dict[str, tuple[list[str], int]] = {
    "redis": (["redis-server", "--port", "6379", "--save", "", "--appendonly", "no",
               "--protected-mode", "no", "--daemonize", "no", "--dir", "/tmp"], 6379),
    "memcached": (["memcached", "-u", "root", "-p", "11211", "-U", "0", "-t", "1"], 11211),
}


LAB_LOCK = Path("/run/remus-lab-tests.lock")
ZK_JAR = Path("/usr/share/java/zookeeper.jar")
ZK_PORT = 2181


@contextlib.contextmanager
def exclusive_lab(keep: bool = False) -> Iterator[Lab]:
    """A fresh lab for a demo or benchmark: waits for any test run using the lab
    (the names are global), brings it up clean, and takes it down afterwards
    (unless `keep`)."""
    with open(LAB_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        lab = Lab()
        lab.down()
        lab.up()
        try:
            yield lab
        finally:
            if not keep:
                lab.down()


@dataclass
class Scenario:
    lab: Lab
    workdir: Path
    server: str = "redis"
    interval: str = "50ms"
    unit: str = "kv"
    extra_primary: list[str] = field(default_factory=list)
    extra_backup: list[str] = field(default_factory=list)
    command: list[str] | None = None  # overrides the server's command line
    status_timeout: float = 5.0  # per `remus status` call (more in an emulated VM)
    coordinator: str | None = None  # zk://... for both agents (start_coordinator sets it)
    zk_servers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    host_keys: dict[str, Path] = field(default_factory=dict)  # a host's own key file
    # Extra environment of the agents started by start_primary / start_backup
    # (e.g. REMUS_FAULT: remus.faults).
    env_primary: dict[str, str] = field(default_factory=dict)
    env_backup: dict[str, str] = field(default_factory=dict)
    # The remus command the agents run (default: this checkout's, `python -m
    # remus.cli`); an installed one, e.g. [PREFIX/bin/remus], runs outside it.
    remus: list[str] = field(default_factory=lambda: list(REMUS))
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.key = self.workdir / "key"
        if not self.key.exists():
            self.key.write_text(os.urandom(32).hex() + "\n")
            self.key.chmod(0o600)
        self.port = SERVERS[self.server][1] if self.server in SERVERS else 0

    def key_of(self, host: str) -> Path:
        """The key file `host`'s agents use: the shared one unless host_keys says."""
        return self.host_keys.get(host, self.key)

    # -- agents -------------------------------------------------------------
    def _spawn(self, host: str, argv: list[str], logname: str,
               env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        out = open(self.workdir / logname, "ab")
        cwd = str(REPO) if self.remus == REMUS else "/"
        p = self.lab.popen(host, argv, stdout=out, stderr=subprocess.STDOUT, cwd=cwd,
                           start_new_session=True, env={**os.environ, **env} if env else None)
        self.procs.append(p)
        return p

    def start_backup(self, host: str = "bak") -> subprocess.Popen[bytes]:
        """`remus backup` on `host` (bak; or pri, rejoining after a failover)."""
        return self._spawn(host, [*self.remus, "-v", "backup", "--listen", self.lab.addr(host),
                                  "--key-file", str(self.key_of(host)), "--workdir",
                                  f"/var/lib/remus/{self.unit}", *self._coord_args(),
                                  *self.extra_backup],
                           "backup.log" if host == "bak" else f"backup-{host}.log",
                           self.env_backup)

    def start_primary(self) -> subprocess.Popen[bytes]:
        argv = self.command or SERVERS[self.server][0]
        return self._spawn("pri", [*self.remus, "-v", "run", "--backup", self.lab.addr("bak"),
                                   "--key-file", str(self.key_of("pri")), "--vip", self.lab.vip,
                                   "--dev", self.lab.dev, "--name", self.unit, "--interval",
                                   self.interval, *self._coord_args(), *self.extra_primary,
                                   "--", *argv], "primary.log", self.env_primary)

    def _coord_args(self) -> list[str]:
        return ["--coordinator", self.coordinator] if self.coordinator else []

    def start_agent(self, host: str) -> subprocess.Popen[bytes]:
        """`remus agent` of a fleet on `host` (start_coordinator first)."""
        return self._spawn(host, [*self.remus, "-v", "agent", "--coordinator", self.coordinator or "",
                                  "--key-file", str(self.key_of(host)), "--listen",
                                  self.lab.addr(host),
                                  "--dev", self.lab.dev, "--log-dir",
                                  str(self.workdir / f"fleet-{host}")], f"agent-{host}.log")

    # -- coordinator --------------------------------------------------------
    def start_coordinator(self, empty: bool = False, timeout: float = 60.0) -> str:
        """A real ZooKeeper (Debian's package) on the `coord` host; its data on that
        host's disk (`empty`: wiped first, a coordinator that lost everything).
        Both agents started from now on use it. Returns its URL."""
        self._zk_server("coord", empty, "")
        self._wait_zk(["coord"], timeout)
        self.coordinator = f"zk://{self.lab.addr('coord')}:{ZK_PORT}/remus-lab"
        return self.coordinator

    def start_coordinator_ensemble(self, hosts: tuple[str, ...] = ("coord", "spare", "client"),
                                   timeout: float = 90.0) -> str:
        """A ZooKeeper ensemble, one server per host (empty data), and a URL that
        names every server: the agents' client picks one and moves to another
        when it dies. `zk_servers` maps each host to its server's process."""
        quorum = "".join(f"server.{i}={self.lab.addr(h)}:2888:3888\n"
                         for i, h in enumerate(hosts, 1))
        for i, h in enumerate(hosts, 1):
            self.zk_servers[h] = self._zk_server(h, True, "initLimit=20\nsyncLimit=10\n" + quorum,
                                                 myid=i)
        self._wait_zk(list(hosts), timeout)
        addrs = ",".join(f"{self.lab.addr(h)}:{ZK_PORT}" for h in hosts)
        self.coordinator = f"zk://{addrs}/remus-lab"
        return self.coordinator

    def _zk_server(self, host: str, empty: bool, extra: str,
                   myid: int | None = None) -> subprocess.Popen[bytes]:
        if not ZK_JAR.exists():
            raise FileNotFoundError(f"{ZK_JAR} missing: install Debian's zookeeper package "
                                    "(bin/setup does)")
        # /var/lib/zookeeper-lab on the host's disk (its /run does not survive a reboot)
        disk = self.lab.host_dir(host) / "var-lib" / "zookeeper-lab"
        if empty:
            shutil.rmtree(disk, ignore_errors=True)
        disk.mkdir(parents=True, exist_ok=True)
        if myid is not None:
            (disk / "myid").write_text(f"{myid}\n")
        cfg = self.workdir / f"zoo-{host}.cfg"
        # tickTime 500 ms: sessions of 1-10 s (ZooKeeper's bounds are 2 and 20 ticks).
        cfg.write_text(f"tickTime=500\ndataDir=/var/lib/zookeeper-lab\nclientPort={ZK_PORT}\n"
                       f"clientPortAddress={self.lab.addr(host)}\nadmin.enableServer=false\n"
                       + extra)
        name = "zookeeper.log" if host == "coord" and myid is None else f"zookeeper-{host}.log"
        main = "quorum.QuorumPeerMain" if myid is not None else "ZooKeeperServerMain"
        return self._spawn(host, ["java", "-Xmx256m", "-cp", f"/etc/zookeeper/conf:{ZK_JAR}",
                                  f"org.apache.zookeeper.server.{main}", str(cfg)], name)

    def _wait_zk(self, hosts: list[str], timeout: float) -> None:
        """Until a ZooKeeper client from the client host is served (a quorum formed)."""
        hosts_arg = ",".join(f"{self.lab.addr(h)}:{ZK_PORT}" for h in hosts)
        probe = ("import sys, logging; logging.disable(logging.CRITICAL)\n"
                 "from kazoo.client import KazooClient\n"
                 "z = KazooClient(hosts=sys.argv[1], timeout=4.0)\n"
                 "z.start(timeout=3.0); z.get_children('/'); z.stop()\n")
        deadline = time.monotonic() + timeout
        while self.lab.run("client", [sys.executable, "-c", probe, hosts_arg],
                           capture_output=True, timeout=30).returncode != 0:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ZooKeeper on {hosts_arg} not serving within {timeout:.0f} s;"
                                   f" see {self.workdir}/zookeeper*.log")
            time.sleep(0.3)

    def status(self, host: str, timeout: float | None = None) -> dict[str, Any] | None:
        p = self.lab.run(host, [*REMUS, "status", "--json"], capture_output=True, text=True,
                         timeout=timeout or self.status_timeout, cwd=str(REPO))
        if p.returncode != 0:
            return None
        doc = json.loads(p.stdout)
        return doc if isinstance(doc, dict) else None

    def primary_status(self, host: str) -> dict[str, Any] | None:
        """The status of whoever protects the unit from `host`: the `remus run`
        agent, or (after a takeover there) the backup agent's re-protection."""
        st = self.status(host)
        if st is not None and st.get("role") != "primary":
            st = st.get("protection")
        return st

    def wait_protected(self, timeout: float = 20.0, min_acked: int = 3) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] | None = None
        while time.monotonic() < deadline:
            last = self.status("pri")
            if last and last.get("acked_epoch", -1) >= min_acked:
                return last
            time.sleep(0.2)
        raise TimeoutError(f"primary not protecting after {timeout}s; last status {last}; "
                           f"see {self.workdir}/primary.log and backup.log")

    # -- clients ------------------------------------------------------------
    def start_client(self, duration: float, out: str, inflight: int = 1, pace: float = 0.0,
                     stall_timeout: float = 15.0) -> subprocess.Popen[bytes]:
        """A loadgen client on `client`; its JSON result goes to workdir/out."""
        return self._spawn("client", [sys.executable, "-m", "remus.loadgen", self.server,
                                      "--host", self.lab.vip_addr, "--port", str(self.port),
                                      "--duration", str(duration), "--inflight", str(inflight),
                                      "--pace", str(pace), "--stall-timeout", str(stall_timeout),
                                      "--out", str(self.workdir / out)], f"{out}.log")

    def wait_client(self, proc: subprocess.Popen[bytes], out: str,
                    timeout: float = 120.0) -> dict[str, Any]:
        proc.wait(timeout)
        return self.client_result(out)

    def agent_pid(self, host: str) -> int | None:
        st = self.status(host)
        return int(st["pid"]) if st else None

    def log_tail(self, logname: str, lines: int = 60) -> str:
        """The last `lines` lines of an agent's or client's log (for failure messages)."""
        try:
            text = (self.workdir / logname).read_text(errors="replace")
        except OSError as e:
            return f"({logname}: {e})"
        return f"--- {logname} (last {lines} lines) ---\n" + "\n".join(text.splitlines()[-lines:])

    def client_result(self, out: str) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.workdir / out).read_text())
        return data

    # -- teardown -----------------------------------------------------------
    def reset(self) -> None:
        """Power-cycle every lab host: no unit, agent or ARP entry survives."""
        self.stop_all()
        for host in self.lab.hosts:
            try:
                self.lab.crash(host)
            except Exception as e:  # a host that is already down is fine
                log.debug("crash %s: %s", host, e)
        # A real power cut empties tmpfs; the lab's leaves the crashed primary's
        # dump directories in /dev/shm (the next agent would remove them).
        from remus.agents import clean_stale_dump_roots

        clean_stale_dump_roots()
        self.lab.up()

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
