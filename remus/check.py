"""`remus check`: what this host can do, and what remus does about what it cannot.

run_checks() runs every probe (remus.check_probes) concurrently; the whole
check takes well under 2 s. The report and its pure logic (consequences,
blockers, warnings, rendering) are remus.check_report.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import click

from remus import cgroup
from remus.check_probes import (
    NETNS_PROBES,
    probe_criu,
    probe_freezer,
    probe_in_netns,
    probe_namespace,
    probe_page_encoder,
    probe_pagemap_scan,
    probe_root,
    probe_soft_dirty,
    probe_tcp_repair,
    probe_tmpfs_run,
    probe_uffd_wp,
    probe_userfaultfd,
)
from remus.check_report import FEATURES, CheckReport, Feature, build_report, feature
from remus.paths import criu_source

log = logging.getLogger(__name__)


def _safe(name: str, probe: Any, *args: Any) -> Feature:
    """A probe that crashes reports its feature as missing instead of aborting the check."""
    try:
        result: Feature = probe(*args)
        return result
    except Exception as e:  # any probe failure is a finding, not a crash
        log.debug("probe %s failed", name, exc_info=True)
        return feature(name, "missing", f"probe failed: {type(e).__name__}: {e}")


def run_checks(criu_path: str | None = None) -> CheckReport:
    """Probe this host. Never raises for a missing capability: it becomes a finding."""
    explicit = criu_path is not None
    path, source = (criu_path, "--criu") if explicit else criu_source()
    probes: list[tuple[str, Any, tuple[Any, ...]]] = [
        ("root", probe_root, ()),
        ("userfaultfd", probe_userfaultfd, ()),
        *((n, probe_in_netns, (n,)) for n in NETNS_PROBES),
        ("cgroup_freezer_v1", probe_freezer, (1,)),
        ("cgroup_freezer_v2", probe_freezer, (2,)),
        ("netns", probe_namespace, ("net",)),
        ("pidns", probe_namespace, ("pid",)),
        ("tcp_repair", probe_tcp_repair, ()),
        ("tmpfs_run", probe_tmpfs_run, ()),
        ("pagemap_scan", probe_pagemap_scan, ()),
        ("page_encoder", probe_page_encoder, ()),
    ]
    with ThreadPoolExecutor(8) as pool:
        criu_future = pool.submit(probe_criu, path, explicit)
        futures = {n: pool.submit(_safe, n, p, *a) for n, p, a in probes}
        criu, criu_soft_dirty = criu_future.result()
        criu = dataclasses.replace(criu, source=source)
        found = {n: f.result() for n, f in futures.items()}
    found["soft_dirty"] = _safe("soft_dirty", probe_soft_dirty, criu_soft_dirty)
    found["uffd_wp"] = _safe("uffd_wp", probe_uffd_wp, criu)
    features = {n: found[n] for n in FEATURES}
    pure_v2 = cgroup.is_v2()
    report = build_report(criu, features, platform.release(), pure_v2=pure_v2)
    log.debug("host check: can_run=%s blockers=%s", report.can_run, report.blockers)
    return report


# -- CLI ----------------------------------------------------------------------------


@click.command("check")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--criu", "criu_path", metavar="PATH", help="CRIU binary to check.")
def check_cmd(as_json: bool, criu_path: str | None) -> None:
    """Report what this host can do; exit 1 when remus cannot run here."""
    report = run_checks(criu_path)
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2))
    else:
        click.echo(report.format_table())
    if not report.can_run:
        for blocker in report.blockers:
            click.echo(f"remus check: blocker: {blocker}", err=True)
        click.get_current_context().exit(1)
