"""The NETLINK_NETFILTER socket of the NFQUEUE buffer: binding a pair of queues
(Q_out, Q_in = Q_out + 1) and sending verdicts. Wire format: remus.netbuf.nfnl.
"""

from __future__ import annotations

import errno
import os
import socket
from typing import Any

from remus.errors import HostError
from remus.netbuf import nfnl

SO_RCVBUFFORCE = 33
COPY_RANGE = 64  # headers only: enough to debug, and NFQA_CAP_LEN carries the length
RECV_SIZE = 1 << 16
QUEUE_BASE = 0x5200  # derived queue numbers start here, away from the popular 0


class QueueSocket:
    """One NETLINK_NETFILTER socket bound to queues; sends verdicts.

    send() may be called from any thread concurrently with recv_into() in the
    reader (the kernel serialises datagrams). Verdicts must come from the
    socket that bound the queue (the kernel checks the port id)."""

    def __init__(self, rcvbuf: int) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                                  nfnl.NETLINK_NETFILTER)
        self.sock.bind((0, 0))
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self._seq = 0
        self.early: list[nfnl.Packet] = []  # packets read while waiting for an ACK

    def request(self, make: Any, *args: Any, **kw: Any) -> None:
        """Send one acked config request and wait for its ACK (before the reader runs)."""
        self._seq += 1
        seq = self._seq
        self.sock.send(make(*args, seq=seq, **kw))
        buf = bytearray(RECV_SIZE)
        self.sock.settimeout(2.0)
        try:
            while True:
                n = self.sock.recv_into(buf)
                for ev in nfnl.parse(memoryview(buf), n):
                    if isinstance(ev, nfnl.Packet):
                        self.early.append(ev)
                    elif isinstance(ev, nfnl.NetlinkAck) and ev.seq == seq:
                        if ev.error:
                            raise OSError(ev.error, os.strerror(ev.error))
                        return
        finally:
            self.sock.settimeout(None)

    def bind_queue(self, queue: int, maxlen: int) -> None:
        self.request(nfnl.config_cmd, queue, nfnl.NFQNL_CFG_CMD_BIND)
        self.request(nfnl.config_params, queue, copy_mode=nfnl.NFQNL_COPY_PACKET,
                     copy_range=COPY_RANGE, maxlen=maxlen,
                     # GSO on: verdicts only, so the kernel need not segment or
                     # checksum for us. Fail-open in the mask, not in the flags:
                     # explicitly off.
                     flags=nfnl.NFQA_CFG_F_GSO,
                     mask=nfnl.NFQA_CFG_F_FAIL_OPEN | nfnl.NFQA_CFG_F_GSO)

    def set_passing(self, queue: int, maxlen: int, passing: bool, *, acked: bool = False) -> None:
        """Whether `queue` lets packets through in the kernel (an empty queue
        that fails open: every packet overflows it and is accepted at once,
        without a message to us, and without using up an id) or queues them
        (up to maxlen, fail-open off). Applied when the send returns: the
        kernel handles the request in it. acked: wait for the kernel's ACKs
        (only before the reader runs; otherwise none is asked for).

        Never a moment with length 0 and fail-open off, which would drop
        packets: the kernel sets the length before the flags, so passing on
        is two requests (fail-open, then length 0) and passing off one
        (length back, then fail-open off)."""
        both = nfnl.NFQA_CFG_F_FAIL_OPEN | nfnl.NFQA_CFG_F_GSO
        steps: list[dict[str, Any]] = (
            [dict(flags=both, mask=both), dict(maxlen=0)] if passing
            else [dict(maxlen=maxlen, flags=nfnl.NFQA_CFG_F_GSO, mask=both)])
        for kw in steps:
            if acked:
                self.request(nfnl.config_params, queue, **kw)
            else:
                self.sock.send(nfnl.config_params(queue, ack=False, **kw))

    def send(self, msg: bytes) -> None:
        self.sock.send(msg)

    def close(self) -> None:
        # Closing the socket destroys its queue instances: the kernel drops
        # whatever is still queued (that is the fail-closed path too).
        self.sock.close()


# The kernel answers EPERM when another socket owns the queue (EBUSY if ours).
_TAKEN = (errno.EPERM, errno.EBUSY)


def derived_queue(ifindex: int) -> int:
    """The first Q_out tried for a veth: even, stable per interface."""
    return QUEUE_BASE + (2 * ifindex) % (0xFFFE - QUEUE_BASE)


def bind_pair(qs: QueueSocket, first: int | None, maxlen: int,
              ifindex: int) -> tuple[int, int]:
    """Bind (Q_out, Q_in = Q_out + 1): `first`, or probe upwards from derived_queue."""
    if first is not None:
        candidates = [first]
    else:
        start = derived_queue(ifindex)
        candidates = [start + 2 * i for i in range(64) if start + 2 * i + 1 <= 0xFFFF]
    for q in candidates:
        try:
            qs.bind_queue(q, maxlen)
        except OSError as err:
            if err.errno in _TAKEN and first is None:
                continue
            raise HostError(f"cannot bind netfilter queue {q}: {err}") from err
        try:
            qs.bind_queue(q + 1, maxlen)
        except OSError as err:
            qs.request(nfnl.config_cmd, q, nfnl.NFQNL_CFG_CMD_UNBIND)
            if err.errno in _TAKEN and first is None:
                continue
            raise HostError(f"cannot bind netfilter queue {q + 1}: {err}") from err
        return q, q + 1
    raise HostError("no free pair of netfilter queue numbers")
