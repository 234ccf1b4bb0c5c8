"""remus installed outside the checkout (bin/install into a temporary prefix):
`remus check` finds CRIU on PATH and says so, and a protected run of the
installed remus survives a power cut in the lab."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from remus.paths import REPO
from tests.support.ha import logs, wait

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("installed")
    env = {**os.environ, "PREFIX": str(root / "usr"), "VENV": str(root / "venv"),
           "UNITDIR": str(root / "units"), "ETCDIR": str(root / "etc")}
    env.pop("VIRTUAL_ENV", None)
    r = subprocess.run([str(REPO / "bin" / "install")], env=env, capture_output=True, text=True,
                       timeout=900, cwd="/")
    assert r.returncode == 0, r.stdout + r.stderr
    return root


def test_installed_remus_finds_criu_on_path(installed: Path) -> None:
    prefix = installed / "usr"
    env = {"PATH": f"{prefix}/sbin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root"}
    r = subprocess.run([str(prefix / "bin" / "remus"), "check", "--json"], env=env, cwd="/",
                       capture_output=True, text=True, timeout=120)
    doc = json.loads(r.stdout)
    assert doc["criu"]["path"] == str(prefix / "sbin" / "criu"), doc["criu"]
    assert doc["criu"]["from"] == "PATH" and doc["criu"]["ok"], doc["criu"]
    import_path = subprocess.run([str(installed / "venv" / "bin" / "python"), "-c",
                                  "import remus; print(remus.__file__)"], capture_output=True,
                                 text=True, cwd="/").stdout
    assert str(installed / "venv") in import_path and str(REPO) not in import_path
    assert (prefix / "share" / "man" / "man1" / "remus-run.1").exists()
    assert (installed / "units" / "remus-run@.service").exists()


def test_installed_remus_protects_through_a_power_cut(installed: Path, scenario: Any) -> None:
    prefix = installed / "usr"
    path = {"PATH": f"{prefix}/sbin:{os.environ.get('PATH', '/usr/bin:/bin')}"}
    sc = scenario(server="redis", remus=[str(prefix / "bin" / "remus")], env_primary=path,
                  env_backup=path)
    sc.start_backup()
    wait("backup up", lambda: sc.status("bak"), 30, sc)
    sc.start_primary()
    sc.wait_protected(timeout=60)
    for host in ("pri", "bak"):  # the agents are the installed remus, not the checkout's
        pid = int((sc.status(host) or {})["pid"])
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert str(installed) in cmdline and str(REPO) not in cmdline, cmdline
    client = sc.start_client(6, "c.json", pace=0.002)
    wait("a few acked epochs", lambda: (sc.status("pri") or {}).get("acked_epoch", 0) > 20, 30, sc)
    sc.lab.crash("pri")
    wait("takeover", lambda: (sc.status("bak") or {}).get("state") == "active", 30, sc)
    res = sc.wait_client(client, "c.json", timeout=60)
    assert res["connection_survived"] and res["verified"] and res["missing"] == 0, \
        f"{res}{logs(sc)}"
