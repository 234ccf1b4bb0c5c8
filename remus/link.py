"""TCP transport around the sans-I/O protocol connections.

A thin layer: it owns the socket, serialises sends under one lock (the
protocol's sequence numbers demand a single writer) and feeds received
bytes to the connection object. Everything about meaning lives in
remus.protocol.
"""

from __future__ import annotations

import fcntl
import logging
import socket
import struct
import termios
import threading
from collections.abc import Callable, Iterator
from typing import Any

from remus.errors import ProtocolError, RemusError
from remus.protocol import NEED_DATA
from remus.protocol.frames import LocalProtocolError

log = logging.getLogger(__name__)

#: offset of tcpi_bytes_acked in struct tcp_info (linux/tcp.h, Linux >= 4.1)
TCPI_BYTES_ACKED = 120
#: offset of tcpi_last_data_recv (u32, ms since the last data segment arrived)
TCPI_LAST_DATA_RECV = 52
#: offset of tcpi_last_ack_recv (u32, ms since the peer last acknowledged data)
TCPI_LAST_ACK_RECV = 56


class LinkClosed(RemusError):
    """The peer went away or the connection broke."""


class Link:
    """One replication connection: a socket plus a protocol connection object.

    Thread contract: any thread may send; one thread reads (`events`). `lock`
    guards the protocol object and is only held to turn messages into bytes
    or bytes into events, never across socket I/O; `send_lock` keeps one
    writer on the socket, so frames go out in the order the protocol
    numbered them. A send blocked on a full socket (a big epoch to a slow
    backup) therefore never stops the reader: the peer's ACKs and heartbeats
    are still read, and its lease renewed.
    """

    def __init__(self, sk: socket.socket, conn: Any, peer: str) -> None:
        self.sk = sk
        self.conn = conn
        self.peer = peer
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.closed = False
        self.bytes_sent = 0
        # Called on every non-empty recv: bytes still arriving (a big epoch on a
        # slow or busy link) prove the peer alive before a whole frame is in.
        self.on_rx: Callable[[], None] | None = None
        if sk.family in (socket.AF_INET, socket.AF_INET6):
            sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def set_user_timeout(self, seconds: float) -> None:
        """Unacknowledged data older than this kills the connection (partition guard)."""
        self.sk.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(1, int(seconds * 1000)))

    def send_raw(self, data: bytes | list[bytes]) -> None:
        if self.closed:
            raise LinkClosed(f"link to {self.peer} is closed")
        try:
            if isinstance(data, list):
                for part in data:
                    self.sk.sendall(part)
                    self.bytes_sent += len(part)
            else:
                self.sk.sendall(data)
                self.bytes_sent += len(data)
        except OSError as e:
            self.close()
            raise LinkClosed(f"send to {self.peer}: {e}") from e

    def send(self, msg: Any) -> None:
        self.send_frames(lambda conn: conn.send(msg))

    def send_frames(self, make: Callable[[Any], bytes | list[bytes]]) -> None:
        """Send what `make(protocol connection)` returns, in protocol order."""
        with self.send_lock:
            with self.lock:
                try:
                    data = make(self.conn)
                except LocalProtocolError as e:
                    # The reader saw the peer's EOF (or BYE) and closed the
                    # conversation a moment before it closes the link: for the
                    # sender that is a lost link, not a protocol violation.
                    if not getattr(self.conn, "closed", False):
                        raise
                    self.close()
                    raise LinkClosed(f"{self.peer} closed the connection ({e})") from e
            self.send_raw(data)

    def events(self, bufsize: int = 1 << 20) -> Iterator[Any]:
        """Yield protocol events until the peer closes; raises on violations."""
        while not self.closed:
            with self.lock:
                ev = self.conn.next_event()
            if ev is not NEED_DATA:
                yield ev
                continue
            try:
                data = self.sk.recv(bufsize)
            except OSError as e:
                self.close()
                raise LinkClosed(f"receive from {self.peer}: {e}") from e
            if data and self.on_rx is not None:
                self.on_rx()
            with self.lock:
                try:
                    self.conn.receive_data(data)
                except ProtocolError:
                    self.close()
                    raise
            if not data:
                with self.lock:
                    ev = self.conn.next_event()
                if ev is not NEED_DATA:
                    yield ev
                self.close()
                raise LinkClosed(f"{self.peer} closed the connection")

    # -- stream progress (for liveness: what the peer's kernel and agent did) ------
    def bytes_acked(self) -> int:
        """Bytes of ours the peer's kernel acknowledged so far (0 if not TCP).

        The peer's kernel acknowledges only what fits in its receive buffer, so
        during a bulk transfer an advancing count means the peer's agent reads.
        """
        try:
            info = self.sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:
            return 0
        return int(struct.unpack_from("<Q", info, TCPI_BYTES_ACKED)[0]) if len(info) >= 128 else 0

    def recv_age(self) -> float | None:
        """Seconds since the peer's last data segment reached our kernel (None if
        unknown). The kernel stamps arrivals whether or not our reader runs, so a
        starved reader (a busy core, a long GIL hold) does not age it."""
        return self._tcp_age(TCPI_LAST_DATA_RECV)

    def ack_age(self) -> float | None:
        """Seconds since the peer's kernel last acknowledged data of ours (None if
        unknown). Its kernel answers whether or not the peer's agent runs: proof
        that its host is up and the path works, not that its agent does."""
        return self._tcp_age(TCPI_LAST_ACK_RECV)

    def _tcp_age(self, offset: int) -> float | None:
        try:
            info = self.sk.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
        except OSError:
            return None
        if len(info) < offset + 4:
            return None
        return int(struct.unpack_from("<I", info, offset)[0]) / 1000.0

    def unread(self) -> int:
        """Bytes the peer sent that our reader has not taken from the socket yet."""
        try:
            buf = fcntl.ioctl(self.sk.fileno(), termios.FIONREAD, b"\0" * 4)
        except OSError:
            return 0
        return int(struct.unpack("<i", buf)[0])

    def finish_sending(self) -> None:
        """Send our FIN after a last message (a Bye), keep reading.

        Closing at once would reset the connection if the peer's heartbeats
        wait unread in our socket, and a reset can reach the peer before it
        read our last message (seen: a Bye lost, a takeover of a stopped
        primary). The reader then sees the peer's own close."""
        try:
            self.sk.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.sk.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sk.close()
