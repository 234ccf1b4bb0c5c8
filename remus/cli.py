"""remus command line: thin commands over the modules (see `remus --help`)."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import re
import secrets
import signal
import sys
from pathlib import Path
from typing import Any

import click

from remus.checkpoint.tracking import DEFAULT_MODE as DEFAULT_DIRTY_TRACKING
from remus.checkpoint.tracking import MODES as DIRTY_TRACKING_MODES
from remus.config import DEFAULT_PORT, Timing, parse_addr, parse_duration
from remus.errors import RemusError
from remus.options import DEFAULT_ON_PEER_LOSS, ON_PEER_LOSS, PrimaryOptions

log = logging.getLogger("remus")

HELP = """Remus-style high availability for an unmodified Linux process.

\b
Typical use (two hosts, a pre-shared key on both):
  remus keygen /etc/remus/key                       # once; copy to both hosts
  remus backup --listen 0.0.0.0 --key-file /etc/remus/key      # on the backup
  remus run --backup BACKUP_HOST --key-file /etc/remus/key \\
      --vip 10.0.0.100/24 --dev eth0 -- redis-server --port 6379  # on the primary
  remus status                                      # on either host
  remus set-interval 25ms                           # tune the epoch live

Every epoch (default 50 ms) the unit is paused, checkpointed with CRIU and its
changes sent to the backup; its network output of that epoch leaves the host
only after the backup acknowledged. If the primary dies, the backup resumes
the last acknowledged checkpoint with the same address and TCP connections.
"""


class CliError(click.ClickException):
    """A one-line error and exit status 1."""


class Duration(click.ParamType):  # type: ignore[type-arg]
    name = "DURATION"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(value, f"--{param.name}" if param else "duration")
        except RemusError as e:
            self.fail(str(e), param, ctx)


DURATION = Duration()


def _setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    from remus import stallwatch

    stallwatch.start_from_env()
    # `kill -USR1 AGENT` prints every thread's stack to the agent's stderr (a hang).
    faulthandler.register(signal.SIGUSR1, all_threads=True)


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="remus")
def cli(verbose: int) -> None:
    _setup_logging(verbose)


def _load_key(path: str) -> bytes:
    from remus.protocol import load_key

    try:
        return load_key(Path(path))
    except RemusError as e:
        raise CliError(str(e)) from e


def _timing(interval: float, heartbeat: float, lease: float, takeover: float) -> Timing:
    try:
        return Timing(interval=interval, heartbeat=heartbeat, lease=lease,
                      takeover_timeout=takeover).validate()
    except RemusError as e:
        raise CliError(str(e)) from e


def _require_root() -> None:
    if os.geteuid() != 0:
        raise CliError("must run as root (CRIU, namespaces and netfilter need it)")


def timing_options(f: Any) -> Any:
    opts = [
        click.option("--interval", type=DURATION, default="50ms", show_default=True,
                     help="Epoch length: output waits up to this long plus the ACK round trip."),
        click.option("--heartbeat", type=DURATION, default="50ms", show_default=True,
                     help="Heartbeat period on the replication link."),
        click.option("--lease", type=DURATION, default="200ms", show_default=True,
                     help="The primary releases output only while its lease (renewed by ACKs "
                          "and heartbeats) is valid. Must be < --takeover-timeout."),
        click.option("--takeover-timeout", type=DURATION, default="300ms", show_default=True,
                     help="Silence after which the backup declares the primary dead."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


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
        click.option("--rejoin/--no-rejoin", default=True, show_default=True,
                     help="If the backup has taken over (this primary was replaced, e.g. after "
                     "a partition or a long stop), become the new primary's backup: the stale "
                     "copy of the unit is killed, its held output dropped, and this agent "
                     "listens where the new primary looks for a backup (this host's address on "
                     "the link, the backup's port). --no-rejoin: exit instead."),
        click.option("--rejoin-workdir", default=None, type=click.Path(file_okay=False),
                     help="Store of this host as a rejoined backup (default /var/lib/remus/NAME)."),
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
        **more,
    )


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


@cli.command(context_settings={"ignore_unknown_options": True})
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


@cli.command()
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

    click.echo(f"remus: {POLICY_SAYS[p.cfg.on_peer_loss]}", err=True)
    try:
        serve_primary(p, name, on_stop)
    except FatalError:
        if p.role.state is not P.FENCED or not kw["rejoin"]:
            raise
    else:
        if p.role.state is not P.HANDED_OVER or not kw["rejoin"]:
            return
        workdir = Path(kw["rejoin_workdir"] or f"/var/lib/remus/{name}")
        b = make_backup(rejoin_config(p, workdir, p.cfg.state_dirs))
        click.echo(f"remus: the unit runs on the backup's host now; this host is now its backup, "
                   f"listening on "
                   f"{b.cfg.listen[0]}:{b.cfg.listen[1]} ({b.last_sentence})", err=True)
        serve_backup(b)


POLICY_SAYS = {
    "stall": ("--on-peer-loss stall: if the backup is lost, the unit's output stays held "
              "(the service stops answering) until a backup returns or takes over; never two "
              "active copies. Use continue to keep serving unprotected instead."),
    "continue": ("--on-peer-loss continue: if the backup is lost, the unit keeps serving "
                 "UNPROTECTED (a failure of this host then loses its state), and the backup "
                 "never takes over by itself (a partition would make two active copies)."),
}


@cli.command()
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
@click.option("--reprotect", default="auto", show_default=True, metavar="auto|off|HOST[:PORT]",
              help="After a takeover, protect the unit in turn: the restored unit runs solo "
              "(unprotected, output flows) until a backup answers there, then output commit "
              "resumes by itself. auto: the old primary's host (the address it announced; "
              "start `remus backup` there when it is back). off: stay unprotected.")
@timing_options
def backup(listen: str, key_file: str, workdir: str, no_auto_failover: bool,
           state_dirs: tuple[str, ...], reprotect: str, **kw: Any) -> None:
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
        extra={"name": str(addr[1])})
    if reprotect not in ("auto", "off"):
        parse_addr(reprotect, DEFAULT_PORT)  # a bad address fails now, not at takeover
    try:
        b = make_backup(cfg)
        click.echo(f"remus: backup listening on {addr[0]}:{addr[1]}; {b.last_sentence}", err=True)
        serve_backup(b)
    except RemusError as e:
        raise CliError(str(e)) from e


def _agent(socket: str | None, role: str | None = None) -> Path:
    from remus.control import find_agents

    if socket:
        return Path(socket)
    agents = find_agents(role)
    if not agents:
        raise CliError(f"no {role or 'remus'} agent running on this host (looked in /run/remus)")
    if len(agents) > 1:
        raise CliError("several agents run here; pick one with --socket: "
                       + ", ".join(str(a) for a in agents))
    return agents[0]


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object (a list if several agents).")
@click.option("--socket", default=None, help="Control socket of the agent.")
def status(as_json: bool, socket: str | None) -> None:
    """Show what the agents on this host are doing."""
    from remus.control import call, find_agents
    from remus.status_view import render

    paths = [Path(socket)] if socket else find_agents()
    if not paths:
        if as_json:
            click.echo(json.dumps({"role": None, "agents": []}))
        raise CliError("no remus agent running on this host")
    try:
        docs = [call(p, "status") for p in paths]
    except RemusError as e:
        raise CliError(str(e)) from e
    for d in docs:
        d.pop("ok", None)
    if as_json:
        click.echo(json.dumps(docs[0] if len(docs) == 1 else docs, indent=None))
    else:
        click.echo("\n\n".join(render(d) for d in docs))


@cli.command("set-interval")
@click.argument("duration", type=DURATION)
@click.option("--socket", default=None, help="Control socket of the primary agent.")
def set_interval(duration: float, socket: str | None) -> None:
    """Change the epoch length of the running primary at once (25ms, 0.2s)."""
    from remus.config import check_interval
    from remus.control import call

    try:
        check_interval(duration)
        ans = call(_agent(socket, "primary"), "set-interval", seconds=duration)
    except RemusError as e:
        raise CliError(str(e)) from e
    click.echo(f"interval now {ans['interval_ms']:g} ms")


@cli.command()
@click.option("--socket", default=None, help="Control socket of the agent.")
def stop(socket: str | None) -> None:
    """End protection cleanly; the unit keeps running, unprotected."""
    from remus.control import call

    try:
        ans = call(_agent(socket, "primary"), "stop")
    except RemusError as e:
        raise CliError(str(e)) from e
    click.echo(ans.get("message", "stopping"))


@cli.command()
@click.option("--force", is_flag=True, help="Even though a primary is still connected.")
@click.option("--socket", default=None, help="Control socket of the backup agent.")
def failover(force: bool, socket: str | None) -> None:
    """Promote this backup by hand (the old primary must be stopped or fenced first)."""
    from remus.control import call

    try:
        ans = call(_agent(socket, "backup"), "failover", timeout=30, force=force)
    except RemusError as e:
        raise CliError(str(e)) from e
    click.echo(f"took over: unit pid {ans.get('unit_pid')} from epoch {ans.get('epoch')}")


@cli.command()
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
def keygen(path: str, force: bool) -> None:
    """Write a new random pre-shared key (mode 0600) to PATH."""
    p = Path(path)
    if p.exists() and not force:
        raise CliError(f"{p} exists (use --force to replace it)")
    p.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32) + "\n")
    click.echo(f"wrote a 256-bit key to {p}; copy it to the other host")


def _attach_optional() -> None:
    try:
        from remus.check import check_cmd

        cli.add_command(check_cmd)
    except ImportError:  # pragma: no cover
        pass
    from remus.cli_switchover import switchover

    cli.add_command(switchover)
    try:
        from remus.cli_lab import lab

        cli.add_command(lab)
    except ImportError:  # pragma: no cover
        pass


_attach_optional()


def main() -> None:
    cli(prog_name="remus")


if __name__ == "__main__":
    main()
