"""remus command line: thin commands over the modules (see `remus --help`)."""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import click

from remus.cli_common import DURATION, CliError
from remus.errors import RemusError

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


class JsonLogFormatter(logging.Formatter):
    """One JSON object per line, for log shippers (`--log-format json`)."""

    def format(self, record: logging.LogRecord) -> str:
        doc = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{record.msecs:03.0f}",
               "level": record.levelname.lower(), "logger": record.name,
               "message": record.getMessage(), "pid": record.process,
               "thread": record.threadName}
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc)


def _setup_logging(verbose: int, fmt: str = "text") -> None:
    level = logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING
    logging.basicConfig(level=level, stream=sys.stderr,
                        format="%(asctime)s %(levelname).1s %(name)s: %(message)s")
    # Progress of long work (a full checkpoint of a large unit) is said even
    # without -v: a foreground command is never silent for minutes.
    logging.getLogger("remus.progress").setLevel(logging.INFO)
    if fmt == "json":
        for h in logging.getLogger().handlers:
            h.setFormatter(JsonLogFormatter())
    from remus import stallwatch

    stallwatch.start_from_env()
    # `kill -USR1 AGENT` prints every thread's stack to the agent's stderr (a hang).
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    except (ValueError, OSError):  # stderr is no file (e.g. click's test runner)
        pass


@click.group(help=HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Settings for the agent commands (default /etc/remus/remus.toml when it "
              "exists; docs/config.md). Flags override it.")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="json: one JSON object per log line (for log shippers).")
@click.option("--criu", "criu_path", type=click.Path(dir_okay=False), default=None,
              help="The CRIU binary (>= 4.2) to use; default: REMUS_CRIU, `criu` in [common] "
              "of the configuration file, this checkout's build, or PATH (`remus check` says "
              "which and why).")
@click.version_option(package_name="remus")
@click.pass_context
def cli(ctx: click.Context, verbose: int, config_path: str | None, log_format: str,
        criu_path: str | None) -> None:
    _setup_logging(verbose, log_format)
    from remus import config_file

    path = Path(config_path) if config_path else config_file.DEFAULT_PATH
    ctx.meta["config_path"] = path if (config_path or path.exists()) else None
    # Children (CRIU wrappers, agents the fleet starts) inherit the choice.
    if criu_path:
        os.environ["REMUS_CRIU"], os.environ["REMUS_CRIU_FROM"] = criu_path, "--criu"
    elif ctx.meta["config_path"] is not None and "REMUS_CRIU" not in os.environ:
        from_file = config_file.criu_from(path)
        if from_file:
            os.environ["REMUS_CRIU"] = from_file
            os.environ["REMUS_CRIU_FROM"] = f"{path} [common] criu"
    if ctx.meta["config_path"] is not None and (
            ctx.invoked_subcommand in config_file.COMMANDS or ctx.invoked_subcommand == "config"):
        try:
            ctx.default_map = config_file.load(path, cli.commands)
        except RemusError as e:
            raise CliError(str(e)) from e


@cli.command("config")
@click.option("--json", "as_json", is_flag=True, help="As JSON.")
@click.pass_context
def config_cmd(ctx: click.Context, as_json: bool) -> None:
    """Check the configuration file and show what each agent command takes from it.

    Exits non-zero, naming the file, section and key, if the file is invalid
    (including timing settings that contradict each other)."""
    path = ctx.meta.get("config_path")
    commands: dict[str, Any] = dict((ctx.parent.default_map if ctx.parent else None) or {})
    doc = {"file": str(path) if path else None, "commands": commands}
    if as_json:
        click.echo(json.dumps(doc, indent=1, default=str))
        return
    if path is None:
        click.echo("no configuration file (/etc/remus/remus.toml does not exist); "
                   "every setting comes from flags and built-in defaults")
        return
    click.echo(f"{path}: valid")
    for name, values in commands.items():
        shown = ", ".join(f"{k.replace('_', '-')}={v}" for k, v in sorted(values.items()))
        click.echo(f"  remus {name}: {shown or '(nothing)'}")


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
@click.option("--force", is_flag=True,
              help="Even while the backup is lost (it may have taken over): release the "
                   "unit's output anyway. Only when you know it has not and cannot.")
@click.option("--socket", default=None, help="Control socket of the agent.")
def stop(force: bool, socket: str | None) -> None:
    """End protection cleanly; the unit keeps running, unprotected.

    The backup is told (it does not take over). While the backup is lost and
    might take over (--on-peer-loss stall, or a coordinator), stop is refused:
    releasing the held output could serve the unit twice. Find out on the
    backup first; --force releases anyway."""
    from remus.control import call

    try:
        ans = call(_agent(socket, "primary"), "stop", force=force)
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


KEYGEN_HELP = """Write a new random 256-bit pre-shared key (mode 0600) to PATH,
or rotate the keys of PATH without downtime.

The key authenticates both agents and encrypts the replication stream
(AES-256-GCM with per-connection keys from an X25519 exchange). Every host
of a pair or fleet needs the same file.

\b
Rotation, three phases; finish each phase on every host before the next:
  remus keygen --stage FILE     # 1. add a new key: accepted, not used yet
                                #    (copy FILE to every host)
  remus keygen --promote FILE   # 2. the new key is used from now (every host)
  remus keygen --retire FILE    # 3. drop the old key (every host)

Running agents read FILE again for each new connection; connections already
open keep their session keys. Nothing restarts, no checkpoint is lost.
"""


@cli.command(help=KEYGEN_HELP)
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--force", is_flag=True, help="Overwrite an existing key file.")
@click.option("--stage", "phase", flag_value="stage", help="Rotation 1: add a new key.")
@click.option("--promote", "phase", flag_value="promote",
              help="Rotation 2: use the newest key from now on.")
@click.option("--retire", "phase", flag_value="retire", help="Rotation 3: keep only the key in use.")
@click.option("--json", "as_json", is_flag=True, help="Print the outcome as JSON.")
def keygen(path: str, force: bool, phase: str | None, as_json: bool) -> None:
    from remus.protocol import keys as K

    p = Path(path)
    try:
        if phase is None:
            if p.exists() and not force:
                raise CliError(f"{p} exists (use --force to replace it, or --stage to rotate)")
            new: tuple[bytes, ...] = (K.new_key(),)
            said = f"wrote a 256-bit key to {p}; copy it to the other host(s)"
        else:
            old = K.load_keys(p)
            new = {"stage": K.stage, "promote": K.promote, "retire": K.retire}[phase](old)
            said = {
                "stage": "staged a new key (accepted, not used yet). Copy the file to every "
                         "host, then run --promote on each.",
                "promote": "the newest key is used from now on. Run --promote on every host, "
                           "then --retire on each.",
                "retire": f"kept only the key in use; dropped {len(old) - 1}.",
            }[phase]
        K.write_keys(p, new)
    except RemusError as e:
        raise CliError(str(e)) from e
    prints = [K.fingerprint(k) for k in new]
    if as_json:
        click.echo(json.dumps({"path": str(p), "phase": phase or "new", "keys": prints,
                               "sealing": prints[0]}))
    else:
        click.echo(f"{p}: {said}")
        click.echo(f"keys (fingerprints, first seals): {', '.join(prints)}")


def _attach_optional() -> None:
    try:
        from remus.check import check_cmd

        cli.add_command(check_cmd)
    except ImportError:  # pragma: no cover
        pass
    from remus.cli_agents import backup, protect, run
    from remus.cli_fleet import agent, ctl
    from remus.cli_switchover import switchover

    for cmd in (run, protect, backup, switchover, agent, ctl):
        cli.add_command(cmd)
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
