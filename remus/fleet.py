"""`remus agent`: one per host of a fleet (like Patroni), on a ZooKeeper.

Every cycle (a second) the agent observes the fleet (remus.fleet_store),
decides what this host must run for each service, and acts:

- the unit of a service whose placement names this host as primary, and
  that runs nowhere yet: a `remus run` child (its backup address comes from
  the placement, so it follows the backup wherever the leader puts it);
- the backup of a service placed here as backup: a `remus backup` child
  (after a takeover it runs the unit and protects it in turn, again towards
  the placed backup);
- nothing else: a child no longer wanted is stopped.

Who runs a unit is never decided here: the pair's own compare-and-set on the
unit's record does that (remus.coordinator), so the fleet adds no new way to
get two copies. One agent, elected, also places services (remus.placement).
The agent reports each child's status into the coordinator for `remus ctl
list`, and carries out `remus ctl switchover/failover` for the units it runs.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from remus.control import NoAgent, call, socket_path
from remus.coordinator import CoordinatorUnavailable, UnitRecord, ZkCoordinator
from remus.errors import RemusError
from remus.fleet_store import FleetStore, ServiceSpec
from remus.placement import Placement, place

log = logging.getLogger(__name__)

REMUS = [sys.executable, "-m", "remus.cli", "-v"]


@dataclass
class AgentConfig:
    coordinator: str
    key_file: Path
    me: str  # this host's address (its backups listen there)
    dev: str = "eth0"
    workdir: Path = Path("/var/lib/remus")
    log_dir: Path = Path("/var/log/remus")
    every: float = 1.0


class Adopted:
    """A child agent that an earlier run of this agent started (it outlived a crash
    of that run): found by its control socket, watched and stopped by pid. Not
    ours to reap, so its exit status is unknown (-1)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._p = psutil.Process(pid)
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                alive = self._p.is_running() and self._p.status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive = False
            if not alive:
                self.returncode = -1
        return self.returncode

    def send_signal(self, sig: int) -> None:
        try:
            self._p.send_signal(sig)
        except psutil.NoSuchProcess:
            pass

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int:
        try:
            self._p.wait(timeout)
        except psutil.TimeoutExpired as e:
            raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout or 0) from e
        except psutil.NoSuchProcess:
            pass
        self.returncode = -1
        return -1


@dataclass
class Child:
    role: str  # "primary" (a remus run) or "backup" (a remus backup)
    proc: subprocess.Popen[bytes] | Adopted
    spec: ServiceSpec

    def socket(self) -> Path:
        return child_socket(self.role, self.spec)


def child_socket(role: str, spec: ServiceSpec) -> Path:
    """The control socket of a service's child agent on this host."""
    return (socket_path("primary", spec.name) if role == "primary"
            else socket_path("backup", str(spec.port)))


def wants(me: str, rec: UnitRecord | None, pl: Placement | None) -> str | None:
    """What host `me` must run for a service: primary, backup, running (the unit
    is here: keep what runs it), keep (nothing is known: keep whatever runs), or
    None (run nothing: stop what runs).

    "keep": neither a unit record nor a placement, which is what a coordinator
    that restarted empty shows until the primaries re-assert their records and
    the leader places again. Unknown is not "not here": stopping then would kill
    a service that is about to be placed right where it runs."""
    if rec is not None and rec.primary == me:
        return "running"
    if pl is None:
        return "keep" if rec is None else None
    if rec is None and pl.primary == me and pl.backup is not None:
        return "primary"
    if pl.backup == me:
        return "backup"
    return None


class FleetAgent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.coord = ZkCoordinator(cfg.coordinator)
        self.store = FleetStore(self.coord)
        self.children: dict[str, Child] = {}
        self.stop_event = threading.Event()
        self.leader = False
        self.last_sentence = "starting"
        cfg.log_dir.mkdir(parents=True, exist_ok=True)

    # -- loop ---------------------------------------------------------------------------
    def run(self) -> None:
        threading.Thread(target=self._elect, name="election", daemon=True).start()
        while not self.stop_event.wait(self.cfg.every):
            try:
                sentence = self.cycle()
            except CoordinatorUnavailable as e:
                sentence = f"{e}; children keep running as they are"
            except RemusError as e:
                sentence = f"cycle failed: {e}"
            if sentence != self.last_sentence:
                log.info("%s", sentence)
                self.last_sentence = sentence
        for name in list(self.children):
            self._stop_child(name, "agent stopping")

    def stop(self) -> None:
        self.stop_event.set()

    def cycle(self) -> str:
        mem = psutil.virtual_memory()
        self.store.register_host(self.cfg.me, {"mem_available": mem.available, "pid": os.getpid()})
        for child in self.children.values():
            if self.store.restore_service(child.spec):
                log.warning("the coordinator had lost service %s: written back", child.spec.name)
        services = self.store.services()
        records = self.store.records(list(services))
        placements = self.store.placements()
        acts = []
        for name, spec in services.items():
            want = self.wants(records.get(name), placements.get(name))
            acts += self._reconcile(name, spec, want)
            self._report(name)
            self._carry_out(name, records.get(name), placements.get(name))
        for name in [n for n in self.children if n not in services]:
            self._stop_child(name, "service removed")
            acts.append(f"{name}: stopped (removed)")
        running = ", ".join(f"{n} {c.role}" for n, c in sorted(self.children.items()))
        return "; ".join(acts) or f"{'leader; ' if self.leader else ''}running: {running or '-'}"

    def wants(self, rec: UnitRecord | None, pl: Placement | None) -> str | None:
        return wants(self.cfg.me, rec, pl)

    # -- children ---------------------------------------------------------------------------
    def _reconcile(self, name: str, spec: ServiceSpec, want: str | None) -> list[str]:
        child = self.children.get(name)
        if child is not None and child.proc.poll() is not None:
            log.warning("%s: its %s agent exited (%s)", name, child.role, child.proc.returncode)
            del self.children[name]
            child = None
        if want == "keep":
            return []
        if want is None and child is not None:
            self._stop_child(name, "not placed here any more")
            return [f"{name}: stopped its {child.role}"]
        if want in ("primary", "backup", "running") and child is None:
            found = self._adopt(spec)
            if isinstance(found, str):
                return []  # an agent answers slowly there: never start a second next to it
            if found is not None:
                self.children[name] = found
                return [f"{name}: adopted its {found.role} (pid {found.proc.pid})"]
        if want in ("primary", "backup") and child is None:
            self.children[name] = self._spawn(want, spec)
            return [f"{name}: started its {want}"]
        if want == "running" and child is None:
            log.error("%s: the coordinator says this host runs the unit, but no agent of "
                      "this host does", name)
        return []

    def _adopt(self, spec: ServiceSpec) -> Child | str | None:
        """A child agent of this service that outlived an earlier run of this agent
        (children do not die with their agent: a crashed or killed agent restarts
        and takes them back, and their units stay protected meanwhile). "busy": a
        control socket accepts but does not answer; None: nobody is there."""
        for role in ("primary", "backup"):
            try:
                st = call(child_socket(role, spec), "status", timeout=2.0)
            except NoAgent:
                continue  # no socket, or nobody listening (a stale file)
            except RemusError:
                return "busy"
            pid = st.get("pid")
            if not isinstance(pid, int):
                continue
            try:
                proc = Adopted(pid)
            except psutil.NoSuchProcess:
                continue
            log.warning("%s: adopted its %s agent (pid %d), left running by an earlier run "
                        "of this agent", spec.name, role, pid)
            return Child(role, proc, spec)
        return None

    def _spawn(self, role: str, spec: ServiceSpec) -> Child:
        url, key = self.cfg.coordinator, str(self.cfg.key_file)
        work = self.cfg.workdir / spec.name
        dirs = [a for d in spec.state_dirs for a in ("--state-dir", d)]
        if role == "primary":
            argv = [*REMUS, "run", "--name", spec.name, "--vip", spec.vip, "--dev",
                    self.cfg.dev, "--backup", "fleet", "--key-file", key, "--coordinator", url,
                    "--interval", f"{spec.interval_ms:g}ms", "--rejoin-workdir", str(work),
                    *dirs, "--", *spec.cmd]
        else:
            argv = [*REMUS, "backup", "--listen", f"{self.cfg.me}:{spec.port}", "--key-file",
                    key, "--workdir", str(work), "--coordinator", url, "--reprotect", "fleet",
                    "--interval", f"{spec.interval_ms:g}ms", *dirs]
        out = open(self.cfg.log_dir / f"{spec.name}-{role}.log", "ab")  # noqa: SIM115
        env = {**os.environ, "REMUS_FLEET_UNIT": spec.name}
        # Its own session: it outlives a crash of this agent, which adopts it on restart.
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        out.close()
        log.info("%s: started its %s (pid %d)", spec.name, role, proc.pid)
        return Child(role, proc, spec)

    def _stop_child(self, name: str, why: str) -> None:
        child = self.children.pop(name, None)
        if child is None or child.proc.poll() is not None:
            return
        log.info("%s: stopping its %s (%s)", name, child.role, why)
        child.proc.send_signal(signal.SIGTERM)
        try:
            child.proc.wait(15)
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()

    def _report(self, name: str) -> None:
        child = self.children.get(name)
        if child is None or child.proc.poll() is not None:
            return
        try:
            st = call(child.socket(), "status", timeout=2)
        except RemusError:
            return
        prot = st.get("protection") or (st if st.get("role") == "primary" else None)
        doc = {"agent": child.role, "state": st.get("state"),
               "runs_unit": bool(prot), "epoch": (prot or st).get("epoch"),
               "acked_epoch": (prot or st).get("acked_epoch"),
               "protection": (prot or {}).get("state"),
               "checkpoint_bytes": (prot or {}).get("checkpoint_bytes"),
               "failover": st.get("failover"), "last": st.get("last"), "time": time.time()}
        self.store.publish_status(name, self.cfg.me, doc)

    def _carry_out(self, name: str, rec: UnitRecord | None, pl: Placement | None) -> None:
        """A pending `remus ctl switchover/failover` that this host is the one to do."""
        child = self.children.get(name)
        if child is None or rec is None:
            return
        runs_here = rec.primary == self.cfg.me
        backup_here = pl is not None and pl.backup == self.cfg.me and not runs_here
        if not (runs_here or backup_here):
            return
        ahead = self.store.peek_request(name)
        if ahead is None:
            return  # nothing asked (one read per cycle, not two)
        if ahead.get("op") == "switchover" and ahead.get("to") and \
                not (rec.backup == ahead["to"] and rec.state == "protected"):
            return  # the backup moves to its target and catches up first (the leader moves it)
        req = self.store.take_request(name)
        if req is None:
            return
        op = req.get("op")
        if op == "switchover" and runs_here:
            cmd, args = "switchover", {"seconds": 30.0}
        elif op == "failover" and backup_here:
            cmd, args = "failover", {"force": True}
        else:
            self.store.request(name, str(op), req.get("to"))  # not ours: put it back
            return
        log.warning("%s: %s requested", name, op)
        try:
            call(child.socket(), cmd, timeout=60, **args)
        except RemusError as e:
            log.error("%s: %s failed: %s", name, op, e)

    # -- leader -------------------------------------------------------------------------------
    def _elect(self) -> None:
        while not self.stop_event.is_set():
            try:
                election = self.store.zk.Election(f"{self.store.path}/leader", self.cfg.me)
                election.run(self._lead)
            except (CoordinatorUnavailable, Exception) as e:  # lost the session: again
                log.debug("election: %s", e)
                self.leader = False
                self.stop_event.wait(1.0)

    def _lead(self) -> None:
        self.leader = True
        log.warning("this agent places the fleet's services now (leader)")
        try:
            while not self.stop_event.wait(self.cfg.every):
                self.place_once()
                if not self.store.zk.connected:
                    return
        finally:
            self.leader = False

    def _switchover_targets(self, services: dict[str, Any], hosts: dict[str, Any],
                            records: dict[str, UnitRecord]) -> dict[str, str]:
        """Services whose `ctl switchover --to HOST` needs the backup moved to HOST
        first. A request for a host that left the pool is dropped, saying so."""
        out: dict[str, str] = {}
        try:
            pending = self.store.requests()
        except CoordinatorUnavailable:
            return out
        for name, req in pending.items():
            to, rec = req.get("to"), records.get(name)
            if req.get("op") != "switchover" or not to or name not in services:
                continue
            if to in hosts and (rec is None or rec.primary != to):
                out[name] = to
            elif self.store.take_request(name) is not None:
                log.error("%s: switchover to %s dropped: %s", name, to,
                          "it is the primary already" if rec is not None and rec.primary == to
                          else "that host is not in the pool")
        return out

    def place_once(self) -> None:
        try:
            services = self.store.services()
            hosts = self.store.hosts()
            records = self.store.records(list(services))
            current = self.store.placements()
        except CoordinatorUnavailable:
            return
        sizes = {}
        for name in services:
            for st in self.store.statuses(name).values():
                if st.get("checkpoint_bytes"):
                    sizes[name] = int(st["checkpoint_bytes"])
        prefer = {n: s.prefer for n, s in services.items() if s.prefer}
        backup_to = self._switchover_targets(services, hosts, records)
        for name, p in place(list(services), hosts, records, current, sizes, prefer,
                             backup_to).items():
            self.store.set_placement(name, p)
            log.warning("placement of %s: primary %s, backup %s", name, p.primary,
                        p.backup or "NONE (degraded: no host can take it)")


__all__ = ["AgentConfig", "FleetAgent", "Any"]
