"""The two-host lab on the real kernel: namespaces, reachability, CRIU, crash, down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from remus.cli_lab import lab as lab_cli
from remus.lab import Lab
from remus.lab_hosts import LabNotUp
from remus.lab_layout import CGROUP_NAME, HOSTS
from remus.lab_tools import mountpoints
from remus.netns import NETNS_DIR
from remus.paths import REPO, criu_binary
from tests.support.timing import wait_for

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

PY = sys.executable
SERVER = """
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2]))); s.listen(); print("ready", flush=True)
c, _ = s.accept(); c.sendall(sys.argv[3].encode()); c.close()
"""
CLIENT = """
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3)
print(c.recv(100).decode())
"""


# The `lab` fixture (module scope: lock, down, up, ... down) comes from tests/conftest.py.


def serve_once(lab: Lab, host: str, bind: str, port: int, msg: str) -> subprocess.Popen[str]:
    argv = [PY, "-c", SERVER, bind, str(port), msg]
    srv = lab.popen(host, argv, stdout=subprocess.PIPE, text=True)
    assert srv.stdout is not None and srv.stdout.readline().strip() == "ready"
    return srv


def fetch(lab: Lab, host: str, addr: str, port: int) -> subprocess.CompletedProcess[str]:
    argv = [PY, "-c", CLIENT, addr, str(port)]
    return lab.run(host, argv, capture_output=True, text=True, timeout=10)


def pingable(lab: Lab, src: str, addr: str) -> bool:
    argv = ["ping", "-c", "1", "-W", "1", addr]
    return lab.run(src, argv, capture_output=True).returncode == 0


def sh(lab: Lab, host: str, script: str) -> subprocess.CompletedProcess[str]:
    return lab.run(host, ["sh", "-c", script], capture_output=True, text=True, timeout=30)


def test_up_is_idempotent_and_repairs_links(lab: Lab) -> None:
    lab.up()
    subprocess.run(["ip", "-n", "remus-lab-sw", "link", "set", "bak", "down"], check=True)
    assert not lab.status()["hosts"]["bak"]["alive"]
    lab.up()
    st = lab.status()
    assert st["up"] and st["vip"] == "10.77.0.100/24" and st["dev"] == "eth0"
    for host, spec in HOSTS.items():
        h = st["hosts"][host]
        assert h["alive"] and h["addr"] == spec.addr and h["link"] == "up"
        out = sh(lab, host, "cat /sys/class/net/eth0/address; ip -4 -o addr show dev eth0")
        assert out.stdout.split()[0] == spec.mac
        assert f"{spec.addr}/24" in out.stdout


def test_hosts_reach_each_other(lab: Lab) -> None:
    srv = serve_once(lab, "bak", "10.77.0.2", 7101, "hello-from-bak")
    try:
        assert fetch(lab, "client", "10.77.0.2", 7101).stdout.strip() == "hello-from-bak"
    finally:
        srv.kill()
        srv.wait()
    assert pingable(lab, "pri", "10.77.0.2")
    assert pingable(lab, "bak", "10.77.0.3")


def test_vip_on_pri_reachable_from_client(lab: Lab) -> None:
    sh(lab, "pri", f"ip addr add {lab.vip} dev {lab.dev}").check_returncode()
    try:
        srv = serve_once(lab, "pri", "0.0.0.0", 7102, "hello-via-vip")
        try:
            out = fetch(lab, "client", lab.vip_addr, 7102)
            assert out.stdout.strip() == "hello-via-vip", out.stderr
        finally:
            srv.kill()
            srv.wait()
    finally:
        sh(lab, "pri", f"ip addr del {lab.vip} dev {lab.dev}")
    assert not pingable(lab, "client", lab.vip_addr)


def test_exec_status_cwd_and_shared_paths(lab: Lab, tmp_path: Path) -> None:
    assert lab.run("pri", ["sh", "-c", "exit 7"]).returncode == 7
    out = lab.run("bak", ["pwd"], cwd=REPO, capture_output=True, text=True)
    assert out.stdout.strip() == str(REPO)
    (tmp_path / "probe").write_text("shared\n")
    out = sh(lab, "client", f"cat {tmp_path}/probe; test -f {REPO}/pyproject.toml && echo repo")
    assert out.stdout.split() == ["shared", "repo"]
    out = sh(lab, "pri", 'echo "$REMUS_LAB_HOST"; cat /proc/self/cgroup')
    assert out.stdout.split()[0] == "pri"
    assert f"/{CGROUP_NAME}/pri" in out.stdout


def test_disks_and_run_are_per_host(lab: Lab) -> None:
    name = f"remus-lab-test-{os.getpid()}"
    script = f"echo pri > /var/lib/{name} && echo pri > /srv/{name} && echo pri > /run/{name}"
    sh(lab, "pri", script).check_returncode()
    for d in ("/var/lib", "/srv", "/run"):
        assert not Path(d, name).exists()  # root namespace
        assert sh(lab, "bak", f"test -e {d}/{name}").returncode == 1
        assert sh(lab, "pri", f"cat {d}/{name}").stdout == "pri\n"
    assert (lab.host_dir("pri") / "var-lib" / name).read_text() == "pri\n"
    for host in HOSTS:
        assert sh(lab, host, "stat -f -c %T /run").stdout.strip() == "tmpfs"


def _start_pidns_sleep(lab: Lab, host: str) -> int:
    """`sleep` as init of its own PID namespace, stdio opened inside the host."""
    script = "unshare --pid --fork setsid sleep 1000 </dev/null >/dev/null 2>&1 & echo $!"
    outer = int(sh(lab, host, script).stdout)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        kids = Path(f"/proc/{outer}/task/{outer}/children").read_text().split()
        if kids and Path(f"/proc/{kids[0]}/comm").read_text().strip() == "sleep":
            return int(kids[0])
        time.sleep(0.01)
    raise AssertionError("pid namespace init did not start")


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] in "ZX"
    except FileNotFoundError:
        return True


def test_criu_dump_on_pri_restore_on_bak(lab: Lab, tmp_path: Path) -> None:
    criu = criu_binary()
    assert criu, "CRIU is not built (bin/setup)"
    init = _start_pidns_sleep(lab, "pri")
    dump = [criu, "dump", "-t", str(init), "-D", str(tmp_path), "-o", "dump.log", "-v4"]
    res = lab.run("pri", dump)
    assert res.returncode == 0, (tmp_path / "dump.log").read_text()[-3000:]
    assert _gone(init)
    pidfile = tmp_path / "restored.pid"
    restore = [criu, "restore", "-d", "-D", str(tmp_path), "-o", "restore.log", "-v4",
               "--pidfile", str(pidfile)]  # fmt: skip
    res = lab.run("bak", restore)
    log = (tmp_path / "restore.log").read_text()
    assert res.returncode == 0, log[-3000:]
    assert "unreachable sharing" not in log
    pid = int(pidfile.read_text())
    try:
        assert Path(f"/proc/{pid}/comm").read_text().strip() == "sleep"
        assert os.stat(f"/proc/{pid}/ns/mnt").st_ino == os.stat(lab.mntns_path("bak")).st_ino
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(lab.netns_path("bak")).st_ino
        assert f"/{CGROUP_NAME}/bak" in Path(f"/proc/{pid}/cgroup").read_text()
    finally:
        os.kill(pid, 9)


def test_crash_kills_everything_of_the_host(lab: Lab) -> None:
    lab.up()
    sh(lab, "pri", "echo disk > /var/lib/crash-probe; echo mem > /run/crash-probe")
    plain = lab.popen("pri", ["sleep", "1000"])
    nested = lab.popen("pri", ["unshare", "--net", "--", "sleep", "1000"])
    # Left its cgroup on purpose: still pri's through its mount namespace.
    leave = f"echo $$ > {lab.cgroup_root.parent}/cgroup.procs; exec unshare --net sleep 1000"
    escaped = lab.popen("pri", ["sh", "-c", leave])
    pinned = _start_pidns_sleep(lab, "pri")
    bystander = lab.popen("bak", ["sleep", "1000"])
    try:
        # all five have joined pri (10 s only catches a hang)
        assert wait_for(lambda: lab.status()["hosts"]["pri"]["procs"] >= 5, 10.0), lab.status()
        lab.crash("pri")
        for p in (plain, nested, escaped):
            assert p.wait(timeout=5) == -9
        assert _gone(pinned)
        assert bystander.poll() is None
        st = lab.status()
        assert st["hosts"]["pri"]["crashed"] and not st["hosts"]["pri"]["alive"]
        assert st["hosts"]["pri"]["procs"] == 0 and st["hosts"]["bak"]["alive"]
        assert not pingable(lab, "client", "10.77.0.1")
        assert pingable(lab, "client", "10.77.0.2")
        with pytest.raises(LabNotUp, match="crashed"):
            lab.exec_argv("pri", ["true"])
    finally:
        bystander.kill()
        bystander.wait()
    lab.up()  # reboot: processes and /run gone, disk kept
    assert pingable(lab, "client", "10.77.0.1")
    assert sh(lab, "pri", "cat /var/lib/crash-probe").stdout == "disk\n"
    assert sh(lab, "pri", "test -e /run/crash-probe").returncode == 1


def test_cli_status_json_and_errors(lab: Lab) -> None:
    lab.up()
    res = CliRunner().invoke(lab_cli, ["status", "--json"])
    assert res.exit_code == 0, res.output
    st = json.loads(res.output)
    assert st["up"] is True and st["vip"] == "10.77.0.100/24" and st["dev"] == "eth0"
    assert {h: st["hosts"][h]["addr"] for h in HOSTS} == {
        "pri": "10.77.0.1", "bak": "10.77.0.2", "client": "10.77.0.3",
        "coord": "10.77.0.4", "spare": "10.77.0.5"}  # fmt: skip
    res = CliRunner().invoke(lab_cli, ["exec", "nosuch", "--", "true"])
    assert res.exit_code != 0 and "unknown lab host 'nosuch'" in res.output


def test_cli_exec_passes_exit_status_and_stdio(lab: Lab) -> None:
    lab.up()
    cli = [PY, "-m", "remus.cli_lab", "exec"]
    res = subprocess.run([*cli, "pri", "--", "sh", "-c", "cat; echo $REMUS_LAB_HOST; exit 5"],
                         input="in\n", capture_output=True, text=True)  # fmt: skip
    assert res.returncode == 5 and res.stdout == "in\npri\n"


def test_down_leaves_nothing(lab: Lab) -> None:
    lab.up()
    sleeper = lab.popen("client", ["unshare", "--net", "sleep", "1000"])
    daemon = _start_pidns_sleep(lab, "bak")

    def host_pids() -> set[int]:
        return {p for h in HOSTS for p in lab._host_pids(h)}

    pids = wait_for(lambda: (ps := host_pids()) >= {sleeper.pid, daemon} and ps, 10.0)
    assert pids, (sleeper.pid, daemon, host_pids())
    lab.down()
    assert sleeper.wait(timeout=5) == -9
    assert all(_gone(p) for p in pids)
    assert not [n for n in os.listdir(NETNS_DIR) if n.startswith("remus-lab-")]
    assert not [m for m in mountpoints() if m.startswith(str(lab.lab_dir))]
    assert not lab.lab_dir.exists() and not lab.cgroup_root.exists()
    assert lab.status()["up"] is False
    res = CliRunner().invoke(lab_cli, ["status"])
    assert res.exit_code == 1 and "not up" in res.output
    lab.down()  # nothing left: still fine
