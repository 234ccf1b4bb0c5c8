"""Protection that heals itself: the two role changes of a pair after a failover.

- The backup that took over protects the restored unit in turn (`start`): a
  primary for the restored pid, solo (output flows) until a backup answers at
  the old primary's address, then output commit, full checkpoint, deltas.
- A primary that learns it was replaced (fenced: the backup answered "taken
  over") has already killed its copy of the unit; it drops its held output
  and becomes the backup of the new primary (`rejoin_config`), on the address
  the new primary will look for.

Where a backup should be looked for: `remus backup --reprotect` (auto: the
address the old primary announced in its HELLO, i.e. its own end of the
link with the backup's port; off; or HOST[:PORT]).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from remus.backup import BackupConfig
from remus.cgroup import UnitCgroup
from remus.config import parse_addr
from remus.container import UnitContainer
from remus.errors import ConfigError, FatalError
from remus.netbuf import NullBuffer, make_buffer
from remus.netbuf.nfqueue_rules import QueueRules
from remus.primary import Primary
from remus.primary_config import PrimaryConfig
from remus.roles import P
from remus.unit_desc import UnitDescription

if TYPE_CHECKING:
    from remus.backup import Backup

log = logging.getLogger(__name__)

DEFAULT_PORT = 7788


def target(b: Backup) -> tuple[str, int] | None:
    """Where the new primary looks for its backup, or None (--reprotect off)."""
    how = b.cfg.reprotect
    if how == "off":
        return None
    if how == "fleet":  # asked again before each connection (fleet_backup_resolver)
        return ("", b.cfg.listen[1])
    if how != "auto":
        return parse_addr(how, b.cfg.listen[1])
    announced = (b.unit or {}).get("spec", {}).get("rejoin")
    if isinstance(announced, str) and announced:
        return parse_addr(announced, b.cfg.listen[1])
    peer = b.peer.rsplit(":", 1)[0] if b.peer else ""
    return (peer, b.cfg.listen[1]) if peer else None


def fleet_backup_resolver(coordinator: Any, unit: str, me: str
                          ) -> Callable[[], tuple[str, int] | None]:
    """The backup of a fleet's unit: where the leader placed it (remus.placement).

    Never this host (`me`): right after a takeover the placement still names us
    as the backup until the leader moves it, and a primary connecting to its own
    host's backup agent would be told "taken over" and fence the only copy."""
    from remus.fleet_store import FleetStore

    store = FleetStore(coordinator)

    def where() -> tuple[str, int] | None:
        spec = store.services().get(unit)
        p = store.placement(unit)
        if spec is None or p is None or p.backup is None or p.backup == me:
            return None
        return p.backup, spec.port

    return where


def clear_stale_rules(host_if: str) -> None:
    """Output-buffer rules a dead agent of this host left on the unit's veth would
    drop the restored unit's packets (no one reads their queue)."""
    QueueRules(host_if).remove()


def start(b: Backup, unit: UnitDescription, container: UnitContainer, pid: int) -> Primary | None:
    """After a takeover: protect the restored unit (pid) from this host, in a thread."""
    to = target(b)
    if to is None:
        log.warning("unit %s runs UNPROTECTED after the takeover (--reprotect off)", unit.name)
        return None
    spec: dict[str, Any] = (b.unit or {}).get("spec") or {}
    prot: dict[str, Any] = spec.get("protection") or {}
    host_if = container.host_if
    netbuf = str(prot.get("netbuf", "auto"))
    bridged = unit.netdesc is not None and unit.netdesc.get("bridge") is not None

    def make() -> Any:
        return make_buffer(netbuf, host_if, **({"bridged": True} if bridged else {}))

    cg = UnitCgroup(unit.name)
    timing = replace(b.cfg.timing, interval=float(prot.get("interval", b.cfg.timing.interval)))

    from remus.agents import _dump_root, _fence  # agents imports this module

    def fence() -> None:
        _fence(container, pid)

    cfg = PrimaryConfig(
        unit_id=(b.unit or {}).get("unit_id") or unit.name, spec=unit.to_json(), backup=to,
        psk=b.cfg.psk, timing=timing, pid=pid, netns_path=container.netns_path,
        dump_root=_dump_root(unit.name), compress=bool(prot.get("compress", True)),
        dirty_tracking=str(prot.get("dirty_tracking", "auto")),
        on_peer_loss=str(spec.get("on_peer_loss", "stall")), fence=fence,
        state_dirs=list(b.cfg.state_dirs), unit_pids=cg.pids, buffer_factory=make,
        start_solo=True, protection={"netbuf": netbuf}, coordinator=b.cfg.coordinator,
        coord_me=b.local_ip,
        backup_resolver=(fleet_backup_resolver(b.cfg.coordinator, unit.name, b.local_ip)
                         if b.cfg.reprotect == "fleet" else None))
    p = Primary(cfg, NullBuffer())
    p.generation = max(p.generation, b.generation)  # newer than anything restored
    b.reprotector = p
    b.reprotect_thread = threading.Thread(target=_run, args=(b, p), name="reprotect",
                                          daemon=True)
    b.reprotect_thread.start()
    log.warning("unit %s runs SOLO (unprotected) until a backup answers at %s:%d; protection "
                "then resumes by itself", unit.name, *to)
    return p


def _run(b: Backup, p: Primary) -> None:
    released = False
    try:
        p.run()
        released = p.release_on_stop()
    except FatalError as e:
        log.error("protection of the restored unit ended: %s", e)
    except Exception:
        log.exception("protection of the restored unit failed")
    finally:
        p.close(release_output=released or p.acked < 0 or not p.role.output_held)
    if p.role.state in (P.HANDED_OVER, P.FENCED) and not b.stop_event.is_set():
        # The unit runs on the other host now: become its backup (serve_backup).
        b.next_life = True
        b.stop()


def rejoin_config(p: Primary, workdir: Path, state_dirs: list[Path]) -> BackupConfig:
    """A fenced primary's next life: the backup of the primary that replaced it.

    It listens where the new primary looks for it (our end of the last link,
    the backup's port). What it held is gone: the unit was killed by the fence,
    its held output is dropped here and its dumps were removed by close()."""
    if p.local_ip is None:
        raise ConfigError("cannot rejoin as a backup: this primary never reached its backup")
    p.buffer.close(release_all=False)
    return BackupConfig(listen=(p.local_ip, p.cfg.backup[1]), psk=p.cfg.psk, workdir=workdir,
                        timing=p.cfg.timing, state_dirs=state_dirs,
                        coordinator=p.cfg.coordinator,
                        reprotect="fleet" if p.cfg.backup_resolver is not None else "auto",
                        extra={"name": str(p.cfg.backup[1])})
