"""A fleet in the lab (used by `make fleet-demo` and tests/reliability/test_fleet.py):
`remus ctl` run on the client host, and waiting for services to be protected."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from remus.errors import RemusError
from remus.scenario import Scenario

FLEET = ("pri", "bak", "spare")
REDIS = ["redis-server", "--port", "6379", "--save", "", "--appendonly", "no",
         "--protected-mode", "no", "--daemonize", "no", "--dir", "/tmp"]


def ctl(sc: Scenario, *args: str, timeout: float = 60.0) -> str:
    """`remus ctl ARGS` against the scenario's coordinator; its output."""
    p = sc.lab.run("client", [sys.executable, "-m", "remus.cli", "ctl", "--coordinator",
                              sc.coordinator or "", *args], capture_output=True, text=True,
                   timeout=timeout)
    if p.returncode != 0:
        raise RemusError(f"remus ctl {' '.join(args)}: {p.stderr.strip()}")
    return str(p.stdout)


def rows(sc: Scenario) -> dict[str, dict[str, Any]]:
    return {r["service"]: r for r in json.loads(ctl(sc, "list", "--json"))}


def all_protected(sc: Scenario, alive: set[str], services: int
                  ) -> dict[str, dict[str, Any]] | None:
    """`remus ctl list` once every service is protected by two live hosts."""
    addrs = {sc.lab.addr(h) for h in alive}
    rs = rows(sc)
    ok = len(rs) == services and all(
        r["state"] == "protected" and r["primary"] in addrs and r["backup"] in addrs
        and r["primary"] != r["backup"] for r in rs.values())
    return rs if ok else None


def start_client(sc: Scenario, name: str, vip: str) -> subprocess.Popen[bytes]:
    """A redis loadgen client of service `name` (one connection to `vip`); its
    result goes to workdir/NAME.json when it gets SIGINT."""
    return sc._spawn("client", [sys.executable, "-m", "remus.loadgen", "redis", "--host",
                                vip.split("/")[0], "--port", "6379", "--duration", "3600",
                                "--stall-timeout", "30", "--out", str(sc.workdir / f"{name}.json")],
                     f"client-{name}.log")
