"""Link: a send blocked on a full socket must not stop the reader.

A big epoch to a slow backup blocks the primary's sender in sendall(). Before
2026-11-30 the sender held the link's lock meanwhile, and the reader needed
the same lock to parse what arrived: the backup's ACKs and heartbeats stayed
unread, the primary's lease expired and it dropped a healthy link. A real
socket pair; the protocol object is a stand-in (framing by newline).
"""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from remus.link import Link, LinkClosed
from remus.protocol import NEED_DATA
from tests.support.timing import wait_for


class LineConn:
    """The part of a protocol connection Link uses: messages are lines."""

    def __init__(self) -> None:
        self.buf = b""

    def send(self, msg: Any) -> bytes:
        return bytes(msg) + b"\n"

    def receive_data(self, data: bytes) -> None:
        self.buf += data

    def next_event(self) -> Any:
        line, sep, rest = self.buf.partition(b"\n")
        if not sep:
            return NEED_DATA
        self.buf = rest
        return line


def test_reader_runs_while_a_send_is_blocked() -> None:
    ours, peer = socket.socketpair()
    link = Link(ours, LineConn(), "peer")
    big = b"x" * (32 << 20)  # far more than the socket buffers hold
    def send_big() -> None:
        try:
            link.send(big)
        except LinkClosed:
            pass  # the test closes the link under it

    sender = threading.Thread(target=send_big, daemon=True)
    sender.start()
    time.sleep(0.2)
    assert sender.is_alive()  # blocked: the peer reads nothing yet
    got: list[Any] = []
    reader = threading.Thread(target=lambda: got.append(next(link.events())), daemon=True)
    reader.start()
    peer.sendall(b"heartbeat\n")
    reader.join(timeout=2.0)
    try:
        assert got == [b"heartbeat"], "the reader waited for the blocked sender"
    finally:
        peer.setblocking(False)
        link.close()
        peer.close()
        sender.join(timeout=2.0)


def test_frames_leave_in_protocol_order() -> None:
    ours, peer = socket.socketpair()
    link = Link(ours, LineConn(), "peer")
    threads = [threading.Thread(target=link.send, args=(bytes([65 + i]) * 1000,))
               for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    link.close()
    data = b""
    while chunk := peer.recv(1 << 20):
        data += chunk
    lines = data.split(b"\n")[:-1]
    assert len(lines) == 20 and all(len(set(ln)) == 1 for ln in lines)  # none interleaved
    peer.close()


def test_unread_counts_what_the_reader_has_not_taken() -> None:
    ours, peer = socket.socketpair()
    link = Link(ours, LineConn(), "peer")
    assert link.unread() == 0
    peer.sendall(b"x" * 1000)
    wait_for(lambda: link.unread() == 1000, timeout=2.0)
    assert link.unread() == 1000
    assert link.bytes_acked() == 0  # not TCP: no progress to report
    link.close()
    peer.close()
