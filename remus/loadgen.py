"""A client that proves the guarantee: writes over ONE TCP connection, then checks.

`python -m remus.loadgen redis --host H --port P --duration S --out FILE`

It issues `SET key:i i` one at a time (or `--inflight N` pipelined), records
the time of every acknowledged write, never reconnects (a broken connection
is reported, not papered over), and at the end reads every acknowledged key
back over the same connection. The JSON it writes says how many acknowledged
writes are missing (must be 0), the longest gap between replies (the service
gap during a failover), and whether the connection survived.
Also usable against memcached (`memcached` mode, text protocol). SIGINT or SIGTERM
ends the write phase early (the read-back still runs).
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import threading
import time
from typing import Any


class Proto:
    def __init__(self, sk: socket.socket) -> None:
        self.sk = sk
        self.buf = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            data = self.sk.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.buf += data
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    def _exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sk.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out


class Redis(Proto):
    def set_req(self, i: int) -> bytes:
        k, v = f"key:{i}".encode(), str(i).encode()
        return b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(k), k, len(v), v)

    def set_ok(self) -> bool:
        return self._line() == b"+OK"

    def get_many(self, keys: list[int]) -> list[bytes | None]:
        parts = [b"MGET"] + [f"key:{i}".encode() for i in keys]
        req = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in parts)
        self.sk.sendall(req)
        head = self._line()
        assert head.startswith(b"*"), head
        out: list[bytes | None] = []
        for _ in range(int(head[1:])):
            h = self._line()
            n = int(h[1:])
            out.append(None if n < 0 else self._exact(n + 2)[:-2])
        return out


class Memcached(Proto):
    def set_req(self, i: int) -> bytes:
        v = str(i).encode()
        return b"set key:%d 0 0 %d\r\n%s\r\n" % (i, len(v), v)

    def set_ok(self) -> bool:
        return self._line() == b"STORED"

    def get_many(self, keys: list[int]) -> list[bytes | None]:
        self.sk.sendall(b"get " + b" ".join(f"key:{i}".encode() for i in keys) + b"\r\n")
        found: dict[int, bytes] = {}
        while True:
            line = self._line()
            if line == b"END":
                break
            _, key, _flags, n = line.split()
            found[int(key.split(b":")[1])] = self._exact(int(n) + 2)[:-2]
        return [found.get(i) for i in keys]


def run(mode: str, host: str, port: int, duration: float, inflight: int,
        connect_timeout: float, stall_timeout: float, pace: float = 0.0) -> dict[str, Any]:
    sk = socket.create_connection((host, port), timeout=connect_timeout)
    sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sk.settimeout(stall_timeout)
    p: Redis | Memcached = Redis(sk) if mode == "redis" else Memcached(sk)
    t0 = time.time()
    acked: list[int] = []
    times: list[float] = []
    sent = 0
    error = None
    pending: list[int] = []
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # Ends the write phase early; the read-back over the same connection still runs.
        signal.signal(sig, lambda *_: stop.set())
    try:
        while time.time() - t0 < duration and not stop.is_set():
            while len(pending) < inflight:
                sk.sendall(p.set_req(sent))
                pending.append(sent)
                sent += 1
            i = pending.pop(0)
            if not p.set_ok():
                raise RuntimeError(f"unexpected reply to SET key:{i}")
            acked.append(i)
            times.append(time.time())
            if pace:
                time.sleep(pace)
        while pending:
            i = pending.pop(0)
            if p.set_ok():
                acked.append(i)
                times.append(time.time())
    except (OSError, ConnectionError, RuntimeError) as e:
        error = f"{type(e).__name__}: {e}"
    missing: list[int] = []
    wrong = 0
    verified = False
    if error is None:
        try:
            for k in range(0, len(acked), 500):
                batch = acked[k:k + 500]
                for i, v in zip(batch, p.get_many(batch), strict=True):
                    if v is None:
                        missing.append(i)
                    elif v != str(i).encode():
                        wrong += 1
            verified = True
        except (OSError, ConnectionError) as e:
            error = f"verification failed: {type(e).__name__}: {e}"
    sk.close()
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    worst = max(range(len(gaps)), key=gaps.__getitem__) if gaps else None
    return {
        "mode": mode, "sent": sent, "acked": len(acked), "start": t0,
        "duration_s": (times[-1] - t0) if times else 0.0,
        "missing": len(missing), "missing_sample": missing[:20], "wrong_values": wrong,
        "verified": verified, "connection_survived": error is None, "error": error,
        "max_gap_s": gaps[worst] if worst is not None else None,
        "max_gap_at": times[worst] if worst is not None else None,
        "reply_times": times,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["redis", "memcached"])
    ap.add_argument("--host", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--inflight", type=int, default=1)
    ap.add_argument("--connect-timeout", type=float, default=5.0)
    ap.add_argument("--stall-timeout", type=float, default=15.0,
                    help="give up when no reply comes for this long")
    ap.add_argument("--pace", type=float, default=0.0,
                    help="sleep this many seconds after each reply (a light, steady load)")
    ap.add_argument("--out", default="-")
    a = ap.parse_args(argv)
    res = run(a.mode, a.host, a.port, a.duration, a.inflight, a.connect_timeout, a.stall_timeout,
              a.pace)
    text = json.dumps(res)
    if a.out == "-":
        print(text)
    else:
        with open(a.out, "w") as f:
            f.write(text)
    return 0 if res["connection_survived"] and res["missing"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
