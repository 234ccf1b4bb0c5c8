"""State directories in the lab: redis with an fsync'd append-only file, then a power cut."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from tests.support.procs import alive
from tests.support.timing import wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]

STATE = "/var/lib/kv"
REDIS = ["redis-server", "--port", "6379", "--dir", STATE, "--appendonly", "yes",
         "--appendfsync", "always", "--save", "", "--protected-mode", "no"]


def _cli(lab: Any, host: str, *args: str, port: int = 6379, addr: str | None = None) -> str:
    argv = ["redis-cli", "-h", addr or lab.vip_addr, "-p", str(port), *args]
    r = lab.run(host, argv, capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_aof_survives_power_cut_in_memory_and_on_disk(scenario: Any) -> None:
    sc = scenario(server="redis", command=REDIS, extra_primary=["--state-dir", STATE],
                  extra_backup=["--state-dir", STATE])
    lab = sc.lab
    lab.run("pri", ["mkdir", "-p", STATE], check=True)
    sc.start_backup()
    wait_for(lambda: sc.status("bak"), timeout=30)  # the backup is up (a hang bound)
    sc.start_primary()
    sc.wait_protected()
    client = sc.start_client(5, "c.json", pace=0.001)
    time.sleep(2.5)
    lab.crash("pri")
    res = sc.wait_client(client, "c.json", timeout=60)
    assert res["connection_survived"], res["error"]
    assert res["verified"] and res["missing"] == 0 and res["wrong_values"] == 0
    acked = res["acked"]

    st = sc.status("bak")
    assert st is not None and st["state"] == "active"
    # The applied state directory reached stable storage before the unit resumed.
    fo = st["failover"]
    assert fo["applied"] <= fo["synced"] <= fo["restore_start"] <= fo["restored"], fo
    restored_keys = int(_cli(lab, "client", "DBSIZE"))
    assert restored_keys >= acked
    # The restored memory and the backup's files must be the same moment: stop the
    # restored server without letting it write, start a fresh one from the files alone.
    unit_pid = int(st["unit_pid"])
    os.kill(unit_pid, signal.SIGKILL)
    assert wait_for(lambda: not alive(unit_pid), timeout=10), f"unit {unit_pid} outlived SIGKILL"
    aof = lab.run("bak", ["sh", "-c", f"ls -la {STATE} {STATE}/appendonlydir"],
                  capture_output=True, text=True).stdout
    fresh = lab.popen("bak", ["redis-server", "--port", "6400", "--bind", "127.0.0.1",
                              "--dir", STATE, "--appendonly", "yes", "--save", ""],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    sc.procs.append(fresh)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        r = lab.run("bak", ["redis-cli", "-p", "6400", "PING"], capture_output=True, text=True)
        if r.stdout.strip() == "PONG":
            break
        time.sleep(0.1)
    from_files = int(_cli(lab, "bak", "DBSIZE", port=6400, addr="127.0.0.1"))
    assert from_files == restored_keys, (from_files, restored_keys, aof)
    # Every acknowledged key is in the files, with its value.
    script = ("import socket,sys\n"
              "s=socket.create_connection(('127.0.0.1',6400)); f=s.makefile('rb')\n"
              "n=int(sys.argv[1]); bad=0\n"
              "for i in range(n):\n"
              "  k=f'key:{i}'.encode(); s.sendall(b'*2\\r\\n$3\\r\\nGET\\r\\n$%d\\r\\n%s\\r\\n'%(len(k),k))\n"
              "  h=f.readline()\n"
              "  if h.startswith(b'$-1'): bad+=1; continue\n"
              "  v=f.readline().strip()\n"
              "  bad+= v!=str(i).encode()\n"
              "print(bad)\n")
    r = lab.run("bak", [sys.executable, "-c", script, str(acked)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout) == 0, f"{r.stdout.strip()} acknowledged writes missing from the files"
    print(f"disk: {acked} acked writes; restored {restored_keys} keys; files {from_files} keys")
