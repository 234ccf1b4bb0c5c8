"""The configuration file: sections, keys, types, timing checked at load, flags over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from remus.cli import cli


def _run(tmp_path: Path, toml: str, *args: str) -> tuple[int, str]:
    cfg = tmp_path / "remus.toml"
    cfg.write_text(toml)
    res = CliRunner().invoke(cli, ["--config", str(cfg), *args])
    return res.exit_code, res.output


def test_sections_apply_to_their_commands(tmp_path: Path) -> None:
    code, out = _run(tmp_path, """
[common]
key-file = "/etc/remus/key"
coordinator = "zk://10.0.0.9:2181/remus"
[timing]
interval = "25ms"
lease = 0.25
[run]
backup = "10.0.0.2:7788"
compress = false
state_dir = ["/var/lib/kv", "/srv/q"]
[protect]
backup = "10.0.0.3"
[backup]
listen = "0.0.0.0"
""", "config", "--json")
    assert code == 0, out
    c = json.loads(out)["commands"]
    assert c["run"] == {"key_file": "/etc/remus/key", "coordinator": "zk://10.0.0.9:2181/remus",
                        "interval": "25ms", "lease": 0.25, "backup": "10.0.0.2:7788",
                        "compress": False, "state_dirs": ["/var/lib/kv", "/srv/q"]}
    assert c["protect"]["backup"] == "10.0.0.3"  # [protect] over [run]
    assert c["protect"]["compress"] is False     # the rest of [run]
    assert c["backup"]["listen"] == "0.0.0.0" and c["backup"]["interval"] == "25ms"
    assert "backup" not in c["backup"] and "compress" not in c["backup"]
    assert c["agent"]["key_file"] == "/etc/remus/key" and "interval" not in c["agent"]


def test_timing_conflict_in_the_file_names_both_settings(tmp_path: Path) -> None:
    code, out = _run(tmp_path, '[timing]\nlease = "400ms"\ntakeover-timeout = "300ms"\n',
                     "config")
    assert code == 1
    assert "[timing] lease = 400ms" in out and "[timing] takeover-timeout = 300ms" in out
    code, out = _run(tmp_path, '[timing]\nheartbeat = "150ms"\n', "config")
    assert code == 1
    assert "[timing] heartbeat = 150ms" in out and "lease = 200ms (built-in default)" in out


def test_a_conflict_between_a_flag_and_the_file_names_both(tmp_path: Path) -> None:
    key = tmp_path / "key"
    key.write_text("ab" * 32)
    key.chmod(0o600)
    code, out = _run(tmp_path, f'[common]\nkey-file = "{key}"\n[timing]\nlease = "250ms"\n',
                     "run", "--backup", "10.0.0.2", "--vip", "10.0.0.100/24",
                     "--takeover-timeout", "200ms", "--", "true")
    assert code == 1, out
    assert "lease = 250ms from" in out and "--takeover-timeout 200ms" in out


def test_bad_files_are_refused_with_file_section_and_key(tmp_path: Path) -> None:
    cases = {
        "[run]\nbakup = \"x\"\n": "[run] bakup: `remus run` has no such setting",
        "[foo]\n": "unknown section [foo]",
        "[run\n": "not valid TOML",
        "[timing]\nport = 3\n": "[timing] port: not a timing setting",
        "[timing]\ninterval = \"fast\"\n": "interval 'fast'",
        "[run]\ncompress = \"yes\"\n": "[run] compress: expected true or false",
        "[backup]\nlisten = [1, 2]\n": "[backup] listen: expected a string or a number",
    }
    for toml, says in cases.items():
        code, out = _run(tmp_path, toml, "config")
        assert code == 1 and says in out, (toml, out)
        # The agent commands refuse to start on it too.
        code, out = _run(tmp_path, toml, "backup")
        assert code == 1 and says in out, (toml, out)


def test_a_broken_file_does_not_stop_status_or_keygen(tmp_path: Path) -> None:
    code, out = _run(tmp_path, "[run\n", "keygen", str(tmp_path / "k"))
    assert code == 0, out


def test_no_file(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["--config", str(tmp_path / "none.toml"), "config"])
    assert res.exit_code == 1 and "cannot read" in res.output


def test_which_criu_and_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from remus import paths

    for var in ("REMUS_CRIU", "REMUS_CRIU_FROM"):
        monkeypatch.setenv(var, "x")  # tracked: restored after the test
        monkeypatch.delenv(var)
    cfg = tmp_path / "remus.toml"
    cfg.write_text('[common]\ncriu = "/opt/criu/bin/criu"\n')
    res = CliRunner().invoke(cli, ["--config", str(cfg), "config"])
    assert res.exit_code == 0, res.output  # [common] criu is a known setting
    assert paths.criu_source() == ("/opt/criu/bin/criu", f"{cfg} [common] criu")
    CliRunner().invoke(cli, ["--config", str(cfg), "--criu", "/usr/sbin/criu", "config"])
    assert paths.criu_source() == ("/usr/sbin/criu", "--criu")  # the flag wins
    monkeypatch.delenv("REMUS_CRIU")
    monkeypatch.setattr(paths, "REPO", tmp_path)  # no checkout build here
    monkeypatch.setenv("PATH", str(tmp_path))
    path, why = paths.criu_source()
    assert path is None and "--criu" in why and "PATH" in why


def test_json_log_lines() -> None:
    import logging

    from remus.cli import JsonLogFormatter

    rec = logging.LogRecord("remus.backup", logging.ERROR, __file__, 1,
                            "epoch %d rejected: %s", (7, "disk full"), None)
    doc = json.loads(JsonLogFormatter().format(rec))
    assert doc["level"] == "error" and doc["logger"] == "remus.backup"
    assert doc["message"] == "epoch 7 rejected: disk full" and doc["pid"] > 0
