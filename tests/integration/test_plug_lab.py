"""`remus run --netbuf plug` end to end: protection and a power cut in the lab.

Runs only where the kernel has sch_plug (this project's CI kernel has none;
tests/integration/test_vm_soft_dirty.py runs this file in a VM with Debian's
kernel). Asserted: the primary's output buffer is the plug backend and it
releases output; a power cut of the primary loses no acknowledged write and
the client's TCP connection carries on.
"""

from __future__ import annotations

from typing import Any

import pytest

from remus.netbuf.plug import plug_available
from tests.support.vm_powercut import BACKUP_TIMING, TIMING, protect_then_cut_power

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,  # a lab power cut at an emulated VM's pace
    pytest.mark.skipif(not plug_available(), reason="no sch_plug on this kernel "
                       "(test_vm_soft_dirty runs this file in a VM that has it)"),
]


def test_plug_protection_survives_a_power_cut(scenario: Any) -> None:
    sc = scenario(interval="100ms", extra_primary=["--netbuf", "plug", *TIMING],
                  extra_backup=BACKUP_TIMING, status_timeout=30.0)

    def plugged(st: dict[str, Any]) -> None:
        nb = st["netbuf"]
        assert nb["backend"] == "plug" and nb["guarantee"], nb
        assert nb["released_packets"] > 0, nb

    protect_then_cut_power(sc, plugged)
