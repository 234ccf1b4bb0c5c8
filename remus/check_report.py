"""The model of `remus check`: what a host offers and what remus does about it.

Feature and CriuInfo are probe results (remus.check_probes makes them);
CheckReport is the whole report with its JSON and table forms. The pure
logic lives here too (CRIU version parsing, each feature's consequence,
blockers and warnings), so it can be tested with hand-built features.
"""

from __future__ import annotations

import re
import textwrap
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Status = Literal["ok", "missing", "degraded"]
MIN_CRIU = (4, 2)
FEATURES = (
    "root", "soft_dirty", "uffd_wp", "userfaultfd", "nfqueue", "xt_cgroup", "sch_plug",
    "cgroup_freezer_v1", "cgroup_freezer_v2", "netns", "pidns", "tcp_repair",
    "tmpfs_run", "pagemap_scan", "page_encoder",
)  # fmt: skip
INFORMATIONAL = frozenset({"pagemap_scan"})  # reported, never a warning


# -- report model ------------------------------------------------------------


@dataclass(frozen=True)
class Feature:
    """One probed capability. `consequence` says what remus does about it."""

    name: str
    ok: bool
    status: Status
    detail: str
    consequence: str = ""


def feature(name: str, status: Status, detail: str) -> Feature:
    return Feature(name, status == "ok", status, detail)


@dataclass(frozen=True)
class CriuInfo:
    """The CRIU binary remus would use. `problem` is a one-line reason when not ok."""

    path: str | None
    version: str | None
    ok: bool
    check_output: str
    problem: str = ""
    source: str = ""  # why this binary (remus.paths.criu_source)


@dataclass
class CheckReport:
    criu: CriuInfo
    features: dict[str, Feature]
    blockers: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    can_run: bool = False
    kernel: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "criu": {
                "path": self.criu.path,
                "version": self.criu.version,
                "ok": self.criu.ok,
                "check_output": self.criu.check_output,
                "from": self.criu.source,
            },
            "features": {n: f.ok for n, f in self.features.items()},
            "details": {
                n: {"status": f.status, "detail": f.detail, "consequence": f.consequence}
                for n, f in self.features.items()
            },
            "blockers": list(self.blockers),
            "warnings": list(self.warnings),
            "can_run": self.can_run,
            "kernel": self.kernel,
        }

    def format_table(self) -> str:
        criu = f"CRIU {self.criu.version or '?'} {'ok' if self.criu.ok else 'NOT OK'}"
        head = (f"remus check  kernel {self.kernel}  {criu} ({self.criu.path or 'not found'}; "
                f"from {self.criu.source or '?'})")
        rows = [[f.name, f.status, f.detail, f.consequence] for f in self.features.values()]
        lines = [head, _table(["Feature", "Status", "Detail", "Remus does"], rows)]
        for title, items in (("Blockers", self.blockers), ("Warnings", self.warnings)):
            lines.append(f"{title}: {'none' if not items else ''}".rstrip())
            lines.extend(f"  - {item}" for item in items)
        lines.append(f"Can run: {'yes' if self.can_run else 'NO'}")
        return "\n".join(lines)


def _table(
    header: list[str], rows: list[list[str]], widths: tuple[int, ...] = (17, 8, 38, 44)
) -> str:
    """A boxed table like `patronictl list`; long cells wrap inside their column."""
    cols = [max([len(header[i])] + [min(len(r[i]), widths[i]) for r in rows]) for i in range(4)]
    rule = "+" + "+".join("-" * (w + 2) for w in cols) + "+"

    def render(cells: list[str]) -> list[str]:
        wrapped = [textwrap.wrap(c, cols[i]) or [""] for i, c in enumerate(cells)]
        height = max(len(w) for w in wrapped)
        out = []
        for k in range(height):
            parts = [(w[k] if k < len(w) else "").ljust(cols[i]) for i, w in enumerate(wrapped)]
            out.append("| " + " | ".join(parts) + " |")
        return out

    lines = [rule, *render(header), rule]
    for row in rows:
        lines.extend(render(row))
    lines.append(rule)
    return "\n".join(lines)


# -- pure logic ---------------------------------------------------------------


def parse_criu_version(text: str) -> tuple[int, ...] | None:
    """Version from `criu --version` output ("Version: 4.2.1\\nGitID: ...")."""
    m = re.search(r"Version:\s*(\d+(?:\.\d+)*)", text)
    return tuple(int(p) for p in m.group(1).split(".")) if m else None


def version_at_least(version: tuple[int, ...], minimum: tuple[int, ...]) -> bool:
    width = max(len(version), len(minimum))
    return version + (0,) * (width - len(version)) >= minimum + (0,) * (width - len(minimum))


def _ok(features: dict[str, Feature], name: str) -> bool:
    f = features.get(name)
    return f is not None and f.ok


def consequence(name: str, features: dict[str, Feature], *, pure_v2: bool = False) -> str:
    """What remus does given `name`'s status (some depend on other features)."""
    ok = _ok(features, name)
    f = features.get(name)
    if name == "nfqueue":
        if ok:
            return "output buffer uses NFQUEUE (default backend)"
        return "output buffer uses sch_plug" if _ok(features, "sch_plug") else _NO_BUFFER
    if name == "sch_plug":
        if ok:
            return "plug qdisc backend available as an alternative output buffer"
        return "output buffer uses NFQUEUE" if _ok(features, "nfqueue") else _NO_BUFFER
    if name in ("cgroup_freezer_v1", "cgroup_freezer_v2"):
        return _freezer_consequence(name, features, pure_v2)
    if name in ("soft_dirty", "uffd_wp"):
        return _tracking_consequence(name, features)
    if name == "tmpfs_run" and f is not None and f.status == "degraded":
        return "every CRIU call re-probes the kernel (~30 ms more); mount a tmpfs on /run"
    return _CONSEQUENCES[name][0 if ok else 1]


_NO_BUFFER = "no output buffer: remus cannot hold output until the backup acks"
_CONSEQUENCES: dict[str, tuple[str, str]] = {  # name -> (when ok, when not ok)
    "root": ("CRIU, namespaces and netfilter are usable", "remus cannot run: it needs root"),
    "userfaultfd": (
        "available for lazy restore / write tracking (not required)",
        "no lazy restore or userfaultfd write tracking; full restores only",
    ),
    "xt_cgroup": (
        "degraded host-namespace mode can match the unit's cgroup",
        "protecting a process in the host's netns is unavailable (own netns only)",
    ),
    "netns": ("units get their own network namespace", "remus cannot run: units need a netns"),
    "pidns": ("units get their own PID namespace", "remus cannot run: units need a PID namespace"),
    "tcp_repair": (
        "established TCP connections survive failover",
        "remus cannot run: CRIU cannot checkpoint TCP connections",
    ),
    "tmpfs_run": ("CRIU caches its kernel probe in /run/criu.kdat", "CRIU re-probes the kernel"),
    "pagemap_scan": (
        "used by uffd-wp tracking and by CRIU to read page maps",
        "informational: no uffd-wp tracking; CRIU reads /proc/PID/pagemap",
    ),
    "page_encoder": (
        "the delta encoder compares and XORs pages in C (remus.checkpoint._pagexor)",
        "the delta encoder uses its numpy loops: same output, ~6x the CPU per changed page; "
        "`make setup` builds the C module (Debian packages build-essential, python3-dev)",
    ),
}


_NO_TRACKING = ("no memory tracking: every dump copies all memory and deltas come from a "
                "page-content diff (the freeze grows with the unit's size)")


def _tracking_consequence(name: str, features: dict[str, Feature]) -> str:
    """--dirty-tracking auto takes soft-dirty, else uffd-wp, else the page diff."""
    sd, wp = _ok(features, "soft_dirty"), _ok(features, "uffd_wp")
    grows = "the freeze and the delta grow with the pages written, not with the unit's size"
    if name == "soft_dirty":
        if sd:
            return f"--dirty-tracking auto uses soft-dirty: {grows}"
        return "not used: auto uses uffd-wp tracking instead" if wp else _NO_TRACKING
    if wp:
        return ("available (auto prefers soft-dirty)" if sd
                else f"--dirty-tracking auto uses uffd-wp: {grows}")
    return "not used: auto uses soft-dirty" if sd else _NO_TRACKING


def _freezer_consequence(name: str, features: dict[str, Feature], pure_v2: bool) -> str:
    v1, v2 = _ok(features, "cgroup_freezer_v1"), _ok(features, "cgroup_freezer_v2")
    if not v1 and not v2:
        return "remus cannot run: no cgroup to hold the unit's processes"
    # remus.cgroup keeps a unit in a v2 cgroup on pure v2 hosts, else in the v1
    # freezer hierarchy; dumps seize its tasks with ptrace (CRIU), and only the
    # lab's power cut freezes the group.
    uses_v2 = pure_v2 or not v1
    mine = name == ("cgroup_freezer_v2" if uses_v2 else "cgroup_freezer_v1")
    where = "a cgroup v2 group" if uses_v2 else "the v1 freezer hierarchy"
    if mine:
        return f"units are kept in {where}; dumps seize them with ptrace"
    return f"not used: units are kept in {where}"


def with_consequences(features: dict[str, Feature], *, pure_v2: bool = False) -> dict[str, Feature]:
    return {
        n: replace(f, consequence=consequence(n, features, pure_v2=pure_v2))
        for n, f in features.items()
    }


def judge(criu: CriuInfo, features: dict[str, Feature]) -> tuple[list[str], list[str]]:
    """(blockers, warnings). Blockers make remus unable to run at all."""

    def lacks(name: str) -> bool:
        return not _ok(features, name)

    blockers = [f"not running as root: {_detail(features, 'root')}"] if lacks("root") else []
    if not criu.ok:
        blockers.append(criu.problem or "CRIU is not usable")
    for name, why in (
        ("netns", "no network namespaces"),
        ("pidns", "no PID namespaces"),
        ("tcp_repair", "no TCP repair (CRIU cannot checkpoint TCP connections)"),
    ):
        if lacks(name):
            blockers.append(f"{why}: {_detail(features, name)}")
    blocking = {"root", "netns", "pidns", "tcp_repair"}
    if lacks("nfqueue") and lacks("sch_plug"):
        blockers.append("no output buffer: neither NFQUEUE nor sch_plug works")
        blocking |= {"nfqueue", "sch_plug"}
    if lacks("cgroup_freezer_v1") and lacks("cgroup_freezer_v2"):
        blockers.append("no cgroup freezer: neither the v1 freezer nor cgroup v2 freeze works")
        blocking |= {"cgroup_freezer_v1", "cgroup_freezer_v2"}
    if not lacks("soft_dirty") or not lacks("uffd_wp"):
        blocking |= {"soft_dirty", "uffd_wp"}  # one memory tracker is all remus needs
    else:
        blocking.add("uffd_wp")  # one warning (soft_dirty's) says it
    warnings = [
        f"{f.name} {f.status}: {f.consequence or f.detail}"
        for f in features.values()
        if not f.ok and f.name not in blocking and f.name not in INFORMATIONAL
    ]
    if criu.ok and "Looks good but" in criu.check_output:
        warnings.append(f"criu check: {criu.check_output.splitlines()[-1].strip()}")
    return blockers, warnings


def _detail(features: dict[str, Feature], name: str) -> str:
    f = features.get(name)
    return f.detail if f is not None else "not probed"


def build_report(
    criu: CriuInfo, features: dict[str, Feature], kernel: str, *, pure_v2: bool = False
) -> CheckReport:
    """Fill in consequences, blockers, warnings and can_run from probe results."""
    full = with_consequences(features, pure_v2=pure_v2)
    blockers, warnings = judge(criu, full)
    return CheckReport(criu, full, blockers, warnings, not blockers, kernel)
