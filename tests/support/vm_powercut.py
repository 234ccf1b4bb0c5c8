"""Protection, then a power cut of the primary, at an emulated VM's pace.

For the tests that run only inside tests/integration/test_vm_soft_dirty.py's
VM (Debian's kernel, no KVM: ~10x slower): test_soft_dirty (memory tracking
with soft-dirty) and test_plug_lab (the sch_plug output buffer).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from remus.powercut import wait_backup_state
from tests.support.timing import wait_for

TIMING = ["--heartbeat", "100ms", "--lease", "1500ms", "--takeover-timeout", "2s"]
BACKUP_TIMING = ["--takeover-timeout", "2s", "--heartbeat", "100ms"]


def protect_then_cut_power(sc: Any, check_running: Callable[[dict[str, Any]], None]) -> None:
    """Backup, then primary; a client for 12 s; `check_running(status)` after 6 s;
    then a power cut of the primary: the backup must take over and the client's
    connection go on with every acknowledged write intact. Emulated-VM timings."""
    sc.start_backup()
    wait_for(lambda: sc.status("bak"), timeout=120)  # the backup is up (a hang bound)
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
    bak = wait_backup_state(sc, {"active", "failed"}, timeout=60)
    assert bak is not None and bak.get("state") == "active", (
        f"{bak}\n{sc.log_tail('backup.log', 120)}\n{sc.log_tail('primary.log', 30)}")
    res = sc.wait_client(client, "client.json", timeout=120)
    assert res["error"] is None, res
    assert res["connection_survived"], res
    assert res["missing"] == 0 and res["wrong_values"] == 0, res
    # (emulated, every reply waits for a ~0.3 s commit: few requests, but they go on)
    assert any(t < crash_at for t in res["reply_times"]), "no reply before the power cut"
    assert any(t > crash_at for t in res["reply_times"]), "no reply after the power cut"
