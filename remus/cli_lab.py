"""`remus lab ...`: the two-host lab (see remus.lab). Thin layer over Lab."""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from remus.errors import RemusError
from remus.lab import Lab
from remus.lab_layout import HOSTS

F = TypeVar("F", bound=Callable[..., Any])


class LabCommandError(click.ClickException):
    """A RemusError shown as one line with a non-zero exit."""


def _errors_to_click(fn: F) -> F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except RemusError as e:
            raise LabCommandError(str(e)) from e

    return wrapper  # type: ignore[return-value]


HOST = click.Choice(list(HOSTS))


@click.group()
def lab() -> None:
    """Five emulated machines (pri, bak, client, coord, spare) in network + mount namespaces."""


@lab.command()
@_errors_to_click
def up() -> None:
    """Create the lab, repair links, reboot crashed hosts (idempotent)."""
    Lab().up()
    click.echo("lab up")


@lab.command()
@_errors_to_click
def down() -> None:
    """Remove every namespace, link, mount, cgroup and process of the lab."""
    Lab().down()
    click.echo("lab down")


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@_errors_to_click
def status(as_json: bool) -> None:
    """One line per host; exit 1 if the lab is not up."""
    st = Lab().status()
    if as_json:
        click.echo(json.dumps(st, indent=2))
        return
    if not st["up"]:
        raise LabCommandError(f"lab is not up (lab dir {st['lab_dir']}); run `remus lab up`")
    click.echo(f"{'HOST':<8}{'ADDR':<14}{'MAC':<19}{'LINK':<9}{'STATE':<9}{'PROCS':>5}")
    for name, h in st["hosts"].items():
        state = "crashed" if h["crashed"] else ("alive" if h["alive"] else "broken")
        click.echo(
            f"{name:<8}{h['addr']:<14}{h['mac']:<19}{h['link']:<9}{state:<9}{h['procs']:>5}"
        )
    click.echo(f"vip {st['vip']} on {st['dev']}; lab dir {st['lab_dir']}")


@lab.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("host")
@click.argument("cmd", nargs=-1, required=True, type=click.UNPROCESSED)
@_errors_to_click
def exec(host: str, cmd: tuple[str, ...]) -> None:  # noqa: A001 (the command's name)
    """Run CMD on HOST (its netns, mount namespace and cgroup); CMD's exit status."""
    args = list(cmd)
    if args[:1] == ["--"]:  # kept by click when options are not parsed after HOST
        args = args[1:]
    argv = Lab().exec_argv(host, args)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(argv[0], argv)


@lab.command()
@click.argument("host", type=HOST)
@_errors_to_click
def crash(host: str) -> None:
    """Power cut: freeze HOST, cut its link, kill all its processes."""
    Lab().crash(host)
    click.echo(f"{host} crashed")


if __name__ == "__main__":
    lab()
