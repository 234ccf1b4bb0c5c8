"""The short form of `make soak`: a few random power cuts through the same code,
random workloads included (redis, memcached, redis with an fsync'd AOF in a
state directory). The full run (>= 100 cuts) is committed in bench/results/soak.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from remus.soak import soak

pytestmark = [pytest.mark.root, pytest.mark.slow]


def test_a_few_random_power_cuts(lab: Any, tmp_path: Path) -> None:
    doc = soak(lab, tmp_path, cuts=4, seed=7)
    s = doc["summary"]["all"]
    why = json.dumps([{k: r.get(k) for k in ("cut", "workload", "mode", "failures", "error")}
                      for r in doc["runs"]])
    assert doc["failed_cuts"] == [], why
    assert s["lost"] == 0 and s["connections_kept"] == s["cuts"] == s["taken_over"] == 4, why
    assert s["acknowledged_writes"] > 0
