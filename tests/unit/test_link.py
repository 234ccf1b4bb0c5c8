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

import pytest

from remus.link import Link, LinkClosed
from remus.protocol import NEED_DATA, BackupConnection, PrimaryConnection
from remus.protocol import messages as m
from remus.protocol.frames import LocalProtocolError
from tests.support.timing import wait_for

PSK = b"f" * 32


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


def test_a_send_racing_the_peers_eof_is_a_lost_link() -> None:
    """Seen in a fresh-clone run: the backup was killed, the reader fed the EOF
    to the protocol (state CLOSED) and the heartbeat thread sent before the
    reader closed the link. The send raised LocalProtocolError, which the
    heartbeat loop did not expect: protection ended "abnormally" instead of
    reconnecting. A lost link is LinkClosed, whatever moment it is seen at."""
    p = PrimaryConnection(PSK, "u", 1, {})
    b = BackupConnection(PSK)
    b.receive_data(p.start())
    b.next_event()
    p.receive_data(b.welcome())
    p.next_event()
    ours, peer = socket.socketpair()
    link = Link(ours, p, "backup")
    p.receive_data(b"")  # what the reader does with the EOF, just before link.close()
    assert p.next_event() is not NEED_DATA
    try:
        with pytest.raises(LinkClosed):
            link.send(m.Heartbeat(generation=1, epoch=0, acked=-1, sent_ns=0, lease_ms=200))
        assert link.closed
    finally:
        link.close()
        peer.close()


def test_a_send_the_protocol_refuses_on_a_live_link_is_still_an_error() -> None:
    p = PrimaryConnection(PSK, "u", 1, {})  # no handshake yet: an epoch may not be sent
    ours, peer = socket.socketpair()
    link = Link(ours, p, "backup")
    try:
        with pytest.raises(LocalProtocolError):
            link.send(m.EpochBegin(generation=1, epoch=0, base_epoch=-1, full=True))
        assert not link.closed
    finally:
        link.close()
        peer.close()
