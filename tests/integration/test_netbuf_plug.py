"""The sch_plug output buffer against a real kernel that has sch_plug.

This project's CI kernel has no sch_plug, so these skip here;
tests/integration/test_vm_soft_dirty.py runs them in a VM with Debian's
kernel, where they must pass. Same namespaces and echo server as
test_netbuf.py (tests/support/netbuf.py); only what a user relies on is
asserted (what reaches the client and when), not the nfqueue backend's
counters.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator

import pytest

from remus.netbuf import PlugBuffer
from remus.netbuf.plug import plug_available
from tests.support import netbuf
from tests.support.netbuf import VETH, Echo, Lab, connected, recv_within, start_connect

lab = netbuf.lab  # the namespaces and the echo server (fixtures)
echo = netbuf.echo

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not plug_available(), reason="no sch_plug on this kernel "
                       "(test_vm_soft_dirty runs this file in a VM that has it)"),
]


@pytest.fixture
def pbuf(lab: Lab) -> Iterator[PlugBuffer]:
    b = PlugBuffer(VETH, netns=lab.host)
    b.start()  # output from now on belongs to epoch 0
    try:
        yield b
    finally:
        b.close(release_all=False)


def establish(lab: Lab, buf: PlugBuffer, epoch: int = 1) -> socket.socket:
    s = start_connect(lab)
    assert not connected(s, 0.3), "SYN-ACK left before release"
    buf.begin_epoch(epoch)
    buf.release(epoch - 1)
    assert connected(s, 2.0)
    s.setblocking(True)
    return s


def qdiscs(lab: Lab) -> str:
    return subprocess.run(["nsenter", f"--net={lab.host}", "tc", "qdisc", "show"],
                          capture_output=True, text=True, check=True).stdout


def test_plug_holds_the_syn_ack_until_release(lab: Lab, pbuf: PlugBuffer, echo: Echo) -> None:
    assert "plug" in qdiscs(lab)
    s = start_connect(lab)
    assert not connected(s, 0.6), "SYN-ACK left before release"
    pbuf.begin_epoch(1)
    pbuf.release(0)
    assert connected(s, 2.0)
    s.close()


def test_plug_releases_epoch_by_epoch(lab: Lab, pbuf: PlugBuffer, echo: Echo) -> None:
    s = establish(lab, pbuf)  # now in epoch 1
    s.sendall(b"a")
    time.sleep(0.3)  # the echo of "a" is produced (and held) in epoch 1
    pbuf.begin_epoch(2)
    s.sendall(b"b")
    time.sleep(0.3)  # echo of "b": epoch 2
    assert recv_within(s, 0.3) == b"", "output left before its epoch was released"
    pbuf.release(1)
    assert recv_within(s, 0.5) == b"a"
    pbuf.begin_epoch(3)
    assert recv_within(s, 0.4) == b"", "epoch 2 output left with release(1)"
    pbuf.release(2)
    assert recv_within(s, 1.0) == b"b"
    s.close()


def test_plug_hold_inbound_holds_packets_towards_the_unit(lab: Lab, pbuf: PlugBuffer,
                                                          echo: Echo) -> None:
    s = establish(lab, pbuf)
    assert netbuf.send_while_held(s, pbuf, b"c", range(2, 6)) == b""
    assert netbuf.unhold_and_receive(s, pbuf, 6) == b"c"
    s.close()


def test_plug_close_drops_held_output_and_removes_its_qdiscs(lab: Lab, echo: Echo) -> None:
    b = PlugBuffer(VETH, netns=lab.host)
    b.start()
    s = start_connect(lab)
    assert not connected(s, 0.3)
    b.close(release_all=False)
    assert "plug" not in qdiscs(lab)
    # the held SYN-ACK was dropped, not released; the client's SYN retransmission
    # (after ~1 s) is answered directly
    assert connected(s, 3.0)
    s.close()
