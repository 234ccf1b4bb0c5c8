"""The control socket server (remus.control.ControlServer): once closed it answers
nothing more, and the thread that accepted its requests has ended."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from remus.control import ControlServer, call

pytestmark = pytest.mark.unit


def test_close_ends_the_thread_blocked_in_accept(tmp_path: Path) -> None:
    srv = ControlServer(tmp_path / "primary-kv.sock", lambda req: {"ok": True, "role": "primary"})
    srv.start()
    assert call(srv.path, "status")["role"] == "primary"
    time.sleep(0.2)  # its thread waits in accept() again
    thread = srv._thread
    assert thread is not None
    srv.close()
    # close() alone left it blocked for good on the closed socket, and a later
    # socket of this process that got the same descriptor number could be
    # accepted by it: a request answered by a role the agent had left
    thread.join(timeout=2.0)
    assert not thread.is_alive()
    assert not srv.path.exists()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        with pytest.raises(OSError):
            s.connect(str(srv.path))


def test_the_next_server_answers_every_request(tmp_path: Path) -> None:
    for i in range(20):
        old = ControlServer(tmp_path / f"primary-{i}.sock", lambda req: {"ok": True, "role": "primary"})
        old.start()
        old_thread = old._thread
        call(old.path, "status")
        old.close()
        new = ControlServer(tmp_path / f"backup-{i}.sock", lambda req: {"ok": True, "role": "backup"})
        new.start()
        try:
            assert [call(new.path, "status")["role"] for _ in range(10)] == ["backup"] * 10
            assert old_thread is not None and not old_thread.is_alive()
        finally:
            new.close()


def test_close_is_safe_twice_and_before_start(tmp_path: Path) -> None:
    never = ControlServer(tmp_path / "never.sock", lambda req: {"ok": True})
    never.close()
    srv = ControlServer(tmp_path / "twice.sock", lambda req: {"ok": True})
    srv.start()
    srv.close()
    srv.close()
