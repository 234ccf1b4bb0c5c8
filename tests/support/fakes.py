"""Stand-ins for driving a Backup's handlers without a primary: its link, a
primary's HELLO, a completed epoch (test_backup_instance, test_backup_standby);
and a coordinator store in memory (the rules above the store only)."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

from remus.backup import Backup
from remus.coordinator import Coordinator, UnitRecord
from remus.protocol import messages as m


class FakeLink:
    peer = "10.0.0.1:1234"

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.conn = SimpleNamespace(our_nonce=b"n" * 32, sealed_with=b"k" * 32)

    def send(self, msg: Any) -> None:
        self.sent.append(msg)


def hello(instance: str | None, generation: int) -> m.Hello:
    spec: dict[str, Any] = {"name": "kv"} | ({"instance": instance} if instance else {})
    return m.Hello(version=m.PROTOCOL_VERSION, unit_id="kv", generation=generation,
                   nonce=b"x" * 32, spec=spec)


def commit(b: Backup, generation: int, epoch: int) -> None:
    b.staged = SimpleNamespace(commit=lambda: None)  # type: ignore[assignment]
    b._on_complete(FakeLink(), SimpleNamespace(ok=True, generation=generation, epoch=epoch))  # type: ignore[arg-type]


class MemoryStore(Coordinator):
    """The contract of Coordinator in memory (for the pure logic above it only)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.recs: dict[str, tuple[UnitRecord, int]] = {}

    def read(self, unit: str) -> tuple[UnitRecord | None, int]:
        with self.lock:
            rec, v = self.recs.get(unit, (None, -1))
            return rec, v

    def create(self, unit: str, rec: UnitRecord) -> bool:
        with self.lock:
            if unit in self.recs:
                return False
            self.recs[unit] = (rec, 0)
            return True

    def cas(self, unit: str, rec: UnitRecord, version: int) -> bool:
        with self.lock:
            if self.recs.get(unit, (None, -1))[1] != version:
                return False
            self.recs[unit] = (rec, version + 1)
            return True
