"""A restarted `remus agent` adopts the child agents an earlier run left running
(remus.fleet: `_adopt`, `Adopted`), instead of starting a second next to them."""

from __future__ import annotations

import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from remus import fleet
from remus.control import ControlServer
from remus.fleet import Adopted, FleetAgent
from remus.fleet_store import ServiceSpec

pytestmark = pytest.mark.unit

SPEC = ServiceSpec(name="kv", vip="10.0.0.100/24", cmd=["sleep", "1"], port=7801)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    p = subprocess.Popen(["sleep", "60"])
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def sockets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fleet, "child_socket", lambda role, spec: tmp_path / f"{role}.sock")


def agent() -> FleetAgent:
    return FleetAgent.__new__(FleetAgent)  # _adopt uses no state of the agent


def test_a_live_child_is_adopted_by_its_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                               sleeper: subprocess.Popen[bytes]) -> None:
    sockets(tmp_path, monkeypatch)
    assert agent()._adopt(SPEC) is None  # no socket: nobody to adopt
    (tmp_path / "primary.sock").touch()  # a stale file nobody listens on
    assert agent()._adopt(SPEC) is None
    (tmp_path / "primary.sock").unlink()
    srv = ControlServer(tmp_path / "backup.sock", lambda req: {"ok": True, "pid": sleeper.pid})
    srv.start()
    try:
        child = agent()._adopt(SPEC)
        assert isinstance(child, fleet.Child) and child.role == "backup"
        assert child.proc.pid == sleeper.pid and child.proc.poll() is None
        child.proc.send_signal(signal.SIGTERM)
        assert child.proc.wait(10) == -1 and child.proc.poll() == -1
    finally:
        srv.close()


def test_a_socket_that_does_not_answer_is_busy_not_empty(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    sockets(tmp_path, monkeypatch)
    gate = threading.Event()

    def slow(req: dict[str, Any]) -> dict[str, Any]:
        gate.wait(10)
        return {"ok": True, "pid": 1}

    srv = ControlServer(tmp_path / "primary.sock", slow)
    srv.start()
    try:
        assert agent()._adopt(SPEC) == "busy"  # never start a second agent next to it
    finally:
        gate.set()
        srv.close()


def test_adopted_wait_times_out_like_popen(sleeper: subprocess.Popen[bytes]) -> None:
    a = Adopted(sleeper.pid)
    with pytest.raises(subprocess.TimeoutExpired):
        a.wait(0.1)
