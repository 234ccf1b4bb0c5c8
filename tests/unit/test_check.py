"""Pure parts of remus.check_report and remus.check_probes: versions, consequences,
blockers, rendering."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from remus.check_probes import _summary, probe_criu
from remus.check_report import (
    FEATURES,
    CheckReport,
    CriuInfo,
    Feature,
    Status,
    build_report,
    feature,
    parse_criu_version,
    version_at_least,
)

GOOD_CRIU = CriuInfo("/opt/criu", "4.2.1", True, "Looks good.")


def features(**statuses: Status) -> dict[str, Feature]:
    """Every feature ok, except those given."""
    return {n: feature(n, statuses.get(n, "ok"), f"{n} probe said so") for n in FEATURES}


# this workplace's host, as hand-built probe results
HERE: dict[str, Status] = {"soft_dirty": "missing", "sch_plug": "missing", "tmpfs_run": "degraded"}


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Version: 4.2.1\n", (4, 2, 1)),
        ("Version: 4.2\nGitID: v4.2-12-gabcdef\n", (4, 2)),
        ("Version: 3.17.1\n", (3, 17, 1)),
        ("criu: command not found", None),
        ("", None),
    ],
)
def test_parse_criu_version(text: str, expected: tuple[int, ...] | None) -> None:
    assert parse_criu_version(text) == expected


@pytest.mark.parametrize(
    ("version", "ok"),
    [((4, 2, 1), True), ((4, 2), True), ((4, 10), True), ((5,), True), ((4, 1, 1), False),
     ((3, 17, 1), False), ((4,), False)],
)  # fmt: skip
def test_version_at_least(version: tuple[int, ...], ok: bool) -> None:
    assert version_at_least(version, (4, 2)) is ok


def test_feature_ok_follows_status() -> None:
    assert feature("x", "ok", "").ok
    assert not feature("x", "missing", "").ok
    assert not feature("x", "degraded", "").ok


def test_this_hosts_profile_can_run_with_warnings() -> None:
    r = build_report(GOOD_CRIU, features(**HERE), "6.18.0")
    assert r.can_run and r.blockers == []
    warned = {w.split()[0] for w in r.warnings}
    # no soft-dirty, but uffd-wp tracking: nothing to warn about memory tracking
    assert warned == {"sch_plug", "tmpfs_run"}
    assert "auto uses uffd-wp" in r.features["uffd_wp"].consequence
    assert "uffd-wp" in r.features["soft_dirty"].consequence
    assert r.features["sch_plug"].consequence == "output buffer uses NFQUEUE"
    assert "output buffer uses NFQUEUE" in r.features["nfqueue"].consequence
    assert "30 ms" in r.features["tmpfs_run"].consequence


def test_no_memory_tracker_is_one_warning() -> None:
    r = build_report(GOOD_CRIU, features(**HERE, uffd_wp="missing"), "6.18.0")
    assert r.can_run
    tracking = [w for w in r.warnings if w.split()[0] in ("soft_dirty", "uffd_wp")]
    assert len(tracking) == 1 and "page-content diff" in tracking[0]
    r = build_report(GOOD_CRIU, features(uffd_wp="missing"), "6.18.0")
    assert "auto uses soft-dirty" in r.features["soft_dirty"].consequence
    assert not any(w.startswith("uffd_wp") for w in r.warnings)


def test_every_feature_gets_a_consequence() -> None:
    for statuses in ({}, {n: "missing" for n in FEATURES}):
        r = build_report(GOOD_CRIU, features(**statuses), "6.18.0")  # type: ignore[arg-type]
        assert all(f.consequence for f in r.features.values())


@pytest.mark.parametrize(
    ("missing", "needle"),
    [
        (["root"], "not running as root"),
        (["netns"], "no network namespaces"),
        (["pidns"], "no PID namespaces"),
        (["tcp_repair"], "no TCP repair"),
        (["nfqueue", "sch_plug"], "no output buffer"),
        (["cgroup_freezer_v1", "cgroup_freezer_v2"], "no cgroup freezer"),
    ],
)
def test_blockers(missing: list[str], needle: str) -> None:
    r = build_report(GOOD_CRIU, features(**{n: "missing" for n in missing}), "6.18.0")  # type: ignore[arg-type]
    assert not r.can_run
    assert len(r.blockers) == 1 and needle in r.blockers[0]
    # a blocker is not repeated as a warning
    assert not any(w.split()[0] in missing for w in r.warnings)


def test_blocker_carries_probe_detail() -> None:
    r = build_report(GOOD_CRIU, features(root="missing"), "6.18.0")
    assert r.blockers == ["not running as root: root probe said so"]


@pytest.mark.parametrize(
    ("missing", "warned"),
    [
        ("nfqueue", "output buffer uses sch_plug"),
        ("sch_plug", "output buffer uses NFQUEUE"),
        ("cgroup_freezer_v1", "cgroup v2 group"),
        ("cgroup_freezer_v2", "v1 freezer"),
        ("xt_cgroup", "host's netns"),
        ("userfaultfd", "full restores only"),
    ],
)
def test_single_fallbacks_are_warnings(missing: str, warned: str) -> None:
    r = build_report(GOOD_CRIU, features(**{missing: "missing"}), "6.18.0")  # type: ignore[arg-type]
    assert r.can_run, r.blockers
    assert len(r.warnings) == 1 and r.warnings[0].startswith(f"{missing} missing: ")
    assert warned in r.warnings[0]


def test_freezer_choice_follows_hierarchy() -> None:
    hybrid = build_report(GOOD_CRIU, features(), "6.18.0", pure_v2=False).features
    assert hybrid["cgroup_freezer_v1"].consequence == ("units are kept in the v1 freezer hierarchy; "
                                                       "dumps seize them with ptrace")
    assert hybrid["cgroup_freezer_v2"].consequence.startswith("not used")
    pure = build_report(GOOD_CRIU, features(cgroup_freezer_v1="missing"), "6.18", pure_v2=True)
    assert pure.features["cgroup_freezer_v2"].consequence.startswith("units are kept in a cgroup v2")


def test_informational_feature_never_warns() -> None:
    r = build_report(GOOD_CRIU, features(pagemap_scan="missing"), "6.18.0")
    assert r.can_run and r.warnings == []
    assert r.features["pagemap_scan"].consequence.startswith("informational")


@pytest.mark.parametrize(
    "problem", ["CRIU not found at /nope", "CRIU 4.1.1 is too old (need >= 4.2)"]
)
def test_criu_problem_is_a_blocker(problem: str) -> None:
    bad = CriuInfo("/nope", None, False, "", problem)
    r = build_report(bad, features(), "6.18.0")
    assert not r.can_run and r.blockers == [problem]


def test_criu_check_partial_success_warns() -> None:
    criu = CriuInfo(
        "/c", "4.2.1", True, "Warn: x\nLooks good but some kernel features are missing\n"
    )
    r = build_report(criu, features(), "6.18.0")
    assert r.can_run
    assert r.warnings == ["criu check: Looks good but some kernel features are missing"]


def test_to_json_shape() -> None:
    r = build_report(GOOD_CRIU, features(**HERE), "6.18.44")
    j = json.loads(json.dumps(r.to_json()))  # must be plain JSON
    assert j["criu"] == {"path": "/opt/criu", "version": "4.2.1", "ok": True,
                         "check_output": "Looks good.", "from": ""}  # fmt: skip
    assert list(j["features"]) == list(FEATURES)
    assert j["features"]["soft_dirty"] is False and j["features"]["nfqueue"] is True
    assert j["details"]["tmpfs_run"]["status"] == "degraded"
    assert set(j["details"]["root"]) == {"status", "detail", "consequence"}
    assert j["can_run"] is True and j["blockers"] == [] and len(j["warnings"]) == 2
    assert j["kernel"] == "6.18.44"


def test_format_table_reads_at_a_glance() -> None:
    r = build_report(GOOD_CRIU, features(**HERE, root="missing"), "6.18.44")
    text = r.format_table()
    lines = text.splitlines()
    assert "kernel 6.18.44" in lines[0] and "CRIU 4.2.1 ok" in lines[0]
    rows = [ln for ln in lines if ln.startswith("| ") and ln.split("|")[1].strip() in FEATURES]
    assert [ln.split("|")[1].strip() for ln in rows] == list(FEATURES)
    assert len({len(ln) for ln in lines if ln[:1] in "+|"}) == 1  # aligned box
    assert "  - not running as root: root probe said so" in lines
    assert lines[-1] == "Can run: NO"


def test_clean_report_table_says_none() -> None:
    text = build_report(GOOD_CRIU, features(), "6.18").format_table()
    assert "Blockers: none" in text and "Warnings: none" in text and text.endswith("Can run: yes")


def test_check_report_is_a_dataclass_with_defaults() -> None:
    r = CheckReport(GOOD_CRIU, {})
    assert r.blockers == [] and r.warnings == [] and r.can_run is False


def test_summary_prefers_error_lines() -> None:
    out = "iptables v1.8.9: Couldn't load match `cgroup'\nError: no such file\nTry `iptables -h'"
    assert _summary(out) == "Error: no such file"
    assert _summary("only line\n") == "only line"
    assert _summary("") == "no output"
    assert _summary("needs a capability:\nsetcap cap_x+eip criu\n") == (
        "needs a capability: setcap cap_x+eip criu"
    )


# probe_criu against fake binaries: no root needed, exercises the real subprocess path


def fake_criu(tmp_path: Path, version: str, check_rc: int, check_out: str = "Looks good.") -> str:
    script = tmp_path / "criu"
    script.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = --version ]; then echo "Version: {version}"; exit 0; fi\n'
        'if [ "$2" = --feature ]; then exit 1; fi\n'
        f'echo "{check_out}"; exit {check_rc}\n'
    )
    script.chmod(0o755)
    return str(script)


def test_probe_criu_missing_path() -> None:
    info, sd = probe_criu("/nonexistent/criu", explicit=True)
    assert not info.ok and info.problem == "CRIU not found at /nonexistent/criu" and sd is None


def test_probe_criu_none() -> None:
    info, _ = probe_criu(None, explicit=False)
    assert not info.ok and info.path is None and "CRIU not found" in info.problem


def test_probe_criu_good(tmp_path: Path) -> None:
    info, sd = probe_criu(fake_criu(tmp_path, "4.2.1", 0), explicit=True)
    assert info.ok and info.version == "4.2.1" and info.check_output == "Looks good."
    assert sd is False  # the fake says mem_dirty_track is unsupported


def test_probe_criu_too_old(tmp_path: Path) -> None:
    info, _ = probe_criu(fake_criu(tmp_path, "4.1.1", 0), explicit=True)
    assert not info.ok and info.version == "4.1.1" and "too old" in info.problem


def test_probe_criu_check_fails(tmp_path: Path) -> None:
    path = fake_criu(tmp_path, "4.2.1", 1, "Error (criu/cr-check.c:1): vDSO mismatch")
    info, sd = probe_criu(path, explicit=True)
    assert not info.ok and sd is None
    assert info.problem == "`criu check` failed (exit 1): Error (criu/cr-check.c:1): vDSO mismatch"
