"""Prometheus metrics of an agent (`--metrics ADDR:PORT`, off by default).

One collector per agent reads the agent's state at each scrape (the same
snapshot `remus status` shows, plus the latency histograms), so nothing is
counted twice and an idle agent costs nothing between scrapes. Names follow
Prometheus' conventions: `remus_` prefix, base units in the name (seconds,
bytes), `_total` for counters. docs/metrics.md lists them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from remus.errors import ConfigError
from remus.roles import B, P
from remus.stats import Series

log = logging.getLogger(__name__)


def _gauge(name: str, doc: str, value: float | None, labels: dict[str, str] | None = None
           ) -> Metric:
    g = GaugeMetricFamily(name, doc, labels=list(labels or {}))
    if value is not None:
        g.add_metric(list((labels or {}).values()), float(value))
    return g


def _counter(name: str, doc: str, value: float) -> Metric:
    return CounterMetricFamily(name, doc, value=float(value))


def _histogram(name: str, doc: str, s: Series) -> Metric:
    """A Series in ms as a histogram in seconds."""
    h = HistogramMetricFamily(name, doc)
    buckets = [(("+Inf" if b == float("inf") else repr(b / 1000)), n) for b, n in s.histogram()]
    h.add_metric([], buckets, s.total / 1000)
    return h


def _states(name: str, doc: str, current: str, all_states: list[str]) -> Metric:
    """One series per state, 1 for the current one (an enum, Prometheus style)."""
    g = GaugeMetricFamily(name, doc, labels=["state"])
    for st in all_states:
        g.add_metric([st], 1.0 if st == current else 0.0)
    return g


class AgentCollector(Collector):
    """The metrics of whatever agent this process is now: `agent` is switched
    when a role changes (a fenced primary serving on as the backup)."""

    def __init__(self, agent: Any = None) -> None:
        self.agent = agent

    def collect(self) -> Iterator[Metric]:
        a = self.agent
        if a is None:
            return
        yield from (_primary(a) if hasattr(a, "pause") else _backup(a))


def _identity(st: dict[str, Any], role: str, state_metric: str, states: type[P] | type[B],
              whose: str, **labels: str) -> Iterator[Metric]:
    """What both roles start with: remus_info, the state enum, the generation."""
    info = InfoMetricFamily("remus", "What this agent is")
    info.add_metric([], {"role": role, "unit": str(st["unit"] or ""), **labels})
    yield info
    yield _states(state_metric, f"The {role}'s HA state (docs/roles.md)",
                  st["state"], [s.value for s in states])
    yield _gauge("remus_generation", f"Generation (term) {whose}", st["generation"])


def _primary(p: Any) -> Iterator[Metric]:
    st = p.status()
    nb = st.get("netbuf") or {}
    yield from _identity(st, "primary", "remus_primary_state", P, "of the replication stream",
                         backup=str(st["backup"]), dirty_tracking=str(st["dirty_tracking"]))
    yield _gauge("remus_epoch", "Newest checkpoint taken", st["epoch"])
    yield _gauge("remus_acked_epoch", "Newest checkpoint the backup acknowledged",
                 st["acked_epoch"])
    yield _gauge("remus_lag_epochs", "Checkpoints taken but not acknowledged",
                 max(0, st["epoch"] - st["acked_epoch"]) if st["acked_epoch"] >= 0 else None)
    yield _gauge("remus_interval_seconds", "Epoch length", st["interval_ms"] / 1000)
    yield _gauge("remus_protected", "1 while the backup acknowledges checkpoints",
                 1 if st["protected"] else 0)
    yield _gauge("remus_output_commit", "1 while output waits for the backup's ACK "
                 "(the guarantee holds)", 1 if st["guarantee"] else 0)
    yield _histogram("remus_pause_seconds", "Unit frozen per checkpoint", p.pause)
    yield _histogram("remus_ack_latency_seconds", "Epoch sent to its ACK", p.ack_latency)
    yield _histogram("remus_commit_latency_seconds",
                     "Epoch boundary to its output released", p.commit_latency)
    yield _gauge("remus_epoch_bytes", "Bytes sent for the last epoch", p.delta_bytes.last)
    yield _counter("remus_sent_bytes", "Checkpoint bytes sent", p.bytes_total)
    yield _counter("remus_epochs_acked", "Epochs acknowledged", p.epochs_done)
    yield _gauge("remus_output_held_packets", "Packets held in the output buffer now",
                 nb.get("held_packets", nb.get("held")))
    yield _counter("remus_output_released_packets", "Packets released after an ACK",
                   nb.get("released_packets", 0))
    yield _counter("remus_output_dropped_packets", "Packets dropped (a lost epoch, a "
                   "full buffer)", nb.get("dropped_packets", 0))
    yield from _progress(st)


def _backup(b: Any) -> Iterator[Metric]:
    st = b.status()
    yield from _identity(st, "backup", "remus_backup_state", B, "of the committed checkpoint")
    yield _gauge("remus_committed_epoch", "Newest committed checkpoint", st["epoch"])
    yield _gauge("remus_since_heartbeat_seconds", "Since the primary was last heard",
                 st["since_heartbeat_ms"] / 1000)
    yield _histogram("remus_receive_seconds", "Epoch begin to its ACK sent", b.ack_time)
    yield _gauge("remus_epoch_bytes", "Bytes received for the last epoch",
                 b.epoch_bytes.last)
    yield _counter("remus_epochs_received", "Epochs acknowledged", st["epochs_received"])
    yield _counter("remus_epochs_rejected", "Epochs refused (NACK)", st["epochs_rejected"])
    yield _gauge("remus_store_problem", "1 while the store cannot hold checkpoints "
                 "(epochs are refused)", 1 if st.get("store_problem") else 0)
    fo = st.get("failover") or {}
    yield _counter("remus_failovers", "Takeovers by this agent", 1 if fo else 0)
    dur = (fo["address_up"] - fo["detected"]) if "address_up" in fo and "detected" in fo \
        else None
    yield _gauge("remus_last_failover_seconds", "Last takeover: detected to address up",
                 dur)
    yield from _progress(st)


def _progress(st: dict[str, Any]) -> Iterator[Metric]:
    """A full checkpoint (first, or a resync) on the wire; absent otherwise."""
    pr = st.get("progress") or {}
    yield _gauge("remus_full_checkpoint_bytes", "Size of the full checkpoint in transfer "
                 "(the primary's page files; absent on the backup until it ends)",
                 pr.get("total_bytes"))
    yield _gauge("remus_full_checkpoint_done_bytes", "Bytes of it sent or received so far",
                 pr.get("done_bytes"))
    yield _gauge("remus_full_checkpoint_eta_seconds", "Estimated time left (primary)",
                 pr.get("eta_s"))


def serve(addr: tuple[str, int] | None, collector: AgentCollector) -> CollectorRegistry | None:
    """Serve /metrics on addr (None: off). The registry holds only this agent's
    collector (no process/GC metrics of the interpreter, which say nothing of HA)."""
    if addr is None:
        return None
    reg = CollectorRegistry(auto_describe=False)
    reg.register(collector)
    try:
        start_http_server(addr[1], addr=addr[0], registry=reg)
    except OSError as e:
        raise ConfigError(f"--metrics {addr[0]}:{addr[1]}: cannot listen: {e.strerror or e}"
                          ) from e
    log.info("metrics on http://%s:%d/metrics", *addr)
    return reg
