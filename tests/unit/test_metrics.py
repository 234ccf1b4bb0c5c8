"""Histograms behind the metrics, and the metrics server's refusals."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from remus.errors import ConfigError
from remus.metrics import AgentCollector, _histogram, serve
from remus.stats import MS_BUCKETS, Series


def test_series_histogram_is_cumulative_over_every_sample() -> None:
    s = Series(window=3, bounds=(1.0, 10.0))
    for x in (0.5, 1.0, 5.0, 50.0, 60.0):
        s.add(x)
    assert s.histogram() == [(1.0, 2), (10.0, 3), (float("inf"), 5)]  # not only the window
    assert Series().histogram() == [(float("inf"), 0)]


def test_histogram_in_seconds() -> None:
    s = Series(bounds=MS_BUCKETS)
    for ms in (3.0, 30.0, 300.0):
        s.add(ms)
    reg = CollectorRegistry()

    class One(AgentCollector):
        def collect(self):  # type: ignore[no-untyped-def]
            yield _histogram("remus_pause_seconds", "x", s)

    reg.register(One())
    text = generate_latest(reg).decode()
    assert 'remus_pause_seconds_bucket{le="0.005"} 1.0' in text
    assert 'remus_pause_seconds_bucket{le="0.05"} 2.0' in text
    assert 'remus_pause_seconds_bucket{le="+Inf"} 3.0' in text
    assert "remus_pause_seconds_sum 0.333" in text


def test_metrics_off_by_default_and_a_busy_port_is_refused() -> None:
    assert serve(None, AgentCollector()) is None
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--metrics 127.0.0.1:{port}: cannot listen"):
            serve(("127.0.0.1", port), AgentCollector())


def test_the_dashboard_queries_only_metrics_the_agents_serve() -> None:
    import json
    import re

    from remus.paths import REPO

    dash = json.loads((REPO / "docs" / "grafana" / "remus-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|count|sum|total)$", "", n)
            for e in exprs for n in re.findall(r"remus_[a-z_]+", e)}
    served = set(re.findall(r'"(remus_[a-z_]+)"', (REPO / "remus" / "metrics.py").read_text()))
    assert used and used <= served, used - served
