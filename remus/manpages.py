"""Man pages from the click commands: `python -m remus.manpages DIR` writes
remus.1 and remus-COMMAND.1 (remus-ctl-add.1, ...) for every command, with
the same text as `--help`. bin/install puts them in share/man/man1."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Iterator
from pathlib import Path

import click


def _esc(text: str) -> str:
    out = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join(("\\&" + ln) if ln.startswith((".", "'")) else ln for ln in out.splitlines())


def _walk(cmd: click.Command, path: list[str]) -> Iterator[tuple[list[str], click.Command]]:
    yield path, cmd
    if isinstance(cmd, click.Group):
        for name in sorted(cmd.commands):
            yield from _walk(cmd.commands[name], [*path, name])


def page(path: list[str], cmd: click.Command, version: str) -> str:
    name = "-".join(path)
    ctx = click.Context(cmd, info_name=" ".join(path))
    lines = [f'.TH "{name.upper()}" "1" "" "remus {version}" "remus manual"',
             ".SH NAME", f"{_esc(name)} \\- {_esc(cmd.get_short_help_str(200))}",
             ".SH SYNOPSIS", f".B {_esc(' '.join(path))}",
             _esc(" ".join(cmd.collect_usage_pieces(ctx)))]
    if cmd.help:
        text = inspect.cleandoc(click.unstyle(cmd.help).replace("\b\n", ""))
        lines += [".SH DESCRIPTION", ".nf", _esc(text), ".fi"]
    opts = [p for p in cmd.params if isinstance(p, click.Option) and not p.hidden]
    if opts:
        lines.append(".SH OPTIONS")
        for p in opts:
            rec = p.get_help_record(ctx)
            if rec:
                lines += [".TP", f"\\fB{_esc(rec[0])}\\fR", _esc(rec[1])]
    if isinstance(cmd, click.Group):
        lines.append(".SH COMMANDS")
        for sub in sorted(cmd.commands):
            lines += [".TP", f"\\fB{_esc(sub)}\\fR",
                      _esc(cmd.commands[sub].get_short_help_str(200)),
                      f"See \\fB{_esc(name)}\\-{_esc(sub)}\\fR(1)."]
    lines += [".SH SEE ALSO", "The docs/ directory of remus (installed in share/doc/remus)."]
    return "\n".join(lines) + "\n"


def write_all(out: Path) -> list[Path]:
    from importlib.metadata import version

    from remus.cli import cli
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path, cmd in _walk(cli, ["remus"]):
        f = out / f"{'-'.join(path)}.1"
        f.write_text(page(path, cmd, version("remus")))
        written.append(f)
    return written


if __name__ == "__main__":
    for f in write_all(Path(sys.argv[1] if len(sys.argv) > 1 else "man")):
        print(f)
