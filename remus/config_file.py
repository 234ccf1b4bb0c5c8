"""The configuration file: /etc/remus/remus.toml, or `remus --config FILE`.

Everything a flag of the agent commands sets, as TOML; a flag on the command
line overrides the file. Keys are the long flags without the dashes (`-` or
`_` alike: `key-file`, `key_file`). Sections:

    [timing]    interval, heartbeat, lease, takeover-timeout: every agent command
    [common]    any setting of several commands (key-file, coordinator, ...): each
                command takes the keys it has and ignores the others; also
                `criu`, the CRIU binary (as `remus --criu`)
    [run]       remus run (and remus protect, which has the same settings)
    [protect]   remus protect only (over [run])
    [backup]    remus backup
    [agent]     remus agent (a fleet host)

A key a section's command does not have, a section that does not exist, a
value of the wrong type or timing settings that contradict each other are
refused when the file is loaded, with the file, the section and the key; a
timing conflict names both settings (`remus config check` shows what each
command would use). Durations are strings with a unit ("50ms", "0.2s") or
seconds as numbers.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import click

from remus.config import Timing, fmt_ms, parse_duration
from remus.errors import ConfigError

DEFAULT_PATH = Path(os.environ.get("REMUS_CONFIG", "/etc/remus/remus.toml"))
TIMING_KEYS = ("interval", "heartbeat", "lease", "takeover_timeout")
# The commands a file configures, and the sections each reads, weakest first.
COMMANDS: dict[str, tuple[str, ...]] = {
    "run": ("common", "timing", "run"),
    "protect": ("common", "timing", "run", "protect"),
    "backup": ("common", "timing", "backup"),
    "agent": ("common", "timing", "agent"),
}
SECTIONS = ("common", "timing", "run", "protect", "backup", "agent")
# Flags that are never read from a file: what one invocation is about.
NOT_FROM_FILE = {"help", "command", "pid", "json", "as_json", "verbose"}


def _key(name: str) -> str:
    return name.strip().lstrip("-").replace("-", "_")


def _names(cmd: click.Command) -> dict[str, click.Parameter]:
    """Every accepted file key of a command -> its parameter."""
    out: dict[str, click.Parameter] = {}
    for p in cmd.params:
        if not isinstance(p, click.Option) or p.name in NOT_FROM_FILE or p.name is None:
            continue
        for opt in (*p.opts, *p.secondary_opts):
            if opt.startswith("--") and not opt.startswith("--no-"):
                out[_key(opt)] = p
        out[p.name] = p
    return out


def _value(p: click.Parameter, raw: Any, where: str) -> Any:
    """A TOML value as the parameter's default (click converts it as a flag's text)."""
    if isinstance(p, click.Option) and p.is_flag:
        if not isinstance(raw, bool):
            raise ConfigError(f"{where}: expected true or false, got {raw!r}")
        return raw
    if p.multiple:
        items = raw if isinstance(raw, list) else [raw]
        if not all(isinstance(i, str | int | float) for i in items):
            raise ConfigError(f"{where}: expected a list of strings, got {raw!r}")
        return [str(i) for i in items]
    if isinstance(raw, bool) or not isinstance(raw, str | int | float):
        raise ConfigError(f"{where}: expected a string or a number, got {raw!r}")
    return str(raw) if isinstance(raw, str) else raw


def load(path: Path, commands: Mapping[str, click.Command]) -> dict[str, dict[str, Any]]:
    """The file as click's default_map: {command: {parameter name: value}}."""
    try:
        doc = tomllib.loads(path.read_text())
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    for section, body in doc.items():
        if section not in SECTIONS or not isinstance(body, dict):
            raise ConfigError(f"{path}: unknown section [{section}] (known: "
                              f"{', '.join(f'[{s}]' for s in SECTIONS)})")
    for key in doc.get("timing", {}):
        if _key(key) not in TIMING_KEYS:
            raise ConfigError(f"{path}: [timing] {key}: not a timing setting (known: "
                              f"{', '.join(k.replace('_', '-') for k in TIMING_KEYS)})")
    out: dict[str, dict[str, Any]] = {}
    sources: dict[str, dict[str, str]] = {}
    for name, sections in COMMANDS.items():
        cmd = commands.get(name)
        if cmd is None:
            continue
        accepted = _names(cmd)
        values: dict[str, Any] = {}
        where_of: dict[str, str] = {}
        for section in sections:
            for key, raw in doc.get(section, {}).items():
                p = accepted.get(_key(key))
                where = f"{path}: [{section}] {key}"
                if p is None:
                    if section in ("common", "timing"):
                        continue  # a setting of another command
                    if section == "run" and name == "protect":
                        continue
                    raise ConfigError(f"{where}: `remus {name}` has no such setting "
                                      f"(its settings: {', '.join(sorted(_visible(accepted)))})")
                values[str(p.name)] = _value(p, raw, where)
                where_of[str(p.name)] = f"[{section}] {key}"
        out[name] = values
        sources[name] = where_of
    check_timing(path, out, sources)
    return out


def criu_from(path: Path) -> str | None:
    """`criu` of [common] (the CRIU binary), or None; a file that does not parse
    says so when a command loads it."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    value = doc.get("common", {}).get("criu")
    return str(value) if isinstance(value, str) else None


def _visible(accepted: Mapping[str, click.Parameter]) -> Iterable[str]:
    return {o[2:] for p in accepted.values() for o in p.opts if o.startswith("--")}


def check_timing(path: Path, default_map: Mapping[str, Mapping[str, Any]],
                 sources: Mapping[str, Mapping[str, str]]) -> None:
    """Each command's timing, file over built-in defaults, must hold together;
    a conflict names both settings and where they come from."""
    for name, values in default_map.items():
        t: dict[str, float] = {}
        labels: dict[str, str] = {}
        for k in TIMING_KEYS:
            default = getattr(Timing(), k)
            raw = values.get(k, default)
            where = sources.get(name, {}).get(k)
            t[k] = parse_duration(raw, f"{path}: {where or k}")
            labels[k] = (f"{where} = {fmt_ms(t[k])}" if where else
                         f"{k.replace('_', '-')} = {fmt_ms(t[k])} (built-in default)")
        try:
            Timing(**t).validate(labels)
        except ConfigError as e:
            raise ConfigError(f"{path} (for `remus {name}`): {e}") from e
