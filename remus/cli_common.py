"""What the CLI modules share: the error type, durations, keys, timing options."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from remus.config import Timing, fmt_ms, parse_duration
from remus.errors import RemusError

if TYPE_CHECKING:
    from remus.protocol.keys import KeyRing


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


def _load_key(path: str) -> KeyRing:
    """The key file's ring: checked now, read again by the agents when it changes
    (a key rotation needs no restart)."""
    from remus.protocol.keys import KeyRing

    try:
        return KeyRing(Path(path))
    except RemusError as e:
        raise CliError(str(e)) from e


def _timing(interval: float, heartbeat: float, lease: float, takeover: float) -> Timing:
    t = Timing(interval=interval, heartbeat=heartbeat, lease=lease, takeover_timeout=takeover)
    try:
        return t.validate(_timing_labels(t))
    except RemusError as e:
        raise CliError(str(e)) from e


def _timing_labels(t: Timing) -> dict[str, str]:
    """Each timing setting named by where its value came from: a flag, the
    configuration file, or the built-in default."""
    ctx = click.get_current_context(silent=True)
    path = ctx.find_root().meta.get("config_path") if ctx else None
    out = {}
    for k in ("interval", "heartbeat", "lease", "takeover_timeout"):
        flag = f"--{k.replace('_', '-')} {fmt_ms(getattr(t, k))}"
        src = ctx.get_parameter_source(k) if ctx else None
        if src is click.core.ParameterSource.DEFAULT_MAP:
            out[k] = f"{k.replace('_', '-')} = {fmt_ms(getattr(t, k))} from {path}"
        elif src is click.core.ParameterSource.DEFAULT:
            out[k] = f"{flag} (default)"
        else:
            out[k] = flag
    return out


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
                     help="Silence after which the backup declares the primary dead (up to "
                          "max(1 s, 3x) longer while the primary's host still acknowledges "
                          "TCP: its agent may only be stalled)."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f
