"""Who owns a dump when CRIU fails (remus.primary.Primary._checkpoint_once).

Once CRIU's post-dump notification ran through, every image is written: the
dump goes to the sender whether CRIU then fails in its clean-up or not, at
light load (handed over inside post-dump) and under load (handed over once
CRIU has exited). A dump that failed before is deleted. CRIU itself is
scripted here (only the order of its notifications matters); the rest is the
real Primary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from remus.config import Timing
from remus.errors import CheckpointError
from remus.primary import BUSY_EARLY_MAX_PAGES, BUSY_IDLE_MIN, BUSY_PAUSE_MS, Primary
from remus.primary_config import PrimaryConfig


class ScriptedCriu:
    """dump(): the notifications in `scripts`, then success or `fail`."""

    def __init__(self, scripts: list[str], fail: bool) -> None:
        self.scripts, self.fail = scripts, fail
        self.after_scripts: Any = None  # called once the notifications ran

    def dump(self, pid: int, d: Path, *, notify: Any, **_: Any) -> Any:
        d.mkdir(parents=True, exist_ok=True)
        (d / "pages-1.img").write_bytes(b"")
        for s in self.scripts:
            notify(s)
        if self.after_scripts is not None:
            self.after_scripts()
        if self.fail:
            raise CheckpointError("CRIU dump failed: scripted")
        raise AssertionError("not used: the tests below only fail")


class Buffer:
    def __init__(self) -> None:
        self.calls: list[Any] = []

    def hold_inbound(self, on: bool) -> None:
        self.calls.append(("hold", on))

    def begin_epoch(self, e: int) -> None:
        self.calls.append(("begin", e))


class Idle:
    """The idle share of the CPU the primary sees for the last epoch."""

    def __init__(self, share: float | None) -> None:
        self.value = share

    def share(self) -> float | None:
        return self.value


def _primary(tmp_path: Path, criu: ScriptedCriu, busy: bool, idle: float | None = 0.5) -> Primary:
    cfg = PrimaryConfig(unit_id="u", spec={}, backup=("127.0.0.1", 1), psk=b"k" * 32,
                        timing=Timing(), pid=os.getpid(), netns_path=None,
                        dump_root=tmp_path / "dumps", dirty_tracking="diff")
    p = Primary(cfg, Buffer(), criu=criu)  # type: ignore[arg-type]
    p.need_full = True  # no prelude (early encoding) in these tests
    p.pause.add(BUSY_PAUSE_MS + 10 if busy else 5.0)
    p.idle_meter = Idle(idle)  # type: ignore[assignment]
    return p


@pytest.mark.parametrize(("busy", "idle", "at_post_dump"), [
    (False, 0.0, True),  # light load: always as soon as the images are complete
    (True, BUSY_IDLE_MIN + 0.05, True),  # under load with an idle core: the same
    (True, BUSY_IDLE_MIN - 0.05, False),  # under load, saturated: once CRIU exited
    (True, None, False),  # no idle figure yet: as saturated
], ids=["light", "busy-idle", "busy-saturated", "busy-unknown"])
@pytest.mark.parametrize("big", [False, True], ids=["small", "big-dump"])
def test_when_the_sender_gets_the_dump(tmp_path: Path, busy: bool, idle: float | None,
                                       at_post_dump: bool, big: bool) -> None:
    criu = ScriptedCriu(["pre-dump", "post-dump"], fail=True)
    p = _primary(tmp_path, criu, busy, idle)
    if big:  # the last dump wrote more than the early path takes under load
        p.dumped_pages.add(BUSY_EARLY_MAX_PAGES + 1.0)
        at_post_dump = at_post_dump and not busy
    seen: list[int] = []
    criu.after_scripts = lambda: seen.append(p.sendq.qsize())
    p._checkpoint_once()
    assert seen == [1 if at_post_dump else 0]
    assert p.sendq.qsize() == 1  # handed over in the end either way (complete dump)


@pytest.mark.parametrize("busy", [False, True], ids=["light", "busy"])
def test_a_dump_complete_at_post_dump_is_sent_when_criu_fails_after(
        tmp_path: Path, busy: bool) -> None:
    p = _primary(tmp_path, ScriptedCriu(["pre-dump", "post-dump"], fail=True), busy)
    assert p._checkpoint_once() == 0.0
    e, d, _, _ = p.sendq.get_nowait()
    assert e == 0 and d.is_dir(), "the complete dump must be sent, not deleted"
    assert p.epoch == 1  # its output was cut: the next epoch is 1
    assert ("hold", False) in p.buffer.calls


@pytest.mark.parametrize("busy", [False, True], ids=["light", "busy"])
def test_a_dump_that_failed_before_post_dump_is_deleted(tmp_path: Path, busy: bool) -> None:
    p = _primary(tmp_path, ScriptedCriu(["pre-dump"], fail=True), busy)
    assert p._checkpoint_once() == 0.0
    assert p.sendq.empty()
    assert not (tmp_path / "dumps" / "e0").exists()
    assert p.epoch == 0
