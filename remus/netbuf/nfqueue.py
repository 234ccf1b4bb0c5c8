"""NFQUEUE output buffer: the unit's packets wait in a netfilter queue.

Rules in the host's namespace send every packet from the unit's veth (-i)
to queue Q_out and every packet towards it (-o) to queue Q_in. The kernel
keeps queued packets; we keep only their ids, per epoch (EpochLedger), and
let a whole epoch out with one NFQNL_MSG_VERDICT_BATCH. Fail closed: no
--queue-bypass and Q_out's fail-open explicitly off, so if this process dies
the kernel drops what was queued and everything that comes later.

Inbound is held only during a dump (hold_inbound). Between dumps Q_in is
set to length 0 with fail-open on: every packet towards the unit overflows
it and the kernel accepts it at once, without a message to the reader (A/B
at 1000x100, 6 pairs: 260k -> 268k SET/s). Its instance still dies with
this process, and then the rule drops inbound too.

The rules are remus.netbuf.nfqueue_rules; the netlink socket and the binding
of the queue pair are remus.netbuf.nfqueue_socket.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
import time
from typing import Any

from remus.errors import HostError
from remus.netbuf import nfnl
from remus.netbuf.base import (
    DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PACKETS,
    LATENCY_WINDOW,
    EpochLedger,
    OutputBuffer,
    latency_summary,
)
from remus.netbuf.nfqueue_rules import QueueRules
from remus.netbuf.nfqueue_socket import RECV_SIZE, QueueSocket, bind_pair
from remus.netns import in_netns
from remus.stats import Series

log = logging.getLogger(__name__)

QUEUE_SLACK = 4096  # kernel queue room beyond our limit, so we drop (and count) first
#: The inbound sweep's verdict covers ids up to this far past the last one read.
SWEEP = 1 << 30


class NfqueueBuffer(OutputBuffer):
    """Output buffer on NFQUEUE at the host side of the unit's veth.

    host_veth: the host-side veth name; netns: path of the host's network
    namespace if it is not the caller's (the socket is opened there, iptables
    runs there through nsenter); queue: Q_out (Q_in = queue + 1) or None to
    pick free ones; max_packets/max_bytes: held-output limits (over them a
    packet is dropped at once, never released early); local: also hold the
    unit's traffic to/from the host itself; bridged: the veth is a bridge port.

    Kernel 6.18 keeps queued packets in a hash that refuses inserts past
    65536 entries (the packet is dropped, counted in kernel_dropped), so
    limits above ~60000 packets do not hold more."""

    name = "nfqueue"

    def __init__(self, host_veth: str, *, netns: str | None = None, queue: int | None = None,
                 max_packets: int = DEFAULT_MAX_PACKETS, max_bytes: int = DEFAULT_MAX_BYTES,
                 rcvbuf: int = 32 << 20, local: bool = True, bridged: bool = False) -> None:
        self.veth = host_veth
        self.netns = netns
        self._queue_arg = queue
        self._rcvbuf = rcvbuf
        self.ledger = EpochLedger(max_packets, max_bytes)
        self.rules = QueueRules(host_veth, netns=netns, local=local, bridged=bridged)
        self.q_out = self.q_in = -1
        self._qs: QueueSocket | None = None
        self._proc: Any = None  # /proc/net/netfilter/nfnetlink_queue of that netns
        self._lock = threading.Lock()  # ledger + outbound counters
        self._in_lock = threading.Lock()  # inbound hold state; held across its verdicts
        self._reader: threading.Thread | None = None
        self._wake_r, self._wake_w = -1, -1
        self._stop = False
        self._passthrough = False
        self._in_hold = False
        self._in_max: int | None = None
        self._in_last = 0  # the last inbound packet id read
        self._in_waiting = 0
        self._maxlen = 0
        # Inbound passes in the kernel outside holds (QueueSocket.set_passing);
        # False (a kernel that refuses it): every inbound packet comes to the
        # reader, which accepts it.
        self._in_gate = True
        self._latency = Series(LATENCY_WINDOW)
        self._c = dict.fromkeys(("released_packets", "released_bytes", "dropped_packets",
                                 "dropped_bytes", "inbound_held", "inbound_passed",
                                 "enobufs", "passed_unbuffered"), 0)

    # -- lifecycle ------------------------------------------------------------
    def start(self) -> None:
        if self._qs is not None:
            raise RuntimeError("NfqueueBuffer already started")
        try:
            self._start()
        except BaseException:
            self.close(release_all=False)
            raise
        log.info("nfqueue buffer on %s: out queue %d, in queue %d", self.veth,
                 self.q_out, self.q_in)

    def _start(self) -> None:
        self.rules.remove()  # stale rules of a dead agent for this veth
        maxlen = self.ledger.max_packets + QUEUE_SLACK

        def open_in_ns() -> tuple[QueueSocket, int, Any]:
            try:
                ifindex = socket.if_nametoindex(self.veth)
            except OSError as err:
                raise HostError(f"interface {self.veth} not found: {err}") from err
            qs = QueueSocket(self._rcvbuf)
            try:
                proc = open("/proc/thread-self/net/netfilter/nfnetlink_queue", "rb")  # noqa: SIM115
            except OSError:
                proc = None
            return qs, ifindex, proc

        self._qs, ifindex, self._proc = in_netns(self.netns, open_in_ns)
        self.q_out, self.q_in = bind_pair(self._qs, self._queue_arg, maxlen, ifindex)
        self._maxlen = maxlen
        try:
            self._qs.set_passing(self.q_in, maxlen, True, acked=True)
        except OSError as err:
            log.warning("inbound queue %d cannot pass packets in the kernel (%s): the reader "
                        "accepts each one", self.q_in, err)
            self._in_gate = False
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._qs.sock.setblocking(False)
        self._reader = threading.Thread(target=self._read_loop, name=f"netbuf-{self.veth}",
                                        daemon=True)
        self._reader.start()
        self.rules.install(self.q_out, self.q_in)

    def close(self, release_all: bool = False) -> None:
        qs = self._qs
        if qs is not None and release_all:
            self._open_gates()
        if qs is not None and not release_all:
            self._stop_reader()
            with self._lock:
                dropped = self.ledger.take_all()
                if dropped is not None:
                    self._c["dropped_packets"] += dropped.packets
                    self._c["dropped_bytes"] += dropped.nbytes
            self._qs = None
            qs.close()  # the kernel drops held packets; the rules now drop new ones
        self.rules.remove()
        if qs is not None and release_all:
            self._stop_reader()  # after the rules are gone: nothing new can be queued
            self._drain()
            self._qs = None
            qs.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if self._proc is not None:
            self._proc.close()
            self._proc = None

    def _open_gates(self) -> None:
        """Let every held packet out and pass new ones, keeping their order."""
        assert self._qs is not None
        with self._lock:
            self._passthrough = True
            span = self.ledger.take_all()
            if span is not None:
                # Under the lock so the reader's pass-through verdicts (higher
                # ids) cannot overtake this batch.
                self._qs.send(nfnl.verdict_batch(self.q_out, span.last_id, nfnl.NF_ACCEPT))
                self._c["released_packets"] += span.packets
                self._c["released_bytes"] += span.nbytes
        self.hold_inbound(False)

    def _stop_reader(self) -> None:
        if self._reader is None:
            return
        self._stop = True
        os.write(self._wake_w, b"x")
        self._reader.join(timeout=5)
        self._reader = None

    # -- agent calls ----------------------------------------------------------
    def begin_epoch(self, epoch: int) -> None:
        with self._lock:
            self.ledger.boundary(epoch)

    def release(self, through_epoch: int) -> None:
        t0 = time.perf_counter()
        with self._lock:
            span = self.ledger.take_through(self.ledger.clamp(through_epoch))
            if span is not None:
                self._c["released_packets"] += span.packets
                self._c["released_bytes"] += span.nbytes
        qs = self._qs
        if span is None or qs is None:
            return
        # Outside the lock: the kernel re-injects the whole batch inside this
        # send, which may take a while, and the reader must not wait for it.
        qs.send(nfnl.verdict_batch(self.q_out, span.last_id, nfnl.NF_ACCEPT))
        self._latency.add((time.perf_counter() - t0) * 1000)

    def hold_inbound(self, on: bool) -> None:
        with self._in_lock:
            qs = self._qs
            if on:
                if not self._in_hold:
                    self._in_hold = True  # first: what the reader sees from now on is held
                    if self._in_gate and qs is not None:
                        qs.set_passing(self.q_in, self._maxlen, False)
                return
            if not self._in_hold:
                return
            self._in_hold = False
            if qs is not None:
                if self._in_gate:
                    # New packets pass first, then everything still queued goes,
                    # read by us or not (ids up to 2^30 past the last we saw):
                    # only what arrives between the two can overtake.
                    qs.set_passing(self.q_in, self._maxlen, True)
                    last = self._in_max if self._in_max is not None else self._in_last
                    qs.send(nfnl.verdict_batch(self.q_in, (last + SWEEP) & 0xFFFFFFFF,
                                               nfnl.NF_ACCEPT))
                elif self._in_max is not None:
                    qs.send(nfnl.verdict_batch(self.q_in, self._in_max, nfnl.NF_ACCEPT))
                self._c["inbound_passed"] += self._in_waiting
            self._in_max, self._in_waiting = None, 0

    def counters(self) -> dict[str, Any]:
        with self._lock:
            c: dict[str, Any] = dict(self._c)
            c.update(held_packets=self.ledger.held_packets, held_bytes=self.ledger.held_bytes,
                     current_epoch=self.ledger.current, released_epoch=self.ledger.released)
        c.update(backend=self.name, guarantee=True, inbound_waiting=self._in_waiting,
                 release_latency_ms=latency_summary(self._latency), queues=[self.q_out, self.q_in],
                 kernel_dropped=self._kernel_dropped())
        return c

    def _kernel_dropped(self) -> int | None:
        """Packets the kernel dropped for our queues (full queue or socket)."""
        if self._proc is None:
            return None
        try:
            self._proc.seek(0)
            lines = self._proc.read().decode().splitlines()
        except (OSError, ValueError):
            return None
        total = 0
        for line in lines:
            f = line.split()
            if len(f) >= 7 and int(f[0]) in (self.q_out, self.q_in):
                total += int(f[5]) + int(f[6])  # queue_dropped, user_dropped
        return total

    # -- reader -----------------------------------------------------------------
    def _read_loop(self) -> None:
        qs = self._qs
        assert qs is not None
        poller = select.poll()
        poller.register(qs.sock.fileno(), select.POLLIN)
        poller.register(self._wake_r, select.POLLIN)
        early: list[int] = []
        for p in qs.early:
            self._on_packet(p.queue, p.packet_id, p.length, early)
        self._flush_inbound(early)
        qs.early.clear()
        while not self._stop:
            poller.poll()
            try:
                self._drain()
            except Exception:  # keep holding: a dead reader would stall, not leak
                log.exception("netbuf reader error on %s", self.veth)

    def _drain(self, burst: int = 256) -> None:
        """Read what is waiting on the socket; handle it; return when empty."""
        qs = self._qs
        if qs is None:
            return
        buf = bytearray(RECV_SIZE)
        view = memoryview(buf)
        while True:
            inbound: list[int] = []
            for _ in range(burst):
                try:
                    n = qs.sock.recv_into(buf)
                except BlockingIOError:
                    self._flush_inbound(inbound)
                    return
                except OSError as err:
                    if err.errno != errno.ENOBUFS:
                        raise
                    # The kernel could not queue a message to us and dropped
                    # that packet (no fail-open): closed, not leaked.
                    self._c["enobufs"] += 1
                    continue
                hit = nfnl.scan_packet(buf, n)
                if hit is not None:
                    self._on_packet(*hit, inbound)
                    continue
                for ev in nfnl.parse(view, n):
                    if isinstance(ev, nfnl.Packet):
                        self._on_packet(ev.queue, ev.packet_id, ev.length, inbound)
                    elif isinstance(ev, nfnl.NetlinkAck) and ev.error:
                        log.debug("nfqueue verdict error: %s", os.strerror(ev.error))
            self._flush_inbound(inbound)

    def _on_packet(self, queue: int, packet_id: int, length: int, inbound: list[int]) -> None:
        if queue == self.q_in:
            inbound.append(packet_id)
            return
        if queue != self.q_out:
            return
        qs = self._qs
        assert qs is not None
        with self._lock:
            if self._passthrough:
                qs.send(nfnl.verdict(self.q_out, packet_id, nfnl.NF_ACCEPT))
                self._c["passed_unbuffered"] += 1
                return
            if self.ledger.admit(packet_id, length):
                return
            self._c["dropped_packets"] += 1
            self._c["dropped_bytes"] += length
        # Over the limit: drop now (TCP resends), never let it out early.
        qs.send(nfnl.verdict(self.q_out, packet_id, nfnl.NF_DROP))

    def _flush_inbound(self, ids: list[int]) -> None:
        if not ids or self._qs is None:
            return
        with self._in_lock:
            self._in_last = ids[-1]
            if self._in_hold:
                self._in_max = ids[-1]
                self._in_waiting += len(ids)
                self._c["inbound_held"] += len(ids)
            else:
                # With the gate these were queued before a hold's end, and its
                # sweep has accepted them (the kernel answers ENOENT): packets
                # that pass in the kernel use up no id, so the sweep's window
                # covers every queued one. This verdict only makes sure.
                self._qs.send(nfnl.verdict_batch(self.q_in, ids[-1], nfnl.NF_ACCEPT))
                self._c["inbound_passed"] += len(ids)
        ids.clear()
