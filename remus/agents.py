"""Assemble agents from CLI options: the unit, its container, buffer, CRIU.

This is the only place that knows how the pieces fit; primary.py and
backup.py stay testable with fakes.
"""

from __future__ import annotations

import logging
import os
import re
import select
import shutil
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from remus import faults, netdesc, reprotect
from remus.backup import Backup, BackupConfig
from remus.cgroup import UnitCgroup
from remus.checkpoint import restore_prep
from remus.checkpoint.criu import VMFLAGS_DIR, Criu
from remus.checkpoint.disk_apply import sync_to_disk
from remus.container import Container, UnitContainer
from remus.container import warm_up as container_warm_up
from remus.control import ControlServer, socket_path
from remus.errors import ConfigError, FatalError, RemusError
from remus.netns import netns_of
from remus.options import PrimaryOptions
from remus.paths import RUN_DIR
from remus.primary import Primary
from remus.primary_config import PrimaryConfig
from remus.proc import run_cmd
from remus.roles import P
from remus.unit import UnitSpec, hold_inbound, start_unit
from remus.unit_desc import UnitDescription

log = logging.getLogger(__name__)


DUMP_PARENT = Path("/dev/shm")
_DUMP_ROOT_RE = re.compile(r"^remus-.+-(\d+)$")


def _dump_root(name: str) -> Path:
    # tmpfs: the dump is a memory copy; a disk would add its latency to the pause.
    clean_stale_dump_roots()
    return DUMP_PARENT / f"remus-{name}-{os.getpid()}"


def clean_stale_dump_roots(parent: Path = DUMP_PARENT) -> list[Path]:
    """Remove the dump directories of primary agents that are gone.

    A killed agent (kill -9, a crash) cannot remove its tmpfs dumps, which hold
    one or two copies of its unit's memory. A directory is stale when its pid
    no longer runs a remus agent."""
    removed = []
    for d in parent.glob("remus-*-*"):
        m = _DUMP_ROOT_RE.match(d.name)
        if m is None or not d.is_dir() or _is_remus_agent(int(m.group(1))):
            continue
        if not all(re.fullmatch(r"e\d+", c.name) or c.name == VMFLAGS_DIR for c in d.iterdir()):
            continue  # not an agent's dump root (epoch directories and CRIU's cache only)
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    if removed:
        log.info("removed %d dump directories of agents that are gone", len(removed))
    return removed


def _is_remus_agent(pid: int) -> bool:
    try:
        return b"remus" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def serve_primary(p: Primary, unit_name: str, on_stop: Any = None) -> None:
    """Run a primary with its control socket until stop or a fatal error."""

    def handle(req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        if cmd == "status":
            return {"ok": True, **p.status()}
        if cmd == "set-interval":
            from remus.config import check_interval

            p.set_interval(check_interval(float(req["seconds"])))
            return {"ok": True, "interval_ms": p.cfg.timing.interval * 1000}
        if cmd == "stop":
            p.request_stop(force=bool(req.get("force")))
            return {"ok": True, "message": "protection stopping; the unit keeps running"}
        if cmd == "switchover":
            return {"ok": True, **p.switchover(float(req.get("seconds", 30.0)))}
        raise RemusError(f"the primary does not understand {cmd!r}")

    ctl = ControlServer(socket_path("primary", unit_name), handle)
    ctl.start()
    prev = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in prev:
        signal.signal(s, lambda *_: p.stop("agent received a signal"))
    released = stopped = False
    try:
        p.run()
        stopped = True
        # stopped cleanly: the unit continues unprotected (unless a lost backup
        # may have taken over: release_on_stop)
        released = p.release_on_stop()
    finally:
        ctl.close()
        # Never protected (no checkpoint acknowledged): the backup cannot take over,
        # so blocking the unit's output would only take the service down. Protection
        # that failed (checkpoints failing for good) follows --on-peer-loss: stall
        # keeps the output held (the backup takes over from the last checkpoint),
        # continue releases it (the backup never takes over by itself then).
        given_up = not stopped and p.role.state is not P.FENCED
        if given_up and p.acked >= 0 and p.cfg.on_peer_loss == "continue":
            log.error("protection failed (%s); --on-peer-loss continue: releasing the unit's "
                      "output, it runs UNPROTECTED", p.fatal)
            released = True
        elif given_up and p.acked >= 0:
            log.error("protection failed (%s); --on-peer-loss stall: the unit's output stays "
                      "held; the backup takes over from the last acknowledged checkpoint",
                      p.fatal)
        p.close(release_output=released or p.acked < 0)
        for s, h in prev.items():
            signal.signal(s, h)
        if on_stop is not None:
            on_stop(released and p.role.state is not P.HANDED_OVER)


def local_ip_towards(host: str) -> str:
    """This host's address on the way to `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
        except OSError as e:
            raise ConfigError(f"no route to {host}: {e.strerror}") from e
        return str(s.getsockname()[0])


def claim(opts: PrimaryOptions) -> tuple[Any, str]:
    """With --coordinator: make sure no other host runs the unit before starting it
    here. (coordinator, this host's name in its records), or (None, "")."""
    if not opts.coordinator:
        return None, ""
    from remus.coordinator import CoordinatorUnavailable, ZkCoordinator, decide_claim, parse_url

    coord = ZkCoordinator(opts.coordinator)
    # Our name in the records: our address towards the backup (a fleet's primary
    # learns its backup later: towards the coordinator then).
    towards = (opts.backup[0] if opts.backup[0] != "fleet"
               else parse_url(opts.coordinator)[0].split(",")[0].rsplit(":", 1)[0])
    me = local_ip_towards(towards)
    try:
        d = coord.apply(opts.name, lambda r: decide_claim(r, me, None))
    except CoordinatorUnavailable as e:
        coord.close()
        raise ConfigError(f"{e}: not starting (another host may run unit {opts.name})") from e
    if not d.won:
        coord.close()
        raise ConfigError(f"{d.why}: not starting a second copy here (start `remus backup` "
                          "on this host instead)")
    log.info("coordinator %s: %s", opts.coordinator, d.why)
    return coord, me


def _fleet_resolver(opts: PrimaryOptions, coord: Any, me: str) -> Any:
    """`--backup fleet`: the backup is where the fleet's leader placed it."""
    if opts.backup[0] != "fleet":
        return None
    if coord is None:
        raise ConfigError("--backup fleet needs --coordinator")
    from remus.reprotect import fleet_backup_resolver

    return fleet_backup_resolver(coord, opts.name, me)


def make_run_primary(opts: PrimaryOptions, argv: list[str], buffer_factory: Any
                     ) -> tuple[Primary, Any]:
    """`remus run`: build the container, start argv in it, protect it."""
    if opts.vip is None:
        raise ConfigError("remus run needs --vip")
    coord, me = claim(opts)
    spec = UnitSpec.for_run(opts.name, opts.vip, opts.dev)
    container = Container(spec)
    container.create(active=True)
    cg = UnitCgroup(spec.name)
    try:
        wrapper, pid = start_unit(spec, argv, cg)
    except Exception:
        container.remove()
        raise
    buffer = buffer_factory(spec.host_if)
    cfg = PrimaryConfig(unit_id=spec.name,
                        spec=UnitDescription.for_run(spec, opts.state_dirs).to_json(),
                        backup=opts.backup,
                        psk=opts.psk, timing=opts.timing, pid=pid,
                        netns_path=spec.netns_path, dump_root=_dump_root(spec.name),
                        compress=opts.compress, dirty_tracking=opts.dirty_tracking,
                        on_peer_loss=opts.on_peer_loss,
                        trace=opts.trace, fence=lambda: _fence(container, pid),
                        state_dirs=opts.state_dirs, unit_pids=cg.pids,
                        buffer_factory=lambda: buffer_factory(spec.host_if),
                        protection={"netbuf": getattr(buffer_factory, "kind", "auto")},
                        coordinator=coord, coord_me=me,
                        backup_resolver=_fleet_resolver(opts, coord, me))
    p = Primary(cfg, buffer)
    try:
        buffer.start()
    except Exception:
        os.kill(pid, signal.SIGKILL)
        wrapper.wait()
        container.remove()
        raise

    def on_stop(released: bool) -> None:
        if released:
            log.info("unit %s (pid %d) keeps running unprotected", spec.name, pid)
        threading.Thread(target=wrapper.wait, daemon=True).start()

    return p, on_stop


def make_protect_primary(opts: PrimaryOptions, pid: int, buffer_factory: Any
                         ) -> tuple[Primary, Any]:
    """`remus protect PID`: the process must already have its own netns (a container)."""
    own = netns_of(os.getpid())
    theirs = netns_of(pid)
    if own == theirs:
        raise ConfigError(
            f"pid {pid} shares this host's network namespace: remus cannot hold its output or "
            "move its connections (transparent TCP failover needs the service in its own network "
            "namespace). Start it with `remus run -- CMD` instead, or put it in a container.")
    coord, me = claim(opts)
    desc = netdesc.describe(pid)
    host_if = desc["host_if"]
    if opts.host_if and opts.host_if != host_if:
        raise ConfigError(f"--host-if {opts.host_if}: pid {pid}'s veth peer on this host is "
                          f"{host_if}")
    for w in desc.get("warnings", []):
        log.warning("container of pid %d: %s", pid, w)
    spec = UnitDescription.for_protect(opts.name, host_if, desc, opts.state_dirs).to_json()
    buffer = buffer_factory(host_if, bridged=desc.get("bridge") is not None)

    def fence() -> None:
        netdesc.deactivate(desc)
        _kill(pid)

    cfg = PrimaryConfig(unit_id=opts.name, spec=spec, backup=opts.backup, psk=opts.psk,
                        timing=opts.timing, pid=pid, netns_path=f"/proc/{pid}/ns/net",
                        dump_root=_dump_root(opts.name), compress=opts.compress,
                        dirty_tracking=opts.dirty_tracking,
                        on_peer_loss=opts.on_peer_loss, trace=opts.trace, fence=fence,
                        state_dirs=opts.state_dirs, unit_pids=lambda: _tree(pid),
                        buffer_factory=lambda: buffer_factory(
                            host_if, bridged=desc.get("bridge") is not None),
                        protection={"netbuf": getattr(buffer_factory, "kind", "auto")},
                        coordinator=coord, coord_me=me)
    p = Primary(cfg, buffer)
    buffer.start()
    return p, None


def _tree(pid: int) -> list[int]:
    try:
        root = psutil.Process(pid)
        return [pid] + [c.pid for c in root.children(recursive=True)]
    except psutil.Error:
        return []


def _fence(container: UnitContainer, pid: int) -> None:
    """Cut the unit off the network first (a dying kernel still sends), then kill it."""
    container.deactivate()
    _kill(pid)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# -- backup side -----------------------------------------------------------------
def prepare_standby(spec_json: dict[str, Any], rebuild: bool = False) -> None:
    """Build the container a restore will need (host side of the veth down).

    `rebuild`: the last build did not finish in this agent (or there was none):
    whatever container exists may be half-built, so it is built afresh."""
    unit = UnitDescription.from_json(spec_json)
    c = unit.container()
    if unit.mode == "protect":
        # Rebuilt on every HELLO: the standby follows the newest description.
        _refuse_busy_standby(unit.netns)
        c.create(active=False)
        log.info("standby container %s rebuilt from the primary's description", unit.netns)
        return
    if rebuild or not c.exists():
        _refuse_busy_standby(unit.netns)
        c.create(active=False)
        log.info("standby container %s ready (address %s, link down)", unit.netns, unit.where())


def _refuse_busy_standby(netns: str) -> None:
    """A standby container with processes in it is a unit restored here earlier and
    still running: rebuilding its network would cut it off."""
    p = run_cmd(["ip", "netns", "pids", netns], check=False)
    pids = p.stdout.split() if p.returncode == 0 else []
    if pids:
        raise RemusError(f"network namespace {netns} on this host still runs pid(s) "
                         f"{', '.join(pids)} (a unit restored here earlier?): stop them "
                         "before this host can be a backup again")


def takeover(b: Backup, why: str) -> None:
    """Restore the committed checkpoint into the standby container and go live."""
    tl = b.timeline
    b.store.apply_pending()
    tl["applied"] = time.time()
    if b.cfg.state_dirs:
        # On stable storage before the unit resumes: what it fsync'd on the primary
        # must survive a power cut of this host right after the takeover.
        sync_to_disk(b.cfg.state_dirs)
        tl["synced"] = time.time()
    assert b.unit is not None
    unit = UnitDescription.from_json(b.unit["spec"])
    container = unit.container()
    name, where = unit.name, unit.where()
    if not b.standby_ready or not container.exists():
        # never built, or a build was cut short (its netns may lack the veth or routes)
        container.create(active=False)
    cg = UnitCgroup(name)
    cg.create()
    criu = Criu(netns=container.netns_path)
    # The scratch copy lives in RAM (/run): a takeover must not need space on the
    # store's disk, which may be full (the store itself is intact: it refused
    # what it could not keep).
    images, queues = restore_prep.prepare(b.store.images_dir(), RUN_DIR / f"restore-{name}")
    tl["prepared"] = time.time()
    faults.point("backup-restore")
    # The address comes up before the restore so that the unit's queued output
    # leaves the moment CRIU restores it; packets towards the unit are dropped
    # until its sockets exist (else its kernel answers them with RST).
    hold_inbound(container.host_if, True)
    reprotect.clear_stale_rules(container.host_if)
    tl["held"] = time.time()
    try:
        container.activate(announce=True)
        tl["address_up"] = time.time()
        tl["restore_start"] = time.time()
        pid = criu.restore(images, cgroup_procs=cg.procs_file)
        tl["restored"] = time.time()
    except BaseException:
        container.deactivate()  # do not claim an address with nothing behind it
        raise
    finally:
        hold_inbound(container.host_if, False)
    tl["released"] = time.time()
    tl["unit_pid"] = pid
    threading.Thread(target=_first_packet_out, args=(tl, pid), daemon=True).start()
    log.info("restore: %d TCP send queue(s) marked for immediate transmission", queues)
    threading.Thread(target=_reap, args=(pid,), daemon=True).start()
    log.warning("unit %s restored from epoch %d as pid %d; %s is live", name, b.epoch, pid, where)
    reprotect.start(b, unit, container, pid)


def _tcp_out_segs(pid: int) -> int:
    """TCP segments sent in pid's network namespace (a fresh standby netns starts at 0)."""
    lines = [ln.split() for ln in Path(f"/proc/{pid}/net/snmp").read_text().splitlines()
             if ln.startswith("Tcp:")]
    return int(lines[1][lines[0].index("OutSegs")])


def _first_packet_out(tl: dict[str, float], pid: int, limit: float = 10.0) -> None:
    """Stamp the timeline when the restored unit has sent its first TCP segment."""
    end = time.monotonic() + limit
    while time.monotonic() < end:
        try:
            if _tcp_out_segs(pid) > 0:
                tl["first_packet_out"] = time.time()
                return
        except (OSError, ValueError, IndexError):
            return
        time.sleep(0.001)


def _reap(pid: int) -> None:
    """Reap the restored unit (our child) once it has exited.

    Not a blocking waitpid: while the unit is protected from here, the uffd-wp
    tracker ptraces it, and a waitpid in another thread of this process would
    take the tracee's ptrace stops from the tracker (which then waits for them
    forever). A pidfd becomes readable only when the process has exited."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        select.select([fd], [], [])
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    finally:
        os.close(fd)


def serve_backup(b: Backup) -> None:
    """Run a backup agent until stopped.

    After a takeover the agent protects the unit (remus.reprotect); when that
    protection hands the unit over (planned switchover) or is fenced, this
    host has no unit any more and the agent starts over as a plain backup,
    for the primary that now runs it."""
    while True:
        b.next_life = False
        _serve_backup_once(b)
        if not b.next_life:
            return
        b.join()
        b = make_backup(b.cfg)
        log.warning("the unit runs on the other host now; this agent is its backup again (%s)",
                    b.last_sentence)


def _serve_backup_once(b: Backup) -> None:
    def handle(req: dict[str, Any]) -> dict[str, Any]:
        cmd = req.get("cmd")
        p = b.reprotector
        if cmd == "status":
            return {"ok": True, **b.status(), "protection": p.status() if p else None}
        if cmd == "set-interval" and p is not None:
            from remus.config import check_interval

            p.set_interval(check_interval(float(req["seconds"])))
            return {"ok": True, "interval_ms": p.cfg.timing.interval * 1000}
        if cmd == "switchover":
            if p is None:
                raise RemusError("this is the backup: run `remus switchover` on the primary's "
                                 "host")
            return {"ok": True, **p.switchover(float(req.get("seconds", 30.0)))}
        if cmd == "failover":
            if b.state == "replicating" and not req.get("force"):
                raise RemusError("the primary is still connected: stop or fence it first "
                                 "(remus stop on the primary, or power it off), or pass --force")
            b.failover("manual failover")
            return {"ok": True, **b.status()}
        if cmd == "stop":
            b.stop()
            return {"ok": True, "message": "backup agent stopping"}
        raise RemusError(f"the backup does not understand {cmd!r}")

    name = b.cfg.extra.get("name", "default")
    ctl = ControlServer(socket_path("backup", name), handle)
    ctl.start()
    prev = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    for s in prev:
        signal.signal(s, lambda *_: b.stop())
    try:
        b.run()
        while b.state == "active" and not b.stop_event.is_set():
            time.sleep(0.2)
    finally:
        if b.reprotector is not None:
            # A clean stop: the restored unit keeps running, unprotected
            # (remus.reprotect releases its output when its loop returns).
            b.reprotector.stop("agent stopping")
            b.reprotect_thread.join(timeout=10)
        ctl.close()
        for s, h in prev.items():
            signal.signal(s, h)


def make_backup(cfg: BackupConfig) -> Backup:
    try:
        cfg.workdir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise FatalError(f"--workdir {cfg.workdir}: {e.strerror}") from e
    threading.Thread(target=Criu().warm_up, name="criu-warm-up", daemon=True).start()
    threading.Thread(target=container_warm_up, name="rtnl-warm-up", daemon=True).start()
    return Backup(cfg, prepare=prepare_standby, takeover=takeover)
