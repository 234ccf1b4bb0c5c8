"""`remus agent` (one per host of a fleet) and `remus ctl` (managing its services)."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import click

from remus.cli_common import DURATION, CliError, _load_key, _require_root
from remus.errors import RemusError


def _store(url: str) -> Any:
    from remus.coordinator import ZkCoordinator, parse_url
    from remus.fleet_store import FleetStore

    try:
        parse_url(url)
    except RemusError as e:
        raise CliError(str(e)) from e
    return FleetStore(ZkCoordinator(url))


@click.command()
@click.option("--coordinator", required=True, metavar="zk://HOST:PORT/PATH",
              help="The fleet's ZooKeeper (the same URL on every host and for `remus ctl`).")
@click.option("--key-file", required=True, type=click.Path(dir_okay=False),
              help="Pre-shared key of the fleet (the same file on every host).")
@click.option("--listen", required=True, metavar="ADDR",
              help="This host's address: its backups listen there, and it names the host "
              "in the coordinator.")
@click.option("--dev", default="eth0", show_default=True,
              help="This host's interface on the clients' network (where service addresses go).")
@click.option("--workdir", default="/var/lib/remus", show_default=True,
              type=click.Path(file_okay=False), help="Stores of the backups of this host.")
@click.option("--log-dir", default="/var/log/remus", show_default=True,
              type=click.Path(file_okay=False), help="One log per service agent.")
def agent(coordinator: str, key_file: str, listen: str, dev: str, workdir: str,
          log_dir: str) -> None:
    """Run a fleet host's agent: the primaries and backups placed on this host.

    One per host, started by systemd. It registers the host in the fleet,
    starts a `remus run` for each service placed here as primary and a `remus
    backup` for each placed here as backup, stops what is no longer placed
    here, and reports to the coordinator. One agent, elected, places the
    services: after a failover it chooses a new backup host (never the
    primary's, with enough memory) and protection resumes by itself.
    """
    _require_root()
    from remus.fleet import AgentConfig, FleetAgent

    _load_key(key_file)  # a bad key fails now, not in every child
    _store(coordinator)
    cfg = AgentConfig(coordinator=coordinator, key_file=Path(key_file).resolve(), me=listen,
                      dev=dev, workdir=Path(workdir), log_dir=Path(log_dir))
    a = FleetAgent(cfg)
    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, lambda *_: a.stop())
    click.echo(f"remus: fleet agent of {listen} on {coordinator}", err=True)
    a.run()


@click.group()
@click.option("--coordinator", required=True, envvar="REMUS_COORDINATOR",
              metavar="zk://HOST:PORT/PATH", help="The fleet's ZooKeeper ($REMUS_COORDINATOR).")
@click.pass_context
def ctl(ctx: click.Context, coordinator: str) -> None:
    """Manage the services of a fleet (see `remus agent`)."""
    ctx.obj = coordinator


@ctl.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.option("--vip", required=True, metavar="CIDR", help="The service's address; it moves "
              "with the unit.")
@click.option("--state-dir", "state_dirs", multiple=True, help="A state directory (repeatable).")
@click.option("--interval", type=DURATION, default="50ms", show_default=True,
              help="Epoch length.")
@click.option("--dev", default="eth0", show_default=True, help="The hosts' client interface.")
@click.option("--on", "prefer", default=None, metavar="HOST",
              help="Start it on HOST, a live host of the pool (`remus ctl hosts`); default: "
              "the least loaded.")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@click.pass_obj
def add(url: str, name: str, vip: str, state_dirs: tuple[str, ...], interval: float, dev: str,
        prefer: str | None, cmd: tuple[str, ...]) -> None:
    """Add a service: `remus ctl add NAME --vip CIDR -- CMD [ARGS]...`"""
    from remus.fleet_store import ServiceSpec
    from remus.unit import validate_name

    try:
        validate_name(name)
        store = _store(url)
        if prefer is not None and prefer not in store.hosts():
            live = ", ".join(sorted(store.hosts())) or "none"
            raise CliError(f"--on {prefer}: no live agent of the pool there (live hosts: "
                           f"{live}; `remus ctl hosts`); start `remus agent` on it first, or "
                           "leave --on out")
        spec = ServiceSpec(name=name, vip=vip, cmd=list(cmd), port=store.next_port(),
                           interval_ms=interval * 1000, state_dirs=list(state_dirs), dev=dev,
                           prefer=prefer)
        store.add_service(spec)
    except RemusError as e:
        raise CliError(str(e)) from e
    click.echo(f"added {name} ({vip}, backups on port {spec.port}); the fleet places it now")


@ctl.command("list")
@click.option("--json", "as_json", is_flag=True, help="A JSON list.")
@click.pass_obj
def list_(url: str, as_json: bool) -> None:
    """The services: where they run, where their backup is, how far it lags."""
    try:
        rows = fleet_rows(_store(url))
    except RemusError as e:
        raise CliError(str(e)) from e
    if as_json:
        click.echo(json.dumps(rows))
        return
    cols = ["service", "primary", "backup", "term", "state", "lag", "last_failover"]
    table = [[str(r[c] if r[c] is not None else "-") for c in cols] for r in rows]
    widths = [max(len(c), *(len(t[i]) for t in table)) if table else len(c)
              for i, c in enumerate(cols)]
    click.echo("  ".join(c.upper().ljust(w) for c, w in zip(cols, widths, strict=True)))
    for t in table:
        click.echo("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))


def fleet_rows(store: Any) -> list[dict[str, Any]]:
    """One row per service, as `remus ctl list` shows it (docs/fleet.md says what
    each state means)."""
    services = store.services()
    records = store.records(list(services))
    placements = store.placements()
    rows = []
    for name in sorted(services):
        rec, pl = records.get(name), placements.get(name)
        sts = store.statuses(name)
        runner = sts.get(rec.primary) if rec is not None else None
        lag = None
        if runner and runner.get("epoch") is not None and runner.get("acked_epoch") is not None:
            lag = max(0, int(runner["epoch"]) - int(runner["acked_epoch"]))
        if rec is None:
            state = "starting"
        elif rec.state == "protected":
            state = "protected"
        elif pl is not None and pl.backup is not None:
            state = "solo"  # a backup is placed, protection not back yet
        else:
            state = "degraded"  # no host can take its backup
        fo = [st.get("failover") for st in sts.values() if st.get("failover")]
        last = max((f["detected"] for f in fo if f.get("detected")), default=None)
        rows.append({"service": name, "primary": rec.primary if rec else None,
                     "backup": (rec.backup if rec and rec.state == "protected"
                                else (pl.backup if pl else None)),
                     "term": rec.term if rec else None, "state": state, "lag": lag,
                     "last_failover": (time.strftime("%H:%M:%S", time.localtime(last))
                                       if last else None)})
    return rows


@ctl.command()
@click.option("--json", "as_json", is_flag=True, help="A JSON list.")
@click.pass_obj
def hosts(url: str, as_json: bool) -> None:
    """The pool: the hosts whose agent is alive (registered), and what each runs."""
    try:
        store = _store(url)
        pool = store.hosts()
        rows = fleet_rows(store)
    except RemusError as e:
        raise CliError(str(e)) from e
    out = [{"host": h.addr, "mem_available": h.mem_available,
            "primaries": sorted(r["service"] for r in rows if r["primary"] == h.addr),
            "backups": sorted(r["service"] for r in rows if r["backup"] == h.addr)}
           for h in sorted(pool.values(), key=lambda h: h.addr)]
    if as_json:
        click.echo(json.dumps(out))
        return
    click.echo(f"{'HOST':<16}{'MEM FREE':>10}  PRIMARIES / BACKUPS")
    for o in out:
        click.echo(f"{o['host']:<16}{o['mem_available'] / 2**30:>8.1f}G  "
                   f"{', '.join(o['primaries']) or '-'} / {', '.join(o['backups']) or '-'}")


@ctl.command()
@click.argument("name")
@click.option("--to", default=None, metavar="HOST",
              help="The host that takes over. When it is not the backup now, the backup is "
                   "moved there first (a full resync; the service is solo meanwhile).")
@click.pass_obj
def switchover(url: str, name: str, to: str | None) -> None:
    """Planned: the service's backup takes over; the old primary's host becomes its backup.

    With --to HOST another host of the pool takes over: the leader moves the
    backup to HOST, the primary brings it in step, then the switchover runs.
    `remus ctl list` shows the steps; the request waits while HOST catches up."""
    try:
        store = _store(url)
        rec, _ = store.coord.read(name)
        if rec is None or rec.state != "protected":
            raise CliError(f"{name} is not protected (a switchover needs a backup in step)")
        if to is not None and to == rec.primary:
            raise CliError(f"{name} runs on {to} already")
        if to is not None and to != rec.backup and to not in store.hosts():
            raise CliError(f"{to} is not in the pool (no live `remus agent` there; see "
                           "`remus ctl hosts`)")
        store.request(name, "switchover", to)
    except RemusError as e:
        raise CliError(str(e)) from e
    if to is None or to == rec.backup:
        click.echo(f"switchover of {name} requested: {rec.primary} -> {rec.backup}")
    else:
        click.echo(f"switchover of {name} requested: its backup moves from {rec.backup} to "
                   f"{to} and catches up first, then {rec.primary} -> {to}")


@ctl.command()
@click.argument("name")
@click.pass_obj
def failover(url: str, name: str) -> None:
    """Unplanned: the backup takes over now (the old primary fences itself)."""
    try:
        store = _store(url)
        store.request(name, "failover")
    except RemusError as e:
        raise CliError(str(e)) from e
    click.echo(f"failover of {name} requested")


@ctl.command()
@click.argument("name")
@click.pass_obj
def remove(url: str, name: str) -> None:
    """Stop managing a service: its agents stop; the unit keeps running unprotected."""
    try:
        _store(url).remove_service(name)
    except RemusError as e:
        raise CliError(str(e)) from e
    click.echo(f"removed {name}")
