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

import time
from collections.abc import Callable
from typing import Any

import pytest

from remus.checkpoint.tracking import kernel_soft_dirty

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(not kernel_soft_dirty(), reason="no soft-dirty on this kernel "
                       "(test_vm_soft_dirty runs this file in a VM that has it)"),
]

TIMING = ["--heartbeat", "100ms", "--lease", "1500ms", "--takeover-timeout", "2s"]
BACKUP_TIMING = ["--takeover-timeout", "2s", "--heartbeat", "100ms"]


def protect_then_cut_power(sc: Any, check_running: Callable[[dict[str, Any]], None]) -> None:
    """Backup, then primary; a client for 12 s; `check_running(status)` after 6 s;
    then a power cut of the primary: the backup must take over and the client's
    connection go on with every acknowledged write intact. Emulated-VM timings."""
    sc.start_backup()
    time.sleep(0.5)
    sc.start_primary()
    started = sc.wait_protected(timeout=120, min_acked=5)
    client = sc.start_client(12.0, "client.json", stall_timeout=30)
    time.sleep(6.0)
    st = sc.status("pri")
    assert st is not None
    check_running(st)
    # protection goes on under the client's load (how fast is the bench's business)
    assert st["acked_epoch"] > started["acked_epoch"], (started["acked_epoch"], st)

    crash_at = time.time()
    sc.lab.crash("pri")
    deadline = time.monotonic() + 60
    bak: dict[str, Any] | None = None
    while time.monotonic() < deadline:
        bak = sc.status("bak")
        if bak and bak.get("state") in ("active", "failed"):
            break
        time.sleep(0.2)
    assert bak is not None and bak.get("state") == "active", (
        f"{bak}\n{sc.log_tail('backup.log', 120)}\n{sc.log_tail('primary.log', 30)}")
    res = sc.wait_client(client, "client.json", timeout=120)
    assert res["error"] is None, res
    assert res["connection_survived"], res
    assert res["missing"] == 0 and res["wrong_values"] == 0, res
    # (emulated, every reply waits for a ~0.3 s commit: few requests, but they go on)
    assert any(t < crash_at for t in res["reply_times"]), "no reply before the power cut"
    assert any(t > crash_at for t in res["reply_times"]), "no reply after the power cut"


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
