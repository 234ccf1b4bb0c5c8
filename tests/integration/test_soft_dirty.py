"""Protection with CRIU memory tracking (soft-dirty), end to end in the lab.

Runs only on kernels with soft-dirty. This project's CI kernel has none, so
tests/integration/test_vm_soft_dirty.py boots Debian's stock kernel in a VM
and runs this file (and the tracked variant of test_delta_criu) there.

Asserted: the primary runs in soft-dirty mode; CRIU copies (while the unit
is frozen) far fewer pages than the unit has; a power cut of the primary
loses no acknowledged write and the client's TCP connection carries on.
Timings are generous because the VM is emulated (no KVM), ~10x slower.
"""

from __future__ import annotations

from typing import Any

import pytest

from remus.checkpoint.tracking import kernel_soft_dirty
from tests.support.vm_powercut import BACKUP_TIMING, TIMING, protect_then_cut_power

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,  # a lab power cut at an emulated VM's pace
    pytest.mark.skipif(not kernel_soft_dirty(), reason="no soft-dirty on this kernel "
                       "(test_vm_soft_dirty runs this file in a VM that has it)"),
]


def test_tracked_protection_survives_a_power_cut(scenario: Any) -> None:
    sc = scenario(interval="100ms", extra_primary=["--dirty-tracking", "soft-dirty", *TIMING],
                  extra_backup=BACKUP_TIMING, status_timeout=30.0)

    def tracked(st: dict[str, Any]) -> None:
        assert st["dirty_tracking"] == "soft-dirty"
        checkpoint_pages = st["checkpoint_bytes"] / 4096
        # CRIU copies only the pages written since the last dump (measured on an idle
        # redis: ~55% of its pages per epoch; jemalloc touches a lot), never all of them
        assert st["dumped_pages"]["p50"] < 0.9 * checkpoint_pages, (st["dumped_pages"],
                                                                     checkpoint_pages)

    protect_then_cut_power(sc, tracked)
