"""Local control socket of an agent: one JSON request per line, one JSON answer.

Requests: {"cmd": "status"} | {"cmd": "set-interval", "seconds": 0.025} |
{"cmd": "stop"} | {"cmd": "failover"}. Answers: {"ok": true, ...} or
{"ok": false, "error": "..."}. Root-only: the socket is created mode 0600.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from remus.errors import RemusError
from remus.paths import RUN_DIR

log = logging.getLogger(__name__)

Handler = Callable[[dict[str, Any]], dict[str, Any]]

#: How long close() waits for the accepting thread to end.
CLOSE_WAIT_S = 2.0


def socket_path(role: str, unit: str) -> Path:
    return RUN_DIR / f"{role}-{unit}.sock"


class ControlServer:
    def __init__(self, path: Path, handler: Handler) -> None:
        self.path = path
        self.handler = handler
        self._sk: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            if _alive(self.path):
                raise RemusError(f"another agent already listens on {self.path}")
            self.path.unlink()
        sk = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            sk.bind(str(self.path))
        finally:
            os.umask(old)
        sk.listen(8)
        self._sk = sk
        self._thread = threading.Thread(target=self._serve, name="control", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop answering: no request is accepted after this returns.

        shutdown() wakes the thread blocked in accept() (close() alone does
        not: it stayed blocked for good on the closed socket), and the
        descriptor is closed only after that thread ended, so its number,
        reused by the next socket this process opens (the control socket of
        the agent's next role, say), never gets an accept() of this server."""
        sk, self._sk = self._sk, None
        if sk is not None:
            try:
                sk.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(timeout=CLOSE_WAIT_S)
            sk.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass

    def _serve(self) -> None:
        while True:
            sk = self._sk
            if sk is None:
                return
            try:
                conn, _ = sk.accept()
            except OSError:
                return
            if self._sk is None:  # closed while accepting: not answered here
                conn.close()
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            try:
                line = conn.makefile("rb").readline()
                if not line.strip():
                    return  # a liveness probe: connect and close
                req = json.loads(line)
                ans = self.handler(req)
            except RemusError as e:
                ans = {"ok": False, "error": str(e)}
            except Exception as e:  # keep serving; report the bug
                log.exception("control request failed")
                ans = {"ok": False, "error": f"internal error: {e}"}
            try:
                conn.sendall(json.dumps(ans).encode() + b"\n")
            except OSError:
                pass


def _alive(path: Path) -> bool:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect(str(path))
        return True
    except OSError:
        return False


class NoAgent(RemusError):
    """Nobody listens on a control socket (no file, or a stale one)."""


def call(path: Path, cmd: str, timeout: float = 5.0, **args: Any) -> dict[str, Any]:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(str(path))
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            data = s.makefile("rb").readline()
    except (FileNotFoundError, ConnectionRefusedError) as e:
        raise NoAgent(f"no agent at {path} ({e.strerror})") from e
    except OSError as e:
        raise RemusError(f"control socket {path}: {e}") from e
    if not data:
        raise RemusError(f"agent at {path} closed the connection without an answer")
    ans: dict[str, Any] = json.loads(data)
    if not ans.get("ok", False):
        raise RemusError(ans.get("error", "request failed"))
    return ans


def find_agents(role: str | None = None) -> list[Path]:
    if not RUN_DIR.is_dir():
        return []
    return sorted(p for p in RUN_DIR.glob("*.sock")
                  if (role is None or p.name.startswith(role + "-")) and _alive(p))
