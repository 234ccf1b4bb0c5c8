"""Human rendering of an agent's status (like `drbdadm status`): one glance."""

from __future__ import annotations

from typing import Any


def _ms(d: Any) -> str:
    if not isinstance(d, dict) or d.get("p50") is None:
        return "-"
    return f"{d['last']:.1f} / {d['p50']:.1f} / {d['p99']:.1f}"


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _split(d: Any) -> str:
    """freezing 1.2, memory 3.4, sockets 40.1 (1000 x 40 us), ... (ms)."""
    if not isinstance(d, dict) or not d:
        return "-"
    parts = [f"{k.removesuffix('_ms').replace('_', ' ')} {v:.1f}" for k, v in d.items()
             if k.endswith("_ms") and v is not None]
    if d.get("sockets"):
        parts = [p + (f" ({d['sockets']:.0f} x {d['us_per_socket']:.0f} us)"
                      if p.startswith("sockets ") else "") for p in parts]
    return ", ".join(parts) + " ms"


def render(s: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = [
        ("role", f"{s.get('role')}" + (f" ({s['state']})" if s.get("state") else "")),
        ("agent pid", str(s.get("pid"))),
        ("unit", f"{s.get('unit')}" + (f" (pid {s['unit_pid']})" if s.get("unit_pid") else "")),
        ("generation", str(s.get("generation"))),
        ("epoch / acked", f"{s.get('epoch')} / {s.get('acked_epoch')}"),
    ]
    if s.get("role") == "primary":
        nb = s.get("netbuf") or {}
        rows += [
            ("backup", f"{s.get('backup')} ({'connected' if s.get('connected') else 'DISCONNECTED'})"),
            ("interval", f"{s.get('interval_ms')} ms ({s.get('epochs_per_s')} epochs/s)"),
            ("pause ms last/p50/p99", _ms(s.get("pause_ms"))),
            ("pause split p50", _split(s.get("frozen_split"))),
            ("ack ms last/p50/p99", _ms(s.get("ack_latency_ms"))),
            ("bytes/epoch p50", _bytes((s.get("bytes_per_epoch") or {}).get("p50"))),
            ("checkpoint size", _bytes(s.get("checkpoint_bytes"))),
            ("bytes/s", _bytes(s.get("bytes_per_s")) + "/s"),
            ("output held", f"{nb.get('held_packets', 0)} pkts, {_bytes(nb.get('held_bytes', 0))}"),
            ("released / dropped", f"{nb.get('released_packets', 0)} / {nb.get('dropped_packets', 0)} pkts"),
            ("guarantee", "ON" if s.get("guarantee") else "OFF (--no-netbuf)"),
        ]
        disk = s.get("disk")
        if disk:
            rows.append(("disk last epoch", f"{disk.get('files_changed', 0)} files, "
                         f"{_bytes(disk.get('bytes', 0))}, capture {disk.get('capture_ms', 0):.1f} ms "
                         f"(frozen), rescans {disk.get('rescans', 0)}"))
    else:
        rows += [
            ("primary", str(s.get("primary") or "-")),
            ("since heartbeat", f"{s.get('since_heartbeat_ms')} ms (takeover after "
                                f"{s.get('takeover_timeout_ms')} ms)"),
            ("would resume epoch", str(s.get("resume_epoch"))),
            ("bytes/epoch p50", _bytes((s.get("bytes_per_epoch") or {}).get("p50"))),
            ("receive ms last/p50/p99", _ms(s.get("ack_latency_ms"))),
        ]
        prot = s.get("protection")
        if prot:  # the unit runs here since a takeover: its protection (remus.reprotect)
            link = "connected" if prot.get("connected") else "not connected"
            rows.append(("protection", f"{str(prot.get('state')).upper()}: backup "
                         f"{prot.get('backup')} ({link}), epoch {prot.get('epoch')} / acked "
                         f"{prot.get('acked_epoch')}"))
        fo = s.get("failover")
        if fo and fo.get("detected"):
            t0 = fo["detected"]
            steps = [f"{k} +{(v - t0) * 1000:.0f} ms" for k, v in fo.items()
                     if k not in ("detected", "unit_pid") and isinstance(v, int | float)]
            rows.append(("failover", "detected, " + ", ".join(steps)))
    pr = s.get("progress")
    if pr:
        pct = f" of {pr['total_bytes'] / 2**20:,.0f} MiB ({pr['percent']:.0f} %)" \
            if pr.get("total_bytes") else ""
        eta = f", ETA {pr['eta_s']:.0f} s" if pr.get("eta_s") is not None else ""
        rows.append(("progress", f"{pr['what']}: {pr['done_bytes'] / 2**20:,.0f} MiB{pct}, "
                                 f"{pr['bytes_per_s'] / 2**20:,.0f} MiB/s{eta}"))
    if s.get("store_problem"):
        rows.append(("PROBLEM", f"{s['store_problem']} (epochs are refused, output held)"))
    rows.append(("last", str(s.get("last"))))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)
