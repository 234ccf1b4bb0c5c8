"""`remus run`, `remus protect`, `remus backup`: the commands that start agents.

Their options, and the agents' lives after a role change (a fenced or
handed-over primary becoming the backup).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import click

from remus.checkpoint.tracking import DEFAULT_MODE as DEFAULT_DIRTY_TRACKING
from remus.checkpoint.tracking import MODES as DIRTY_TRACKING_MODES
from remus.cli_common import CliError, _load_key, _require_root, _timing, timing_options
from remus.config import DEFAULT_PORT, parse_addr
from remus.errors import RemusError
from remus.options import DEFAULT_ON_PEER_LOSS, ON_PEER_LOSS, PrimaryOptions

# `remus run`/`protect` exit status when this copy was fenced (the backup took
# over) and --no-rejoin: never restart it here (systemd/remus-run@.service).
EXIT_FENCED = 3

METRICS_OPTION = click.option(
    "--metrics", default=None, metavar="ADDR:PORT",
    help="Serve Prometheus metrics at http://ADDR:PORT/metrics (off by default; "
    "docs/metrics.md): role and state, term, epochs and lag, pause/ACK/commit-latency "
    "histograms, bytes, output held/dropped, failovers.")


def _start_metrics(addr: str | None, agent: Any) -> Any:
    """The metrics server, following this process's agent (None: off)."""
    if not addr:
        return None
    from remus.metrics import AgentCollector, serve

    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise CliError(f"--metrics {addr}: expected ADDR:PORT, e.g. 0.0.0.0:9788")
    coll = AgentCollector(agent)
    try:
        serve((host or "0.0.0.0", int(port)), coll)
    except RemusError as e:
        raise CliError(str(e)) from e
    return coll


def primary_options(f: Any) -> Any:
    opts = [
        click.option("--backup", "backup", required=True, metavar="HOST[:PORT]",
                     help=f"The backup agent's address (default port {DEFAULT_PORT})."),
        click.option("--key-file", required=True, type=click.Path(dir_okay=False),
                     help="Pre-shared key (same file as the backup's; `remus keygen`)."),
        click.option("--name", default=None, help="Unit name (default: from the command)."),
        click.option("--netbuf", type=click.Choice(["auto", "nfqueue", "plug"]), default="auto",
                     show_default=True, help="Output buffer backend."),
        click.option("--no-netbuf", is_flag=True,
                     help="MEASUREMENT ONLY: release output at once. The guarantee is OFF."),
        click.option("--compress/--no-compress", default=True, show_default=True,
                     help="lz4-compress page deltas (measured on redis: 5x fewer bytes per epoch, "
                     "no extra encode time; see bench/results/compress.json)."),
        click.option("--dirty-tracking", type=click.Choice(list(DIRTY_TRACKING_MODES)),
                     default=DEFAULT_DIRTY_TRACKING, show_default=True,
                     help="How changed memory is found. soft-dirty: CRIU memory tracking, the "
                     "freeze and the delta grow with the pages written (needs a kernel with "
                     "soft-dirty). uffd-wp: the same without soft-dirty, from userfaultfd "
                     "write-protection (Linux >= 6.7 and remus's CRIU build; a process that "
                     "never was tracked costs one full dump). diff: full dumps compared page by "
                     "page (the freeze grows with the unit). auto: soft-dirty, else uffd-wp, "
                     "else diff; `remus check` says which this host gets."),
        click.option("--on-peer-loss", type=click.Choice(list(ON_PEER_LOSS)), default=DEFAULT_ON_PEER_LOSS,
                     show_default=True, help="When the backup is gone and the lease lapsed: hold "
                     "output and let the backup take over (stall), or run unprotected and keep "
                     "serving (continue; the backup then never takes over by itself)."),
        click.option("--state-dir", "state_dirs", multiple=True, type=click.Path(file_okay=False),
                     help="A directory whose contents belong to the unit (repeatable): its "
                     "changes are captured with each checkpoint and applied on the backup only "
                     "when that checkpoint commits. The backup needs the same --state-dir."),
        click.option("--coordinator", default=None, metavar="zk://HOST:PORT/PATH",
                     help="A ZooKeeper that decides who runs the unit (a third host; one "
                     "server is enough for a pair). With it, a primary that loses its backup "
                     "runs on solo only if the coordinator agrees (else it fences itself), "
                     "and the backup takes over only if it wins there first: never two "
                     "copies, and no stall while one host is down. Replaces --on-peer-loss."),
        click.option("--rejoin/--no-rejoin", default=True, show_default=True,
                     help="If the backup has taken over (this primary was replaced, e.g. after "
                     "a partition or a long stop), become the new primary's backup: the stale "
                     "copy of the unit is killed, its held output dropped, and this agent "
                     "listens where the new primary looks for a backup (this host's address on "
                     "the link, the backup's port). --no-rejoin: exit instead."),
        click.option("--rejoin-workdir", default=None, type=click.Path(file_okay=False),
                     help="Store of this host as a rejoined backup (default /var/lib/remus/NAME)."),
        METRICS_OPTION,
        click.option("--trace", type=click.Path(dir_okay=False), default=None,
                     help="Append one JSON line per acknowledged epoch (boundary, sent, released "
                     "times, pause, bytes) to this file."),
    ]
    f = timing_options(f)
    for o in reversed(opts):
        f = o(f)
    return f


def _buffer_factory(netbuf: str, no_netbuf: bool) -> Any:
    from remus.netbuf import make_buffer

    kind = "none" if no_netbuf else netbuf
    if no_netbuf:
        click.echo("remus: WARNING: --no-netbuf: output is released before the backup has it; "
                   "clients can see state that a failover loses. Measurement only.", err=True)

    def make(host_if: str, **kw: Any) -> Any:
        return make_buffer(kind, host_if, **({} if kind == "none" else kw))

    make.kind = kind  # type: ignore[attr-defined]  # the backup re-protects with the same
    return make


def _primary_opts(kw: dict[str, Any], name: str, **more: Any) -> PrimaryOptions:
    return PrimaryOptions(
        name=name,
        backup=parse_addr(kw["backup"], DEFAULT_PORT),
        psk=_load_key(kw["key_file"]),
        timing=_timing(kw["interval"], kw["heartbeat"], kw["lease"], kw["takeover_timeout"]),
        compress=kw["compress"],
        dirty_tracking=kw["dirty_tracking"],
        on_peer_loss=kw["on_peer_loss"],
        trace=Path(kw["trace"]) if kw.get("trace") else None,
        state_dirs=_state_dirs(kw.get("state_dirs", ())),
        coordinator=_coordinator_url(kw.get("coordinator")),
        **more,
    )


def _connect_coordinator(url: str | None) -> Any:
    from remus.coordinator import ZkCoordinator

    return ZkCoordinator(_coordinator_url(url) or "") if url else None


def _coordinator_url(url: str | None) -> str | None:
    if url:
        from remus.coordinator import parse_url

        parse_url(url)  # a malformed URL fails now, with the flag's name
    return url


def _state_dirs(dirs: tuple[str, ...]) -> list[Path]:
    out = []
    for d in dirs:
        p = Path(d).resolve()
        if not p.is_dir():
            raise CliError(f"--state-dir {d}: not a directory")
        out.append(p)
    return out


def _default_name(argv: list[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "", Path(argv[0]).name) or "unit"
    return base[:10]


@click.command(context_settings={"ignore_unknown_options": True})
@primary_options
@click.option("--vip", required=True, metavar="CIDR",
              help="Service address of the unit, e.g. 10.77.0.100/24; moves on failover.")
@click.option("--dev", default="eth0", show_default=True,
              help="This host's interface on the clients' network (ARP for the VIP).")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def run(argv: tuple[str, ...], vip: str, dev: str, **kw: Any) -> None:
    """Start CMD as a protected unit: `remus run [OPTIONS] -- CMD [ARGS]...`

    CMD runs as PID 1 of its own PID namespace, in its own network namespace
    holding the VIP, in its own cgroup. It is protected from its first epoch.
    """
    _require_root()
    from remus.agents import make_run_primary

    name = kw["name"] or _default_name(list(argv))
    opts = _primary_opts(kw, name, vip=vip, dev=dev)
    try:
        p, on_stop = make_run_primary(opts, list(argv), _buffer_factory(kw["netbuf"], kw["no_netbuf"]))
        click.echo(f"remus: protecting {argv[0]} (unit {name}, pid {p.cfg.pid}, {vip}) -> "
                   f"backup {opts.backup[0]}:{opts.backup[1]} every "
                   f"{opts.timing.interval * 1000:g} ms", err=True)
        _serve_or_rejoin(p, name, on_stop, kw)
    except RemusError as e:
        raise CliError(str(e)) from e


@click.command()
@primary_options
@click.option("--host-if", default=None, help="Host side of the unit's veth (auto-detected).")
@click.argument("pid", type=int)
def protect(pid: int, host_if: str | None, **kw: Any) -> None:
    """Protect a running process PID that has its own network namespace."""
    _require_root()
    from remus.agents import make_protect_primary

    if not Path(f"/proc/{pid}").exists():
        raise CliError(f"no process with pid {pid}")
    name = kw["name"] or f"pid{pid}"
    opts = _primary_opts(kw, name, host_if=host_if)
    try:
        p, on_stop = make_protect_primary(opts, pid, _buffer_factory(kw["netbuf"], kw["no_netbuf"]))
        click.echo(f"remus: protecting pid {pid} (unit {name}) -> backup "
                   f"{opts.backup[0]}:{opts.backup[1]} every {opts.timing.interval * 1000:g} ms",
                   err=True)
        _serve_or_rejoin(p, name, on_stop, kw)
    except RemusError as e:
        raise CliError(str(e)) from e


def _serve_or_rejoin(p: Any, name: str, on_stop: Any, kw: dict[str, Any]) -> None:
    """Protect until stopped; if replaced by the backup (fenced), become its backup."""
    from remus.agents import make_backup, serve_backup, serve_primary
    from remus.errors import FatalError
    from remus.reprotect import rejoin_config
    from remus.roles import P

    click.echo(f"remus: {POLICY_SAYS['coordinator' if p.cfg.coordinator else p.cfg.on_peer_loss]}",
               err=True)
    metrics = _start_metrics(kw.get("metrics"), p)
    try:
        serve_primary(p, name, on_stop)
    except FatalError as e:
        if p.role.state is P.FENCED and not kw["rejoin"]:
            # A distinct status: a supervisor must not start this unit again here
            # (the backup runs it now). The systemd unit says RestartPreventExitStatus.
            click.echo(f"remus: {e}", err=True)
            raise SystemExit(EXIT_FENCED) from e
        if p.role.state is not P.FENCED:
            raise
    else:
        if p.role.state is not P.HANDED_OVER or not kw["rejoin"]:
            return
    # Fenced, or handed over: the unit runs on the other host; be its backup.
    workdir = Path(kw["rejoin_workdir"] or f"/var/lib/remus/{name}")
    b = make_backup(rejoin_config(p, workdir, p.cfg.state_dirs))
    click.echo(f"remus: the unit runs on the backup's host now; this host is now its backup, "
               f"listening on {b.cfg.listen[0]}:{b.cfg.listen[1]} ({b.last_sentence})", err=True)
    if metrics is not None:
        metrics.agent = b
    serve_backup(b)


POLICY_SAYS = {
    "coordinator": ("--coordinator: if the backup is lost, the unit runs on solo (unprotected) "
                    "once the coordinator agrees, or this copy fences itself if the backup "
                    "took over first; with the coordinator unreachable too, output stays held."),
    "stall": ("--on-peer-loss stall: if the backup is lost, the unit's output stays held "
              "(the service stops answering) until a backup returns or takes over; never two "
              "active copies. Use continue to keep serving unprotected instead."),
    "continue": ("--on-peer-loss continue: if the backup is lost, the unit keeps serving "
                 "UNPROTECTED (a failure of this host then loses its state), and the backup "
                 "never takes over by itself (a partition would make two active copies)."),
}


@click.command()
@click.option("--listen", default=f"0.0.0.0:{DEFAULT_PORT}", show_default=True,
              metavar="ADDR[:PORT]", help="Where primaries connect.")
@click.option("--key-file", required=True, type=click.Path(dir_okay=False),
              help="Pre-shared key (same file as the primary's).")
@click.option("--workdir", default="/var/lib/remus/backup", show_default=True,
              type=click.Path(file_okay=False), help="Committed checkpoints live here.")
@click.option("--no-auto-failover", is_flag=True,
              help="Do not take over on primary silence; wait for `remus failover`.")
@click.option("--state-dir", "state_dirs", multiple=True, type=click.Path(file_okay=False),
              help="A state directory of the unit (repeatable); same paths as the primary's. "
              "Created if missing; its contents are replaced by the primary's.")
@click.option("--coordinator", default=None, metavar="zk://HOST:PORT/PATH",
              help="The primary's coordinator (same URL): take over only after winning its "
              "compare-and-set, so a primary that is alive and went solo is never doubled.")
@click.option("--reprotect", default="auto", show_default=True, metavar="auto|off|HOST[:PORT]",
              help="After a takeover, protect the unit in turn: the restored unit runs solo "
              "(unprotected, output flows) until a backup answers there, then output commit "
              "resumes by itself. auto: the old primary's host (the address it announced; "
              "start `remus backup` there when it is back). off: stay unprotected.")
@METRICS_OPTION
@timing_options
def backup(listen: str, key_file: str, workdir: str, no_auto_failover: bool,
           state_dirs: tuple[str, ...], reprotect: str, coordinator: str | None,
           metrics: str | None, **kw: Any) -> None:
    """Run the backup agent: receive checkpoints, take over when the primary dies.

    Crash-only: kill it at any moment and start it again; it resumes with its
    last committed checkpoint and says which epoch that is.
    """
    _require_root()
    from remus.agents import make_backup, serve_backup
    from remus.backup import BackupConfig

    addr = parse_addr(listen, DEFAULT_PORT)
    dirs = [Path(d).resolve() for d in state_dirs]
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
    cfg = BackupConfig(
        listen=addr, psk=_load_key(key_file), workdir=Path(workdir),
        timing=_timing(kw["interval"], kw["heartbeat"], kw["lease"], kw["takeover_timeout"]),
        auto_failover=not no_auto_failover, state_dirs=dirs, reprotect=reprotect,
        coordinator=_connect_coordinator(coordinator),
        extra={"name": str(addr[1])})
    if reprotect not in ("auto", "off"):
        parse_addr(reprotect, DEFAULT_PORT)  # a bad address fails now, not at takeover
    try:
        b = make_backup(cfg)
        click.echo(f"remus: backup listening on {addr[0]}:{addr[1]}; {b.last_sentence}", err=True)
        _start_metrics(metrics, b)
        serve_backup(b)
    except RemusError as e:
        raise CliError(str(e)) from e
