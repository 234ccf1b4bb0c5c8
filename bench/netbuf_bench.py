"""Output buffer benchmark (root; not a test): how many packets/s the NFQUEUE
buffer sustains, its per-packet CPU cost, and the latency of a batch release.

Lab: client ns <- host ns (buffer) <- unit ns, as in tests/integration. A
sender process in the unit's namespace floods UDP towards a counting receiver
in the client's namespace; an epoch thread calls begin_epoch(e+1) and
release(e) every --interval (an instant ACK). Run:

    .venv/bin/python bench/netbuf_bench.py [--seconds 3] [--interval 0.05] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from remus.netbuf import NfqueueBuffer, nfnl  # noqa: E402
from remus.netns import in_netns  # noqa: E402

UNIT_IP, CLIENT_IP, PORT = "10.77.2.2", "10.77.1.2", 9000
SENDER = """
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
data, rate, n = b"x" * {size}, {rate}, 0
t0 = time.monotonic()
end = t0 + {seconds}
while (now := time.monotonic()) < end:
    if rate and n > (now - t0) * rate:
        time.sleep(0.0005)
        continue
    for _ in range(64):
        try:
            s.sendto(data, ("{dst}", {port}))
            n += 1
        except OSError:
            pass
print(n)
"""
RECEIVER = """
import socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("{dst}", {port}))
s.settimeout({idle})
print("ready", flush=True)
n = 0
try:
    while True:
        s.recv(65536)
        n += 1
except TimeoutError:
    pass
print(n, flush=True)
"""


def sh(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


def build_lab(tag: str) -> dict[str, str]:
    ns = {r: f"rnb-b{r}-{tag}" for r in "chu"}
    for n in ns.values():
        sh("ip", "netns", "add", n)
    c, h, u = ns["c"], ns["h"], ns["u"]
    sh("ip", "-n", h, "link", "add", "rnb-hc", "type", "veth", "peer", "name", "eth0", "netns", c)
    sh("ip", "-n", h, "link", "add", "rnb-hu", "type", "veth", "peer", "name", "eth0", "netns", u)
    for n, dev, addr in ((c, "eth0", CLIENT_IP), (h, "rnb-hc", "10.77.1.1"),
                         (h, "rnb-hu", "10.77.2.1"), (u, "eth0", UNIT_IP)):
        sh("ip", "-n", n, "addr", "add", f"{addr}/24", "dev", dev)
        sh("ip", "-n", n, "link", "set", dev, "up")
    sh("ip", "-n", c, "route", "add", "default", "via", "10.77.1.1")
    sh("ip", "-n", u, "route", "add", "default", "via", "10.77.2.1")
    sh("nsenter", f"--net=/run/netns/{h}", "sysctl", "-qw", "net.ipv4.ip_forward=1")
    return ns


def thread_cpu_s(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def flood(ns: dict[str, str], seconds: float, size: int, rate: int = 0) -> tuple[int, int]:
    """(sent, received) datagrams of one flood."""
    rx = subprocess.Popen(["nsenter", f"--net=/run/netns/{ns['c']}", sys.executable, "-c",
                           RECEIVER.format(dst=CLIENT_IP, port=PORT, idle=1.0)],
                          stdout=subprocess.PIPE, text=True)
    try:
        assert rx.stdout is not None and rx.stdout.readline().strip() == "ready"
        tx = subprocess.run(["nsenter", f"--net=/run/netns/{ns['u']}", sys.executable, "-c",
                             SENDER.format(dst=CLIENT_IP, port=PORT, size=size,
                                           seconds=seconds, rate=rate)],
                            capture_output=True, text=True, check=True)
        received = int(rx.stdout.readline())
        return int(tx.stdout), received
    finally:
        if rx.poll() is None:
            os.kill(rx.pid, 9)
        rx.wait()


def run_buffered(ns: dict[str, str], seconds: float, interval: float, size: int,
                 rate: int) -> dict[str, object]:
    buf = NfqueueBuffer("rnb-hu", netns=f"/run/netns/{ns['h']}", max_packets=200_000,
                        max_bytes=256 << 20)
    buf.start()
    stop = threading.Event()

    def epochs() -> None:
        e = 0
        while not stop.wait(interval):
            buf.begin_epoch(e + 1)
            buf.release(e)
            e += 1

    ticker = threading.Thread(target=epochs, daemon=True)
    assert buf._reader is not None and buf._reader.native_id is not None
    reader_id = buf._reader.native_id
    cpu0, t0 = thread_cpu_s(reader_id), time.monotonic()
    ticker.start()
    try:
        sent, received = flood(ns, seconds, size, rate)
    finally:
        stop.set()
        ticker.join()
        cpu = thread_cpu_s(reader_id) - cpu0
        wall = time.monotonic() - t0
        c = buf.counters()
        buf.close(release_all=True)
    queued = c["released_packets"] + c["held_packets"] + c["dropped_packets"]
    return {"sent": sent, "received": received, "queued": queued,
            "sent_pps": round(sent / seconds), "delivered_pps": round(received / seconds),
            "buffer_dropped": c["dropped_packets"], "kernel_dropped": c["kernel_dropped"],
            "enobufs": c["enobufs"], "reader_cpu_s": round(cpu, 3),
            "reader_cpu_share": round(cpu / wall, 3),
            "us_per_packet": round(cpu / max(queued, 1) * 1e6, 2),
            "release_latency_ms": c["release_latency_ms"]}


def release_latency(ns: dict[str, str], batches: tuple[int, ...]) -> dict[int, float]:
    """ms for one release() of a batch of N held packets (kernel re-injection included)."""
    out: dict[int, float] = {}
    for n in batches:
        buf = NfqueueBuffer("rnb-hu", netns=f"/run/netns/{ns['h']}", max_packets=n + 10)
        buf.start()
        try:
            tx = in_netns(f"/run/netns/{ns['u']}",
                          lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
            for _ in range(n):
                tx.sendto(b"x" * 64, (CLIENT_IP, PORT))
            tx.close()
            deadline = time.monotonic() + 5
            while buf.counters()["held_packets"] < n and time.monotonic() < deadline:
                time.sleep(0.01)
            assert buf.counters()["held_packets"] == n
            buf.begin_epoch(1)
            buf.release(0)
            out[n] = buf.counters()["release_latency_ms"]["last"]
        finally:
            buf.close()
    return out


def parse_cost() -> dict[str, float]:
    """µs per message: the reader's fast path and the full parser."""
    pkt = bytearray.fromhex(
        "87000000000300000000000000000000020000070b0001000000000108000200080005000000"
        "000308000600000000021000090000060000164ca492c3dc000014000400000000006b027618"
        "0000000000060b4d08000e00000000012b000a0045000027a74140003f117ce70a4d02020a4d"
        "0102e16c8c38001317c268656c6c6f2072656d7573")
    n = 100_000
    fast = timeit.timeit(lambda: nfnl.scan_packet(pkt, len(pkt)), number=n)
    full = timeit.timeit(lambda: list(nfnl.parse(pkt)), number=n)
    return {"scan_packet": round(fast / n * 1e6, 2), "parse": round(full / n * 1e6, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--interval", type=float, default=0.05)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--rates", default="20000,50000,100000,0",
                    help="offered packets/s of the buffered runs (0: as fast as possible)")
    args = ap.parse_args()
    tag = secrets.token_hex(2)
    ns = build_lab(tag)
    try:
        sent, received = flood(ns, args.seconds, args.size)
        result = {
            "unbuffered_flood": {"sent_pps": round(sent / args.seconds),
                                 "delivered_pps": round(received / args.seconds)},
            "buffered": {r: run_buffered(ns, args.seconds, args.interval, args.size, int(r))
                         for r in args.rates.split(",")},
            "release_ms_by_batch": release_latency(ns, (1, 100, 1000, 10000)),
            "parse_us_per_message": parse_cost(),
            "interval_s": args.interval, "payload_bytes": args.size,
        }
        print(json.dumps(result, indent=2))
    finally:
        for n in ns.values():
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


if __name__ == "__main__":
    main()
