"""Where each service of a fleet runs, and where its backup goes (pure).

The fleet's leader agent (remus.fleet) calls `place` with what the
coordinator says: the live hosts, the services, the unit records (who runs
each unit: the pair's own CAS decides that, never placement) and the current
placements. It returns the placements to write. Rules:

- a unit that runs somewhere stays there (its record names the primary);
  a new service goes to its preferred host if alive, else to the live host
  carrying the fewest units (then: the most free memory);
- its backup stays where it is while that host is alive and is not the
  primary's; otherwise another live host is chosen, never the primary's,
  with enough free memory for the unit (its checkpoint size when known),
  preferring hosts that carry fewer units; none: the service is degraded;
- a service with a pending `remus ctl switchover --to HOST` gets its backup on
  HOST (alive, not the primary's), so that HOST is in step before it takes over;
- nothing is written that did not change.
"""

from __future__ import annotations

from dataclasses import dataclass

from remus.coordinator import UnitRecord

#: free memory a host needs to take a unit whose size is not known yet
DEFAULT_NEED = 256 << 20


@dataclass(frozen=True)
class Host:
    addr: str
    mem_available: int


@dataclass(frozen=True)
class Placement:
    primary: str
    backup: str | None


def load(placements: dict[str, Placement], hosts: dict[str, Host]) -> dict[str, int]:
    """Units (primaries and backups) each live host carries."""
    n = dict.fromkeys(hosts, 0)
    for p in placements.values():
        for h in (p.primary, p.backup):
            if h in n:
                n[h] += 1
    return n


def _pick(hosts: dict[str, Host], carried: dict[str, int], need: int,
          exclude: set[str]) -> str | None:
    fits = [h for h in hosts.values() if h.addr not in exclude and h.mem_available >= need]
    if not fits:
        return None
    best = min(fits, key=lambda h: (carried.get(h.addr, 0), -h.mem_available, h.addr))
    return best.addr


def place(services: list[str], hosts: dict[str, Host], records: dict[str, UnitRecord],
          current: dict[str, Placement], sizes: dict[str, int] | None = None,
          prefer: dict[str, str] | None = None,
          backup_to: dict[str, str] | None = None) -> dict[str, Placement]:
    """The placements that must change (service -> new placement). `prefer`: the
    host a new service should start on, when it is alive (`remus ctl add --on`).
    `backup_to`: the host a service's backup must move to (`ctl switchover --to`)."""
    sizes, prefer, backup_to = sizes or {}, prefer or {}, backup_to or {}
    out: dict[str, Placement] = {}
    planned = dict(current)
    for name in sorted(services):
        need = max(DEFAULT_NEED, sizes.get(name, 0))
        rec, cur = records.get(name), current.get(name)
        carried = load(planned, hosts)
        if rec is not None:
            primary = rec.primary
        elif cur is not None and cur.primary in hosts:
            primary = cur.primary
        elif prefer.get(name) in hosts:
            primary = prefer[name]
            carried[primary] = carried.get(primary, 0) + 1
        else:
            picked = _pick(hosts, carried, need, set())
            if picked is None:
                continue  # no live host at all: nothing to place it on
            primary = picked
            carried[primary] = carried.get(primary, 0) + 1
        # Where the backup is: the placement's, else the record's (a coordinator that
        # lost its data gets the record back from the primary, not the placement).
        backup = cur.backup if cur is not None else (rec.backup if rec is not None else None)
        if backup_to.get(name) in hosts and backup_to[name] != primary:
            backup = backup_to[name]
        elif backup is None or backup == primary or backup not in hosts:
            backup = _pick(hosts, carried, need, {primary})
        new = Placement(primary, backup)
        if new != cur:
            out[name] = new
            planned[name] = new
    return out
