"""The soft-dirty path, on a kernel that has it: Debian's stock kernel in a VM.

This host's kernel has no soft-dirty, so the tracked tests skip here. This
test boots Debian's kernel (remus/vm.py: QEMU, the host's root shared
read-only, no disk image) and runs them there, where they must pass and
must not skip: the tracked variant of test_delta_criu (CRIU --track-mem
dumps -> encoder -> store -> restore) and test_soft_dirty (`remus run`
with --dirty-tracking soft-dirty in the lab, then a power cut). The same
kernel has sch_plug, which this host lacks too, so the plug output buffer's
tests (test_netbuf_plug, test_plug_lab) run there as well.
"""

from __future__ import annotations

import pytest

from remus.checkpoint.tracking import kernel_soft_dirty

pytestmark = [
    pytest.mark.root,
    pytest.mark.slow,
    pytest.mark.skipif(kernel_soft_dirty(), reason="this kernel has soft-dirty: the tracked "
                       "tests run natively"),
    pytest.mark.timeout(1800),
]

WANTED = [
    "tests/integration/test_delta_criu.py::test_deltas_of_real_dumps_restore[soft-dirty]",
    "tests/integration/test_soft_dirty.py::test_tracked_protection_survives_a_power_cut",
    "tests/integration/test_netbuf_plug.py::test_plug_holds_the_syn_ack_until_release",
    "tests/integration/test_netbuf_plug.py::test_plug_releases_epoch_by_epoch",
    "tests/integration/test_netbuf_plug.py::test_plug_hold_inbound_holds_packets_towards_the_unit",
    "tests/integration/test_netbuf_plug.py::test_plug_close_drops_held_output_and_removes_its_qdiscs",
    "tests/integration/test_plug_lab.py::test_plug_protection_survives_a_power_cut",
]


def test_tracked_tests_pass_on_a_soft_dirty_kernel() -> None:
    from remus.vm import VMToolsMissing, run_in_vm

    script = (".venv/bin/python -m remus.cli check\n"
              ".venv/bin/pytest -q -rA -p no:cacheprovider --timeout 900 "
              "tests/integration/test_delta_criu.py tests/integration/test_soft_dirty.py "
              "tests/integration/test_netbuf_plug.py tests/integration/test_plug_lab.py\n")
    try:
        rc, out = run_in_vm(script, timeout=1500)
    except VMToolsMissing as e:  # names the Debian packages apt-get could not install
        pytest.skip(str(e))
    assert "soft_dirty        | ok" in out, out[-3000:]
    for test in WANTED:
        assert f"PASSED {test}" in out, out[-6000:]
    assert rc == 0, out[-6000:]
