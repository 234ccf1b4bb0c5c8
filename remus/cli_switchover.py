"""`remus switchover`: planned, for host maintenance (see docs/roles.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from remus.config import parse_duration
from remus.errors import RemusError


class SwitchoverError(click.ClickException):
    """A RemusError shown as one line with a non-zero exit."""


def _protecting_agent(socket: str | None) -> Path:
    """The agent on this host that protects a unit: a `remus run`/`protect` agent,
    or a backup agent running the unit since a takeover."""
    from remus.control import call, find_agents

    if socket:
        return Path(socket)
    found = []
    for path in find_agents():
        try:
            st = call(path, "status")
        except RemusError:
            continue
        if st.get("role") == "primary" or st.get("protection"):
            found.append(path)
    if not found:
        raise SwitchoverError("no agent on this host runs a protected unit: run `remus "
                              "switchover` on the host that runs the service")
    if len(found) > 1:
        raise SwitchoverError("several agents protect units here; pick one with --socket: "
                              + ", ".join(str(p) for p in found))
    return found[0]


@click.command()
@click.option("--timeout", default="30s", show_default=True, metavar="DURATION",
              help="Give up (and stay primary) if the final checkpoint is not acked by then.")
@click.option("--socket", default=None, help="Control socket of the agent (if several).")
@click.option("--json", "as_json", is_flag=True, help="The report as one JSON object.")
def switchover(timeout: str, socket: str | None, as_json: bool) -> None:
    """Hand the unit to the backup, planned (for maintenance of this host).

    The unit is checkpointed once more; when the backup has acknowledged that
    checkpoint, the copy here leaves the network and is stopped, and the backup
    resumes exactly that checkpoint: no acknowledged write is lost and the
    clients' TCP connections carry on. This agent then becomes the backup of
    the new primary (unless it runs with --no-rejoin), so the pair is
    protected again by itself. On any problem before the final ACK nothing
    changes and the unit stays here, protected.
    """
    try:
        seconds = parse_duration(timeout, "--timeout")
        from remus.control import call

        ans: dict[str, Any] = call(_protecting_agent(socket), "switchover",
                                   timeout=seconds + 15, seconds=seconds)
    except RemusError as e:
        raise SwitchoverError(str(e)) from e
    ans.pop("ok", None)
    if as_json:
        click.echo(json.dumps(ans))
        return
    click.echo(f"switched over: {ans['new_primary']} runs the unit from epoch "
               f"{ans['final_epoch']}; final pause {ans.get('pause_ms') or 0:.1f} ms, acked "
               f"{ans['frozen_to_acked_ms']:.0f} ms after it, handed over "
               f"{ans['acked_to_handed_over_ms']:.0f} ms later ({ans['handed_over_by']}); "
               "this host becomes its backup")
