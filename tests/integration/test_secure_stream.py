"""The replication stream on the wire: confidential, and keys rotate while it runs.

Real redis, CRIU and agents in the lab; tcpdump on the backup host sees every
byte of the stream.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from remus.config import DEFAULT_PORT
from remus.protocol.keys import fingerprint, load_keys
from tests.support.timing import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

REMUS = [sys.executable, "-m", "remus.cli"]


def _redis_set(sc: Any, key: str, value: str) -> None:
    """SET over RESP from the client host (no redis-cli needed)."""
    code = (
        "import socket,sys\n"
        f"s=socket.create_connection(({sc.lab.vip_addr!r},{sc.port}),timeout=10)\n"
        f"k,v={key!r}.encode(),{value!r}.encode()\n"
        "s.sendall(b'*3\\r\\n$3\\r\\nSET\\r\\n$%d\\r\\n%s\\r\\n$%d\\r\\n%s\\r\\n'%(len(k),k,len(v),v))\n"
        "r=s.recv(64)\n"
        "sys.exit(0 if r.startswith(b'+OK') else 1)\n"
    )
    sc.lab.run("client", [sys.executable, "-c", code], check=True, timeout=30)


class StreamCapture:
    """tcpdump of the replication port on the backup host, whole packets."""

    def __init__(self, sc: Any, path: Path) -> None:
        self.sc, self.path = sc, path
        self.proc = sc.lab.popen("bak", ["tcpdump", "-i", "eth0", "-n", "-U", "-Z", "root",
                                         "-s", "0", "-w", str(path), f"tcp port {DEFAULT_PORT}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = self.proc.stderr.readline().decode()
        assert "listening on" in line, f"tcpdump did not start: {line}"

    def stop(self) -> bytes:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.path.read_bytes()


def _store_holds(sc: Any, marker: str) -> bool:
    """The marker is in the backup's committed images (what the stream carried).

    grep lists the files that hold it; the caller asks again for a while. The
    backup's apply thread writes a new pages file whenever the page layout
    moves and deletes the old one (and the applied redo logs) while grep walks
    the store: grep can list the old file, find it gone (exit 2), and never see
    the new one. That made this control fail once in a fresh-clone run."""
    res = sc.lab.run("bak", ["grep", "-rlF", marker, f"/var/lib/remus/{sc.unit}"],
                     capture_output=True, text=True, timeout=60)
    return bool(res.stdout.strip())


def test_the_stream_does_not_carry_the_services_memory_in_the_clear(scenario: Any,
                                                                     tmp_path: Path) -> None:
    if shutil.which("tcpdump") is None:
        pytest.skip("tcpdump not installed (apt package tcpdump; bin/setup installs it)")
    # --no-compress: without encryption the marker would be on the wire verbatim.
    sc = scenario(server="redis", extra_primary=["--no-compress"])
    sc.start_backup()
    sc.start_primary()
    sc.wait_protected()
    cap = StreamCapture(sc, tmp_path / "stream.pcap")
    try:
        marker = "remus-secret-" + secrets.token_hex(24)
        _redis_set(sc, "secret", marker)
        _redis_set(sc, "secret2", marker[::-1])  # a second page, later epoch
        start = sc.wait_protected()["acked_epoch"]
        assert wait_for(lambda: (sc.status("pri") or {}).get("acked_epoch", -1) >= start + 10,
                        20), sc.log_tail("primary.log")
    finally:
        wire = cap.stop()
    assert len(wire) > 50_000, f"the capture saw only {len(wire)} bytes of the stream"
    # The control: the checkpoint did carry the marker to the backup...
    assert wait_for(lambda: _store_holds(sc, marker), 10), \
        "the marker never reached the backup's store"
    # ...and nobody on the path could read it.
    assert marker.encode() not in wire and marker[::-1].encode() not in wire
    assert b"redis" not in wire.lower()  # the binary's strings, the command line


def _restart_backup(sc: Any, bak: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """A new connection: kill -9 the backup agent and start it again; wait until
    the primary is protected by it again."""
    os.kill(bak.pid, signal.SIGKILL)
    bak.wait()
    p = sc.status("pri")
    new = sc.start_backup()
    assert wait_for(lambda: (s := sc.status("pri")) is not None
                    and s["generation"] != p["generation"] and s["acked_epoch"] >= 3, 30), \
        sc.log_tail("primary.log")
    return new


def _connected_with(sc: Any) -> str:
    """The key fingerprint of the primary's newest connection, from its log."""
    lines = [ln for ln in (sc.workdir / "primary.log").read_text().splitlines()
             if "connected to backup" in ln]
    return lines[-1].rsplit("key ", 1)[-1].rstrip(")")


def _keygen(path: Path, phase: str) -> None:
    subprocess.run([*REMUS, "keygen", f"--{phase}", str(path)], check=True, capture_output=True)


def test_keys_rotate_without_restarting_the_primary(scenario: Any, tmp_path: Path) -> None:
    """The three phases of docs/protocol.md, with the hosts doing each phase at
    different times; the primary agent is never restarted and a client writing
    over one connection loses nothing."""
    sc = scenario(server="redis")
    pri_key, bak_key = tmp_path / "pri.key", tmp_path / "bak.key"
    for k in (pri_key, bak_key):
        shutil.copy(sc.key, k)
        k.chmod(0o600)
    sc.host_keys.update(pri=pri_key, bak=bak_key)
    old = fingerprint(load_keys(pri_key)[0])
    bak = sc.start_backup()
    primary = sc.start_primary()
    sc.wait_protected()
    client = sc.start_client(40, "load.json", pace=0.005)
    assert _connected_with(sc) == old

    _keygen(bak_key, "stage")                  # 1. the backup host first...
    bak = _restart_backup(sc, bak)
    shutil.copy(bak_key, pri_key)              # ...then the primary's host
    new = fingerprint(load_keys(pri_key)[-1])
    assert _connected_with(sc) == old

    _keygen(pri_key, "promote")                # 2. the primary host first: it seals
    bak = _restart_backup(sc, bak)             #    with the new key, the backup opens it
    assert _connected_with(sc) == new
    _keygen(bak_key, "promote")

    _keygen(bak_key, "retire")                 # 3. both drop the old key
    _keygen(pri_key, "retire")
    bak = _restart_backup(sc, bak)
    assert _connected_with(sc) == new
    assert [fingerprint(k) for k in load_keys(pri_key)] == [new]

    res = sc.wait_client(client, "load.json")
    assert res["connection_survived"] and res["verified"] and res["missing"] == 0, res
    assert primary.poll() is None, "the primary agent exited"
