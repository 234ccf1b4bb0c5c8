"""remus check against the real kernel of this workplace (root)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from remus.check import check_cmd, run_checks
from remus.check_probes import PROBE_TIMEOUT
from remus.check_report import FEATURES
from remus.paths import REPO

pytestmark = pytest.mark.root


def leftover_probe_cgroups() -> list[Path]:
    roots = [Path("/sys/fs/cgroup/freezer"), Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup")]
    return [p for r in roots if r.is_dir() for p in r.rglob("remus-check-*")]


def host_rules() -> str:
    return subprocess.run(["iptables", "-S"], capture_output=True, text=True, check=True).stdout


def test_this_machine() -> None:
    before = host_rules()
    start = time.monotonic()
    r = run_checks()
    elapsed = time.monotonic() - start
    # A hang bound, not a speed: a probe that ran into its own time-out took this long.
    assert elapsed < PROBE_TIMEOUT, f"check took {elapsed:.2f} s: a probe timed out?"
    assert r.criu.ok and r.criu.version == "4.2.1", r.criu
    assert r.criu.check_output.startswith("Looks good")
    f = {n: r.features[n] for n in FEATURES}
    assert f["root"].ok
    assert f["soft_dirty"].status == "missing"
    # kernel 6.18 and our CRIU: uffd-wp tracking stands in for soft-dirty
    assert f["uffd_wp"].ok, f["uffd_wp"].detail
    assert "auto uses uffd-wp" in f["uffd_wp"].consequence
    assert f["nfqueue"].ok and f["xt_cgroup"].ok
    assert f["sch_plug"].status == "missing" and f["sch_plug"].consequence == (
        "output buffer uses NFQUEUE"
    )
    assert f["userfaultfd"].ok
    assert f["cgroup_freezer_v1"].ok
    assert f["netns"].ok and f["pidns"].ok and f["tcp_repair"].ok
    assert f["tmpfs_run"].status == "degraded"  # /run is ext4 here
    assert r.can_run and r.blockers == []
    assert {w.split()[0] for w in r.warnings} >= {"sch_plug", "tmpfs_run"}
    # probes leave nothing behind on the host
    assert leftover_probe_cgroups() == []
    assert "--queue-num 9" not in host_rules() or "--queue-num 9" in before


def test_explicit_missing_criu_is_a_blocker_not_an_exception() -> None:
    r = run_checks("/nonexistent/criu")
    assert not r.can_run and not r.criu.ok
    assert "CRIU not found at /nonexistent/criu" in r.blockers


def test_cli_nonexistent_criu() -> None:
    res = CliRunner().invoke(check_cmd, ["--criu", "/nonexistent"])
    assert res.exit_code == 1
    assert "remus check: blocker: CRIU not found at /nonexistent" in res.stderr.splitlines()
    assert "Can run: NO" in res.stdout


def test_cli_table_exit_zero() -> None:
    res = CliRunner().invoke(check_cmd, [])
    assert res.exit_code == 0, res.output
    assert "| soft_dirty " in res.stdout and "Can run: yes" in res.stdout
    assert res.stderr == ""


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    code = "from remus.check import check_cmd; check_cmd()"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=REPO, timeout=30
    )


def test_subprocess_json() -> None:
    p = run_cli("--json")
    assert p.returncode == 0, p.stderr
    j = json.loads(p.stdout)
    assert j["can_run"] is True and j["criu"]["ok"] is True and j["criu"]["version"] == "4.2.1"
    assert j["features"]["soft_dirty"] is False and j["features"]["nfqueue"] is True
    assert j["features"]["sch_plug"] is False and j["features"]["xt_cgroup"] is True
    assert j["details"]["soft_dirty"]["status"] == "missing"
    assert j["kernel"] == Path("/proc/sys/kernel/osrelease").read_text().strip()


def test_subprocess_json_nonexistent_criu() -> None:
    p = run_cli("--json", "--criu", "/nonexistent")
    assert p.returncode == 1
    assert json.loads(p.stdout)["can_run"] is False
    assert p.stderr.strip().splitlines() == ["remus check: blocker: CRIU not found at /nonexistent"]
