"""The backup's store on a small filesystem that fills up.

The backup refuses epochs (NACK, with the reason, in both agents' status)
instead of acknowledging what it could not keep; the primary holds the
service's output meanwhile (--on-peer-loss stall), keeps its link and
heartbeats (no false takeover), and retries with back-off. When space
returns, protection resumes by itself; a power cut of the primary after that
loses no acknowledged write (nothing committed before was damaged).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.support.timing import release_grace_s, wait_for

pytestmark = [pytest.mark.root, pytest.mark.slow]


def _problem(sc: Any) -> str:
    return str((sc.status("bak") or {}).get("store_problem") or "")


def test_a_full_backup_disk_holds_output_and_loses_nothing(scenario: Any) -> None:
    sc = scenario(server="redis")
    lab = sc.lab
    store = f"/var/lib/remus/{sc.unit}"
    lab.run("bak", ["mkdir", "-p", store], check=True)
    lab.run("bak", ["mount", "-t", "tmpfs", "-o", "size=96m", "remus-test-full", store],
            check=True)
    try:
        sc.start_backup()
        sc.start_primary()
        sc.wait_protected()
        client = sc.start_client(40, "c.json", pace=0.002, stall_timeout=60)
        time.sleep(2)
        before = sc.status("pri")
        assert before is not None
        acked_before = before["acked_epoch"]

        # Fill the filesystem (dd stops at ENOSPC).
        lab.run("bak", ["sh", "-c", f"dd if=/dev/zero of={store}/ballast bs=1M 2>/dev/null; true"],
                check=True, timeout=60)
        assert wait_for(lambda: "No space left" in _problem(sc), 30), sc.log_tail("backup.log")
        full_at = time.time()
        assert wait_for(lambda: "No space left" in str((sc.status("pri") or {}).get("last")),
                        10), sc.log_tail("primary.log")
        time.sleep(4)  # a few refusals and retries
        pri, bak = sc.status("pri"), sc.status("bak")
        assert pri is not None and bak is not None
        assert bak["state"] == "replicating", bak  # no takeover of a live primary
        assert pri["role"] == "primary" and pri["guarantee"] is True, pri
        refused_acked = pri["acked_epoch"]
        assert refused_acked >= acked_before

        lab.run("bak", ["rm", "-f", f"{store}/ballast"], check=True)
        freed_at = time.time()
        assert wait_for(lambda: _problem(sc) == "", 30), sc.log_tail("backup.log")
        assert wait_for(lambda: (sc.status("pri") or {}).get("acked_epoch", -1)
                        > refused_acked + 5, 30), sc.log_tail("primary.log")

        # Nothing committed before is damaged: the backup can take over.
        time.sleep(1)
        lab.crash("pri")
        res = sc.wait_client(client, "c.json", timeout=120)
        st = sc.status("bak")
        assert st is not None and st["state"] == "active", st
    finally:
        sc.stop_all()
        lab.run("bak", ["umount", "-l", store], check=False)
    assert res["connection_survived"], res["error"]
    assert res["verified"] and res["missing"] == 0 and res["wrong_values"] == 0, res
    # Output was held while the backup refused: no reply left between the refusal
    # (plus the release of epochs acknowledged before it) and the space coming back.
    grace = release_grace_s(before)
    held = [t for t in res["reply_times"] if full_at + grace < t < freed_at]
    assert not held, f"{len(held)} replies while the backup refused every epoch"
