"""The replication link cut (iptables in pri's netns) and a capture of what the
client receives from the VIP (tcpdump -e): which host's copy sent each frame."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Frame:
    time: float
    src_mac: str
    payload: int  # TCP payload bytes
    text: str  # tcpdump's line, for messages


class Partition:
    """DROP between `host` and `peer` (pri and bak by default), installed in
    host's netns; idempotent heal."""

    def __init__(self, lab: Any, host: str = "pri", peer: str = "bak") -> None:
        self.netns = lab.netns_path(host)
        self.bak = lab.addr(peer)
        self.rules = [["INPUT", "-s", self.bak, "-j", "DROP"],
                      ["OUTPUT", "-d", self.bak, "-j", "DROP"]]
        self.active = False

    def _ipt(self, op: str, rule: list[str], check: bool = True) -> None:
        subprocess.run(["nsenter", f"--net={self.netns}", "--", "iptables", "-w", op, *rule],
                       check=check, capture_output=True)

    def cut(self) -> float:
        self.active = True
        for rule in self.rules:
            self._ipt("-I", rule)
        return time.time()

    def heal(self) -> float:
        if self.active and os.path.exists(self.netns):
            for rule in self.rules:
                self._ipt("-D", rule, check=False)
        self.active = False
        return time.time()


class Capture:
    """tcpdump -e in the client's namespace: every TCP frame from the VIP."""

    def __init__(self, lab: Any, path: Path) -> None:
        self.lab, self.path = lab, path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        # -Z root: tcpdump would drop to its own user and fail to write the file.
        self.proc = self.lab.popen("client", ["tcpdump", "-i", "eth0", "-n", "-U", "-Z", "root",
                                              "-s", "128", "-w", str(self.path),
                                              f"ip src host {self.lab.vip_addr} and tcp"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()  # "listening on eth0, ..." once it captures
        assert "listening on" in line, f"tcpdump did not start: {line}"

    def stop(self) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            os.kill(p.pid, signal.SIGTERM)  # the lab's exec chain makes p.pid tcpdump's pid
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def frames(self) -> list[Frame]:
        out = subprocess.run(["tcpdump", "-r", str(self.path), "-e", "-n", "-tt"],
                             capture_output=True, text=True, check=True).stdout
        frames = []
        for line in out.splitlines():
            parts = line.split()
            if len(parts) < 3 or ", length " not in line:
                continue
            digits = line.rsplit("length ", 1)[-1].split(":")[0]
            frames.append(Frame(float(parts[0]), parts[1].lower(),
                                int(digits) if digits.isdigit() else 0, line))
        return frames


def macs(lab: Any) -> tuple[str, str]:
    hosts = lab.status()["hosts"]
    return hosts["pri"]["mac"].lower(), hosts["bak"]["mac"].lower()
