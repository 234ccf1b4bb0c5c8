"""sch_plug output buffer (the qdisc written for Remus), where the kernel has it.

A qdisc only buffers a device's egress. The unit's output enters the host as
*ingress* of the host-side veth, so it is redirected to an IFB device whose
egress carries the plug (the usual IFB trick):

    veth ingress --mirred redirect--> ifb egress [plug] --> back into the stack

Traffic towards the unit leaves through the veth's egress, so a second plug
on the veth root holds it during dumps (hold_inbound).

sch_plug keeps a single plug: "block" inserts it, "release" (TCQ_PLUG_RELEASE_ONE)
lets out what came before it, "release_indefinite" stops buffering. Two
blocks without a release in between would merge their counts and could let a
later epoch out early, so PlugSchedule defers a boundary while one plug is
outstanding and re-tags those packets to the later epoch (safe: later).

This workplace's kernel has no sch_plug (CONFIG_NET_SCH_PLUG unset): start()
raises HostError there, and the command sequence is checked by unit tests.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
import time
import zlib
from typing import Any

from remus.errors import HostError
from remus.netbuf.base import DEFAULT_MAX_BYTES, LATENCY_WINDOW, OutputBuffer, latency_summary
from remus.proc import Runner, run_cmd
from remus.stats import Series

log = logging.getLogger(__name__)


@functools.cache
def plug_available() -> bool:
    """Probe sch_plug once, in a throw-away network namespace (its lo)."""
    try:
        res = run_cmd(["unshare", "--net", "--", "tc", "qdisc", "add", "dev", "lo", "root",
                       "plug", "limit", "10000"], check=False)
    except HostError:
        return False
    return res.returncode == 0


def ifb_name(veth: str) -> str:
    """A stable IFB name for a veth (<= 15 chars), so leftovers can be found."""
    return f"rifb{zlib.crc32(veth.encode()) & 0xFFFFFF:06x}"


class PlugSchedule:
    """Which plug commands the epoch calls turn into (pure; caller serialises).

    `outstanding` is the newest epoch whose packets are all queued before the
    single plug, or None when no plug waits for a release."""

    def __init__(self) -> None:
        self.current = 0
        self.released = -1
        self.outstanding: int | None = None
        self.deferred = False

    def boundary(self, epoch: int) -> list[str]:
        if epoch <= self.current:
            raise ValueError(f"begin_epoch({epoch}) does not advance epoch {self.current}")
        self.current = epoch
        if self.outstanding is None:
            self.outstanding = epoch - 1
            return ["block"]
        self.deferred = True
        return []

    def release(self, through_epoch: int) -> list[str]:
        if through_epoch >= self.current:
            log.error("release(%d) asked while epoch %d is running; clamped",
                      through_epoch, self.current)
            through_epoch = self.current - 1
        self.released = max(self.released, through_epoch)
        actions: list[str] = []
        while self.outstanding is not None and self.outstanding <= through_epoch:
            actions.append("release")
            self.outstanding = None
            if self.deferred:
                # Everything queued since the last plug, the running epoch's
                # output included, goes behind this plug: tagged current.
                actions.append("block")
                self.outstanding = self.current
                self.deferred = False
        return actions


_STATS = re.compile(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+).*?backlog (\d+)b (\d+)p", re.S)


class PlugBuffer(OutputBuffer):
    """Output buffer on sch_plug + IFB at the host side of the unit's veth.

    max_bytes is the plug's byte limit (sch_plug has no packet limit; over it
    the qdisc drops). Each call runs `tc`, ~2-4 ms (a fork), begin_epoch too."""

    name = "plug"

    def __init__(self, host_veth: str, *, netns: str | None = None,
                 max_bytes: int = DEFAULT_MAX_BYTES, runner: Runner = run_cmd,
                 **_ignored: Any) -> None:
        self.veth = host_veth
        self.ifb = ifb_name(host_veth)
        self.netns = netns
        self.limit = max_bytes
        self.run = runner
        self.sched = PlugSchedule()
        self._lock = threading.Lock()
        self._latency = Series(LATENCY_WINDOW)
        self._started = False
        self._in_hold = False

    def _tc(self, *args: str, check: bool = True) -> Any:
        return self.run(["tc", *args], netns=self.netns, check=check)

    def _plug(self, dev: str, action: str) -> None:
        self._tc("qdisc", "change", "dev", dev, "root", "plug", action)

    def setup_commands(self) -> list[list[str]]:
        v, i, lim = self.veth, self.ifb, str(self.limit)
        return [["ip", "link", "add", i, "type", "ifb"],
                ["ip", "link", "set", i, "up"],
                ["tc", "qdisc", "add", "dev", i, "root", "plug", "limit", lim],
                ["tc", "qdisc", "add", "dev", v, "root", "plug", "limit", lim],
                ["tc", "qdisc", "change", "dev", v, "root", "plug", "release_indefinite"],
                ["tc", "qdisc", "add", "dev", v, "handle", "ffff:", "ingress"],
                # Neighbour resolution passes: a held ARP or ND reply would keep the
                # host from forwarding anything to the unit until the next release.
                # ARP is neither "ip" nor "ipv6", so only ND needs a filter.
                *(["tc", "filter", "add", "dev", v, "parent", "ffff:", "protocol", "ipv6",
                   "prio", "1", "u32", "match", "ip6", "protocol", "58", "0xff",
                   "match", "u8", nd_type, "0xff", "at", "40", "action", "pass"]
                  for nd_type in ("135", "136")),  # neighbour solicitation, advertisement
                *(["tc", "filter", "add", "dev", v, "parent", "ffff:", "protocol", proto,
                   "prio", prio, "matchall", "action", "mirred", "egress", "redirect", "dev", i]
                  for proto, prio in (("ip", "2"), ("ipv6", "3")))]

    def teardown_commands(self) -> list[list[str]]:
        v, i = self.veth, self.ifb
        return [["tc", "qdisc", "del", "dev", v, "handle", "ffff:", "ingress"],
                ["tc", "qdisc", "del", "dev", v, "root"],
                ["ip", "link", "del", i]]

    def start(self) -> None:
        self.close()  # leftovers of a dead agent
        try:
            for argv in self.setup_commands():
                self.run(argv, netns=self.netns)
        except HostError as err:
            self.close()
            if "qdisc kind is unknown" in str(err):
                raise HostError("the kernel has no sch_plug qdisc (CONFIG_NET_SCH_PLUG); "
                                "use the nfqueue output buffer") from err
            raise
        self._started = True
        log.info("plug buffer on %s via %s", self.veth, self.ifb)

    def begin_epoch(self, epoch: int) -> None:
        with self._lock:
            for action in self.sched.boundary(epoch):
                self._plug(self.ifb, action)

    def release(self, through_epoch: int) -> None:
        t0 = time.perf_counter()
        with self._lock:
            actions = self.sched.release(through_epoch)
            for action in actions:
                self._plug(self.ifb, action)
        if "release" in actions:
            self._latency.add((time.perf_counter() - t0) * 1000)

    def hold_inbound(self, on: bool) -> None:
        with self._lock:
            if on != self._in_hold and self._started:
                self._plug(self.veth, "block" if on else "release_indefinite")
            self._in_hold = on

    def _stats(self, dev: str) -> tuple[int, int, int, int, int]:
        out = self._tc("-s", "qdisc", "show", "dev", dev, "root", check=False).stdout
        m = _STATS.search(out)
        if m is None:
            return (0, 0, 0, 0, 0)
        sent_b, sent_p, dropped, back_b, back_p = (int(x) for x in m.groups())
        return sent_b, sent_p, dropped, back_b, back_p

    def counters(self) -> dict[str, Any]:
        sent_b, sent_p, dropped, back_b, back_p = self._stats(self.ifb)
        with self._lock:
            cur, rel = self.sched.current, self.sched.released
        return {"backend": self.name, "guarantee": True, "held_packets": back_p,
                "held_bytes": back_b, "released_packets": sent_p, "released_bytes": sent_b,
                "dropped_packets": dropped, "dropped_bytes": None,
                "inbound_held": self._stats(self.veth)[4], "inbound_passed": None,
                "current_epoch": cur, "released_epoch": rel,
                "release_latency_ms": latency_summary(self._latency)}

    def close(self, release_all: bool = False) -> None:
        if release_all and self._started:
            self._plug(self.ifb, "release_indefinite")
            self._plug(self.veth, "release_indefinite")
            deadline = time.monotonic() + 1.0
            while self._stats(self.ifb)[4] and time.monotonic() < deadline:
                time.sleep(0.01)
        for argv in self.teardown_commands():
            self.run(argv, netns=self.netns, check=False)
        self._started = False
