"""The systemd units (verified by systemd-analyze) and readiness notification."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from remus import sdnotify
from remus.cli_agents import EXIT_FENCED
from remus.paths import REPO


def _render(tmp_path: Path, bin_path: Path) -> Path:
    out = tmp_path / "units"
    env = {**os.environ, "RENDER_ONLY": str(out), "PREFIX": str(bin_path.parent.parent)}
    subprocess.run([str(REPO / "bin" / "install")], env=env, check=True)
    return out


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed (apt package systemd)")
    prefix = tmp_path / "usr"
    (prefix / "bin").mkdir(parents=True)
    fake = prefix / "bin" / "remus"  # verify checks that ExecStart's binary exists
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    units = _render(tmp_path, fake)
    names = sorted(p.name for p in units.iterdir())
    assert names == ["remus-agent.service", "remus-backup.service", "remus-run@.service"]
    instance = units / "remus-run@kv.service"
    instance.symlink_to(units / "remus-run@.service")
    for u in [*units.glob("remus-[ab]*.service"), instance]:
        r = subprocess.run(["systemd-analyze", "verify", str(u)], capture_output=True,
                           text=True)
        assert r.returncode == 0 and "@BIN@" not in u.read_text(), (u.name, r.stderr)
    run = (units / "remus-run@.service").read_text()
    assert "Type=notify" in run and f"RestartPreventExitStatus={EXIT_FENCED}" in run
    assert f"ExecStart={fake} " in run


def test_notify_reaches_the_socket_systemd_gave(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sdnotify.notify("READY=1", "STATUS=protected")
        assert s.recv(100) == b"READY=1\nSTATUS=protected"
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not sdnotify.notify("READY=1")  # outside systemd: nothing, no error
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone"))
    assert not sdnotify.notify("READY=1")  # never raises


def test_a_man_page_for_every_command(tmp_path: Path) -> None:
    from remus.cli import cli
    from remus.manpages import write_all

    pages = {p.name: p.read_text() for p in write_all(tmp_path)}
    for name in ("remus.1", "remus-run.1", "remus-backup.1", "remus-keygen.1",
                 "remus-ctl-add.1", "remus-config.1", "remus-check.1"):
        assert name in pages, sorted(pages)
    run = pages["remus-run.1"]
    assert run.startswith('.TH "REMUS-RUN" "1"')
    for opt in ("\\-\\-backup", "\\-\\-key\\-file", "\\-\\-metrics", "\\-\\-on\\-peer\\-loss"):
        assert opt in run, opt
    assert len(pages) >= len(cli.commands) + 1
    if shutil.which("groff"):
        r = subprocess.run(["groff", "-man", "-Tutf8", "-ww", str(tmp_path / "remus-run.1")],
                           capture_output=True, text=True)
        assert r.returncode == 0 and "PROTECTED" not in r.stderr, r.stderr
