"""Lab logic that needs no root: layout constants, errors, the exec trampoline."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from remus import lab_hosts
from remus.errors import ConfigError
from remus.lab import Lab
from remus.lab_hosts import LabNotUp
from remus.lab_layout import HOSTS


def test_layout_is_fixed_and_unique() -> None:
    assert {h: s.addr for h, s in HOSTS.items()} == {
        "pri": "10.77.0.1", "bak": "10.77.0.2", "client": "10.77.0.3",
        "coord": "10.77.0.4", "spare": "10.77.0.5"}  # fmt: skip
    macs = [s.mac for s in HOSTS.values()] + [s.port_mac for s in HOSTS.values()]
    assert len(set(macs)) == len(macs)
    lab = Lab("/x/lab")
    assert (lab.vip, lab.vip_addr, lab.dev) == ("10.77.0.100/24", "10.77.0.100", "eth0")
    assert lab.netns_path("bak") == "/run/netns/remus-lab-bak"
    assert lab.mntns_path("client") == "/x/lab/ns/client.mnt"
    assert lab.cgroup_path("pri").endswith("/remus-lab/pri")
    assert not str(lab.host_dir("pri")).startswith(("/var/lib", "/srv"))


def test_lab_dir_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REMUS_LAB_DIR", "/tmp/elsewhere")
    assert Lab().lab_dir == Path("/tmp/elsewhere")
    monkeypatch.delenv("REMUS_LAB_DIR")
    assert Lab().lab_dir == Path("/run/remus-lab")


def test_unknown_host_and_empty_command_are_config_errors() -> None:
    lab = Lab("/nonexistent")
    with pytest.raises(ConfigError, match="unknown lab host 'db'"):
        lab.addr("db")
    with pytest.raises(ConfigError, match="unknown lab host"):
        lab.exec_argv("db", ["true"])
    with pytest.raises(ConfigError, match="empty command"):
        lab.exec_argv("pri", [])


def test_exec_on_a_lab_that_is_not_up() -> None:
    with pytest.raises(LabNotUp, match="not up"):
        Lab("/nonexistent").exec_argv("pri", ["true"])


def test_trampoline_keeps_cwd_args_status_and_joins_cgroup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Run the real trampoline with a stand-in nsenter that drops its options."""
    fake = tmp_path / "nsenter"
    fake.write_text('#!/bin/sh\nwhile [ "$1" != "--" ]; do shift; done; shift; exec "$@"\n')
    fake.chmod(0o755)
    procs = tmp_path / "cgroup.procs"
    monkeypatch.setattr(lab_hosts, "which", lambda tool: str(fake))
    monkeypatch.setattr(Lab, "_require_running", lambda self, host: None)
    monkeypatch.setattr(Lab, "cgroup_path", lambda self, host: str(tmp_path))
    work = tmp_path / "a dir"
    work.mkdir()
    script = 'printf "%s|" "$PWD" "$REMUS_LAB_HOST" "$@"; echo $$; exit 9'
    argv = Lab("/x").exec_argv("bak", ["sh", "-c", script, "arg0", "two words", "$HOME"])
    res = subprocess.run(argv, cwd=work, capture_output=True, text=True)
    assert res.returncode == 9, res.stderr
    *fields, pid = res.stdout.split("|")
    assert fields == [str(work), "bak", "two words", "$HOME"]
    # Every stage exec's the next, so the pid that joined is the command's.
    assert procs.read_text().strip() == pid.strip() == str(int(pid))
    assert os.path.basename(argv[0]) == "sh"
