"""Pure parts of the output buffer: nfnetlink_queue wire format (replayed on
bytes recorded from this kernel), the epoch ledger, the plug schedule, and the
commands the rule/qdisc managers would run."""

from __future__ import annotations

import errno
import struct
import subprocess
from typing import Any

import pytest

from remus.errors import ConfigError, HostError
from remus.netbuf import NfqueueBuffer, NullBuffer, PlugBuffer, make_buffer, nfnl
from remus.netbuf.base import EpochLedger
from remus.netbuf.nfqueue_rules import QueueRules
from remus.netbuf.nfqueue_socket import derived_queue
from remus.netbuf.plug import PlugSchedule, ifb_name
from remus.stats import Series

# Recorded with tests/integration's lab: queue 7 bound by one socket, a second
# socket tried to bind it (ERR), a bind of queue 8 with seq 5 (ACK), then UDP
# datagrams 10.77.2.2 -> 10.77.1.2 queued in FORWARD with copy range 64.
REC_ERR = bytes.fromhex(
    "300000000200000009000000190631acffffffff1c000000020305000900000000000000"
    "000000070800010001000000")
REC_ACK = bytes.fromhex("240000000200000105000000dc520000000000001c00000002030500050000000000"
                        "0000")
REC_PKT = bytes.fromhex(
    "87000000000300000000000000000000020000070b0001000000000108000200080005000000"
    "000308000600000000021000090000060000164ca492c3dc000014000400000000006b027618"
    "0000000000060b4d08000e00000000012b000a0045000027a74140003f117ce70a4d02020a4d"
    "0102e16c8c38001317c268656c6c6f2072656d7573")
REC_BIG = bytes.fromhex(  # no NFQA_TIMESTAMP in this one
    "94000000000300000000000000000000020000070b0001000000000208000200080005000000"
    "00030800060000000002100009000006000062998456fd48000008000d00000000e408000e00"
    "0000000144000a00450000e4eb7140003f1137fa0a4d02020a4d0102e065d17800d0187f7878"
    "78787878787878787878787878787878787878787878787878787878787878787878")

NF_INET_FORWARD = 2


# -- tables against the kernel header --------------------------------------------

def test_attribute_numbers_match_nfnetlink_queue_h() -> None:
    assert nfnl.NFQA["NFQA_PACKET_HDR"] == 1
    assert nfnl.NFQA["NFQA_VERDICT_HDR"] == 2
    assert nfnl.NFQA["NFQA_IFINDEX_INDEV"] == 5
    assert nfnl.NFQA["NFQA_PAYLOAD"] == 10
    assert nfnl.NFQA["NFQA_CAP_LEN"] == 13
    assert nfnl.NFQA["NFQA_CGROUP_CLASSID"] == 22
    assert nfnl.NFQA_CFG["NFQA_CFG_CMD"] == 1
    assert nfnl.NFQA_CFG["NFQA_CFG_QUEUE_MAXLEN"] == 3
    assert nfnl.NFQA_CFG["NFQA_CFG_FLAGS"] == 5


def test_struct_sizes_match_the_packed_kernel_structs() -> None:
    assert nfnl.S_NLMSGHDR.size == 16
    assert nfnl.S_NFGENMSG.size == 4
    assert nfnl.S_PACKET_HDR.size == 7  # __attribute__((packed))
    assert nfnl.S_CONFIG_PARAMS.size == 5  # packed
    assert nfnl.S_VERDICT_HDR.size == 8
    assert nfnl.S_CONFIG_CMD.size == 4


# -- parsing recorded bytes ----------------------------------------------------------

def test_parse_recorded_packet() -> None:
    (p,) = list(nfnl.parse(REC_PKT))
    assert isinstance(p, nfnl.Packet)
    assert (p.queue, p.packet_id, p.hw_protocol, p.hook) == (7, 1, 0x0800, NF_INET_FORWARD)
    assert p.length == 39 == len(p.payload)  # 20 IP + 8 UDP + 11 data: not truncated
    assert p.payload.endswith(b"hello remus")
    assert p.payload[12:16] == bytes([10, 77, 2, 2])  # the unit's address
    assert (p.indev, p.outdev) == (3, 2)  # rnb-hu -> rnb-hc in the host ns


def test_parse_truncated_copy_uses_cap_len() -> None:
    (p,) = list(nfnl.parse(REC_BIG))
    assert isinstance(p, nfnl.Packet)
    assert p.packet_id == 2
    assert len(p.payload) == 64 and p.length == 228  # NFQA_CAP_LEN


def test_parse_error_and_ack() -> None:
    assert list(nfnl.parse(REC_ERR)) == [nfnl.NetlinkAck(seq=9, error=errno.EPERM)]
    assert list(nfnl.parse(REC_ACK)) == [nfnl.NetlinkAck(seq=5, error=0)]


def test_parse_several_messages_in_one_datagram_and_a_size_limit() -> None:
    buf = bytearray(REC_PKT + b"\0" + REC_ACK + b"garbage")  # 0x87 is padded to 0x88
    events = list(nfnl.parse(buf, len(REC_PKT) + 1 + len(REC_ACK)))
    assert [type(e) for e in events] == [nfnl.Packet, nfnl.NetlinkAck]


@pytest.mark.parametrize("cut", [40, 100, len(REC_PKT) - 1])
def test_parse_rejects_truncated_messages(cut: int) -> None:
    bad = bytearray(REC_PKT[:cut])
    with pytest.raises(ValueError):
        list(nfnl.parse(bad))


def test_parse_rejects_packet_without_header() -> None:
    msg = nfnl.nfq_message(nfnl.NFQNL_MSG_PACKET, 3, nfnl.attr(nfnl.NFQA["NFQA_MARK"],
                                                                 b"\0\0\0\1"))
    with pytest.raises(ValueError, match="PACKET_HDR"):
        list(nfnl.parse(msg))


def test_parse_skips_unknown_message_types() -> None:
    msg = struct.pack("=IHHII", 16, nfnl.NLMSG_NOOP, 0, 0, 0)
    assert list(nfnl.parse(msg + REC_ACK)) == [nfnl.NetlinkAck(5, 0)]


@pytest.mark.parametrize("rec", [REC_PKT, REC_BIG])
def test_fast_scan_agrees_with_parse(rec: bytes) -> None:
    (p,) = list(nfnl.parse(rec))
    assert isinstance(p, nfnl.Packet)
    buf = bytearray(rec) + bytearray(100)  # a reused receive buffer with stale tail
    assert nfnl.scan_packet(buf, len(rec)) == (p.queue, p.packet_id, p.length)


def test_fast_scan_declines_what_it_does_not_handle() -> None:
    assert nfnl.scan_packet(REC_ACK, len(REC_ACK)) is None  # not a packet
    two = REC_PKT + b"\0" + REC_PKT
    assert nfnl.scan_packet(two, len(two)) is None  # more than one message
    assert nfnl.scan_packet(REC_PKT, 30) is None  # truncated


# -- building requests ------------------------------------------------------------------

def test_verdict_batch_layout() -> None:
    msg = nfnl.verdict_batch(0x5203, 0x01020304, nfnl.NF_ACCEPT)
    n, mtype, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (n, len(msg)) == (32, 32)
    assert mtype == (3 << 8) | 3 and flags == nfnl.NLM_F_REQUEST
    assert msg[16:20] == bytes([0, 0, 0x52, 0x03])  # nfgenmsg, res_id big endian
    assert struct.unpack_from("=HH", msg, 20) == (12, nfnl.NFQA["NFQA_VERDICT_HDR"])
    assert msg[24:32] == bytes([0, 0, 0, 1, 1, 2, 3, 4])


def test_config_cmd_is_byte_identical_to_the_request_the_kernel_echoed() -> None:
    # NLMSG_ERROR carries the offending request after the error code.
    assert nfnl.config_cmd(7, nfnl.NFQNL_CFG_CMD_BIND, seq=9) == REC_ERR[20:]


def test_config_params_turns_fail_open_off_explicitly() -> None:
    msg = nfnl.config_params(9, copy_mode=nfnl.NFQNL_COPY_PACKET, copy_range=64, maxlen=1000,
                             flags=nfnl.NFQA_CFG_F_GSO,
                             mask=nfnl.NFQA_CFG_F_FAIL_OPEN | nfnl.NFQA_CFG_F_GSO)
    attrs = {k: bytes(msg[p:p + n]) for k, p, n in nfnl.iter_attrs(msg, 20, len(msg))}
    assert attrs[nfnl.NFQA_CFG["NFQA_CFG_PARAMS"]] == bytes([0, 0, 0, 64, 2])
    assert attrs[nfnl.NFQA_CFG["NFQA_CFG_QUEUE_MAXLEN"]] == (1000).to_bytes(4, "big")
    mask = int.from_bytes(attrs[nfnl.NFQA_CFG["NFQA_CFG_MASK"]], "big")
    flags = int.from_bytes(attrs[nfnl.NFQA_CFG["NFQA_CFG_FLAGS"]], "big")
    assert mask & nfnl.NFQA_CFG_F_FAIL_OPEN and not flags & nfnl.NFQA_CFG_F_FAIL_OPEN
    assert len(msg) % 4 == 0  # the 5-byte params attribute is padded


# -- epoch ledger ---------------------------------------------------------------------

def test_ledger_releases_by_epoch_up_to_the_last_id() -> None:
    led = EpochLedger()
    for pid in (1, 2, 3):
        assert led.admit(pid, 100)
    led.boundary(1)
    assert led.admit(4, 50)
    led.boundary(2)
    span = led.take_through(0)
    assert span is not None and (span.last_id, span.packets, span.nbytes) == (3, 3, 300)
    assert led.take_through(0) is None  # idempotent
    assert (led.held_packets, led.held_bytes) == (1, 50)
    span = led.take_through(1)
    assert span is not None and span.last_id == 4
    assert led.released == 1


def test_ledger_one_release_covers_several_epochs() -> None:
    led = EpochLedger()
    for e, pid in ((1, 10), (2, 11), (3, 12)):
        led.boundary(e)
        led.admit(pid, 1)
    led.boundary(4)
    span = led.take_through(2)
    assert span is not None and (span.last_id, span.packets) == (11, 2)
    assert [s.epoch for s in led.spans] == [3]


def test_ledger_limits_refuse_and_do_not_record() -> None:
    led = EpochLedger(max_packets=2, max_bytes=1000)
    assert led.admit(1, 10) and led.admit(2, 10)
    assert not led.admit(3, 10)  # packets
    led2 = EpochLedger(max_packets=100, max_bytes=100)
    assert led2.admit(1, 60) and not led2.admit(2, 60) and led2.admit(3, 40)
    assert led.held_packets == 2 and led2.held_bytes == 100


def test_ledger_never_releases_the_running_epoch() -> None:
    led = EpochLedger()
    led.admit(1, 1)
    assert led.clamp(0) == -1  # epoch 0 is still running
    led.boundary(1)
    assert led.clamp(5) == 0
    with pytest.raises(ValueError):
        led.boundary(1)


def test_latency_window_percentiles() -> None:
    w = Series(window=100)
    assert w.summary()["p50"] is None
    for i in range(1, 101):
        w.add(float(i))
    s = w.summary()
    assert s["last"] == 100.0 and s["p50"] == 51.0 and s["p99"] == 100.0


# -- plug schedule ----------------------------------------------------------------------

def test_plug_schedule_one_epoch_in_flight() -> None:
    s = PlugSchedule()
    assert s.boundary(1) == ["block"]
    assert s.release(0) == ["release"]
    assert s.boundary(2) == ["block"]
    assert s.release(0) == []
    assert s.release(1) == ["release"]


def test_plug_schedule_defers_a_second_plug_and_tags_later() -> None:
    s = PlugSchedule()
    s.boundary(1)  # plug after epoch 0
    assert s.boundary(2) == []  # epoch 1's output stays before no plug yet
    assert s.release(0) == ["release", "block"]  # new plug covers epochs 1 and 2
    s.boundary(3)
    assert s.release(1) == []  # epoch 1 shares the plug with running epoch 2: not yet
    assert s.release(2) == ["release", "block"]  # deferred boundary 3 plugged now
    assert s.outstanding == 3


def test_plug_schedule_clamps_release_of_running_epoch() -> None:
    s = PlugSchedule()
    s.boundary(1)
    assert s.release(7) == ["release"]
    assert s.released == 0


# -- commands -----------------------------------------------------------------------------

class FakeRunner:
    def __init__(self, fail_on: str | None = None, stdout: str = "") -> None:
        self.calls: list[tuple[list[str], str | None]] = []
        self.fail_on = fail_on
        self.stdout = stdout

    def __call__(self, argv: list[str], *, netns: str | None = None, stdin: str | None = None,
                 check: bool = True) -> subprocess.CompletedProcess[str]:
        self.calls.append((list(argv), stdin))
        joined = " ".join(argv)
        if self.fail_on and self.fail_on in joined:
            if check:
                raise HostError(f"{joined}: Error: Specified qdisc kind is unknown.")
            return subprocess.CompletedProcess(argv, 2, "", "unknown")
        return subprocess.CompletedProcess(argv, 0, self.stdout, "")


def test_rules_script_has_no_bypass_and_covers_both_directions() -> None:
    r = QueueRules("rmh-web", runner=FakeRunner())
    v4 = r.script(100, 101)
    assert "-A REMUS-rmh-web -i rmh-web -j NFQUEUE --queue-num 100" in v4
    assert "-A REMUS-rmh-web -o rmh-web -j NFQUEUE --queue-num 101" in v4
    assert "-I FORWARD 1 -i rmh-web -j REMUS-rmh-web" in v4
    assert "-I INPUT 1 -i rmh-web" in v4 and "-I OUTPUT 1 -o rmh-web" in v4
    assert "bypass" not in v4 and v4.rstrip().endswith("COMMIT")
    v6 = r.script(100, 101, "ip6tables")
    assert v6.index("neighbour-advertisement") < v6.index("NFQUEUE")


def test_rules_script_for_a_bridge_port_uses_physdev() -> None:
    script = QueueRules("rmh-web", bridged=True, runner=FakeRunner()).script(100, 101)
    assert "-A REMUS-rmh-web -m physdev --physdev-in rmh-web -j NFQUEUE --queue-num 100" in script
    assert "-I FORWARD 1 -m physdev --physdev-out rmh-web -j REMUS-rmh-web" in script
    assert " -i rmh-web" not in script and "OUTPUT" not in script


def test_rules_removal_script_from_saved_ruleset() -> None:
    saved = "\n".join(["*filter", ":FORWARD ACCEPT [0:0]", ":REMUS-v1 - [0:0]",
                       "-A FORWARD -o v1 -j REMUS-v1", "-A FORWARD -i v1 -j REMUS-v1",
                       "-A FORWARD -i v10 -j REMUS-v10",
                       "-A REMUS-v1 -i v1 -j NFQUEUE --queue-num 5", "COMMIT"])
    script = QueueRules("v1", runner=FakeRunner()).removal_script(saved)
    assert script is not None
    lines = script.splitlines()
    assert "-D FORWARD -o v1 -j REMUS-v1" in lines and "-D FORWARD -i v1 -j REMUS-v1" in lines
    assert not any("REMUS-v10" in line for line in lines)
    assert lines[-3:] == ["-F REMUS-v1", "-X REMUS-v1", "COMMIT"]
    assert QueueRules("v2", runner=FakeRunner()).removal_script(saved) is None


def test_derived_queue_pairs_stay_in_range() -> None:
    for ifindex in (1, 2, 1000, 40000, 2**31 - 1):
        q = derived_queue(ifindex)
        assert q % 2 == 0 and 0x5200 <= q and q + 1 <= 0xFFFF


def test_plug_setup_redirects_unit_output_through_a_plugged_ifb() -> None:
    run = FakeRunner()
    b = PlugBuffer("rmh-web", runner=run, max_bytes=4096)
    b.start()
    cmds = [" ".join(a) for a, _ in run.calls]
    ifb = ifb_name("rmh-web")
    assert len(ifb) <= 15
    setup = cmds[cmds.index(f"ip link add {ifb} type ifb"):]
    assert f"tc qdisc add dev {ifb} root plug limit 4096" in setup
    for proto, prio in (("ip", 2), ("ipv6", 3)):
        assert (f"tc filter add dev rmh-web parent ffff: protocol {proto} prio {prio} matchall "
                f"action mirred egress redirect dev {ifb}") in setup
    # ARP is not redirected (neither ip nor ipv6); ND replies pass before the redirect
    nd = [c for c in setup if "action pass" in c]
    assert len(nd) == 2 and all("prio 1 " in c and "protocol ipv6" in c for c in nd)
    # the plug is in place before any traffic is redirected to it
    assert setup.index(f"tc qdisc add dev {ifb} root plug limit 4096") < setup.index(
        next(c for c in setup if "mirred" in c))
    run.calls.clear()
    b.hold_inbound(True)
    b.begin_epoch(1)
    b.release(0)
    b.hold_inbound(False)
    assert [" ".join(a) for a, _ in run.calls] == [
        "tc qdisc change dev rmh-web root plug block",
        f"tc qdisc change dev {ifb} root plug block",
        f"tc qdisc change dev {ifb} root plug release",
        "tc qdisc change dev rmh-web root plug release_indefinite"]


def test_plug_missing_qdisc_is_a_clear_host_error_and_cleans_up() -> None:
    run = FakeRunner(fail_on="plug limit")
    with pytest.raises(HostError, match="sch_plug"):
        PlugBuffer("rmh-web", runner=run).start()
    assert " ".join(run.calls[-1][0]) == f"ip link del {ifb_name('rmh-web')}"


# -- factory and null buffer -----------------------------------------------------------

def test_make_buffer_kinds() -> None:
    assert isinstance(make_buffer("nfqueue", "v0", max_packets=5), NfqueueBuffer)
    assert isinstance(make_buffer("plug", "v0"), PlugBuffer)
    assert isinstance(make_buffer("none", "v0"), NullBuffer)
    with pytest.raises(ConfigError):
        make_buffer("tc", "v0")


def test_null_buffer_says_there_is_no_guarantee() -> None:
    b = NullBuffer()
    b.start()
    b.begin_epoch(1)
    b.release(5)
    c: dict[str, Any] = b.counters()
    assert c["guarantee"] is False and c["released_epoch"] == 0 and c["current_epoch"] == 1
    b.close()
