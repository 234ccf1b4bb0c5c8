"""Waiting on, and reporting, the agents of a pair across role changes."""

from __future__ import annotations

import time
from typing import Any

from remus.scenario import Scenario


def wait(what: str, fn: Any, timeout: float, sc: Scenario) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.1)
    raise AssertionError(f"{what}: not within {timeout:.0f} s (last {last!r})\n{logs(sc)}")


def logs(sc: Scenario) -> str:
    names = sorted(p.name for p in sc.workdir.glob("*.log"))
    return "\n".join(sc.log_tail(n, 40) for n in names)


def active_on(sc: Scenario, host: str) -> dict[str, Any] | None:
    st = sc.status(host)
    return st if st and st.get("state") == "active" else None


def protected_from(sc: Scenario, host: str, past: int = 2) -> dict[str, Any] | None:
    """The re-protection on `host` once it acked more than `past` epochs."""
    st = sc.primary_status(host)
    ok = st and st.get("state") == "protected" and st.get("acked_epoch", -1) > past
    return st if ok else None
