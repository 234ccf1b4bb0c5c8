"""`remus check`: what this host can do, and what remus does about what it cannot.

Probes are real attempts, not guesses from config files: netfilter and qdisc
features are tried inside a throw-away network namespace (`unshare --net`), so
nothing is left on the host; cgroup freezers are tried on an empty, temporary
cgroup. All probes run concurrently; the whole check takes well under 2 s.

The pure part (version parsing, consequences, blockers/warnings, rendering)
is separate from the probes so it can be tested with hand-built features.
"""

from __future__ import annotations

import ctypes
import errno
import json
import logging
import os
import platform
import re
import socket
import struct
import subprocess
import textwrap
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import click

from remus import cgroup
from remus.checkpoint.tracking import kernel_soft_dirty, uffd_wp_problem
from remus.checkpoint.uffd import pagemap_scan
from remus.errors import HostError
from remus.paths import criu_binary
from remus.proc import run_cmd

log = logging.getLogger(__name__)

Status = Literal["ok", "missing", "degraded"]
MIN_CRIU = (4, 2)
FEATURES = (
    "root", "soft_dirty", "uffd_wp", "userfaultfd", "nfqueue", "xt_cgroup", "sch_plug",
    "cgroup_freezer_v1", "cgroup_freezer_v2", "netns", "pidns", "tcp_repair",
    "tmpfs_run", "pagemap_scan",
)  # fmt: skip
INFORMATIONAL = frozenset({"pagemap_scan"})  # reported, never a warning
PROBE_TIMEOUT = 10.0


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
        head = f"remus check  kernel {self.kernel}  {criu} ({self.criu.path or 'not found'})"
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
        return "remus cannot run: no way to freeze the unit consistently"
    # remus.cgroup uses cgroup.freeze on pure v2 hosts and the v1 freezer otherwise
    uses_v2 = pure_v2 or not v1
    mine = name == ("cgroup_freezer_v2" if uses_v2 else "cgroup_freezer_v1")
    if mine:
        return "units are frozen with " + ("cgroup.freeze (v2)" if uses_v2 else "the v1 freezer")
    other = "cgroup.freeze (v2)" if uses_v2 else "the v1 freezer"
    return f"not used: units are frozen with {other}"


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


# -- probes ---------------------------------------------------------------------


def _run(argv: list[str], timeout: float = PROBE_TIMEOUT) -> tuple[int, str]:
    """Exit status and combined output; 127 when the program is missing."""
    try:
        p = run_cmd(argv, stdin="", check=False, timeout=timeout)
    except HostError as e:
        if isinstance(e.__cause__, FileNotFoundError):
            return 127, f"{argv[0]}: not found"
        if isinstance(e.__cause__, subprocess.TimeoutExpired):
            return 124, f"{argv[0]}: timed out after {timeout:.0f} s"
        raise
    return p.returncode, (p.stdout + p.stderr).strip()


def _summary(text: str) -> str:
    """The line of a tool's output that says what went wrong."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(lines) if "error" in ln.lower()]
    if not lines:
        return "no output"
    i = errors[0] if errors else 0
    # a line ending in ":" announces the useful part on the next line
    return (
        f"{lines[i]} {lines[i + 1]}" if lines[i].endswith(":") and i + 1 < len(lines) else lines[i]
    )


def probe_criu(path: str | None, explicit: bool) -> tuple[CriuInfo, bool | None]:
    """CriuInfo, and CRIU's own view of soft-dirty (None when CRIU is unusable)."""
    if not path:
        return CriuInfo(
            None, None, False, "", "CRIU not found (set REMUS_CRIU or run bin/setup)"
        ), None
    if not (os.path.isfile(path) and os.access(path, os.X_OK)):
        what = (
            f"CRIU not found at {path}" if explicit else f"CRIU not found at {path} (run bin/setup)"
        )
        return CriuInfo(path, None, False, "", what), None
    with ThreadPoolExecutor(3) as pool:
        ver = pool.submit(_run, [path, "--version"])
        chk = pool.submit(_run, [path, "check"])
        sd = pool.submit(_run, [path, "check", "--feature", "mem_dirty_track"])
        (vrc, vout), (crc, cout), (src, _) = ver.result(), chk.result(), sd.result()
    version = parse_criu_version(vout) if vrc == 0 else None
    vstr = ".".join(map(str, version)) if version else None
    if version is None:
        problem = f"CRIU at {path} does not report a version: {_summary(vout)}"
    elif not version_at_least(version, MIN_CRIU):
        problem = f"CRIU {vstr} is too old (need >= {'.'.join(map(str, MIN_CRIU))})"
    elif crc != 0:
        problem = f"`criu check` failed (exit {crc}): {_summary(cout)}"
    else:
        problem = ""
    return CriuInfo(path, vstr, not problem, cout, problem), (src == 0 if not problem else None)


def probe_root() -> Feature:
    euid = os.geteuid()
    return feature("root", "ok" if euid == 0 else "missing", f"euid {euid}")


def probe_soft_dirty(criu_says: bool | None) -> Feature:
    try:
        kernel = kernel_soft_dirty()
    except OSError as e:
        return feature("soft_dirty", "missing", f"pagemap probe failed: {e}")
    kdesc = "pagemap bit 55 " + ("set after a write" if kernel else "never set")
    if criu_says is None:
        return feature("soft_dirty", "ok" if kernel else "missing", kdesc)
    cdesc = "CRIU mem_dirty_track " + ("yes" if criu_says else "no")
    if kernel and criu_says:
        return feature("soft_dirty", "ok", f"{kdesc}; {cdesc}")
    if not kernel and not criu_says:
        return feature("soft_dirty", "missing", f"{kdesc}; {cdesc}")
    return feature("soft_dirty", "degraded", f"probes disagree: {kdesc}; {cdesc}")


_UFFD_SYSCALL = {"x86_64": 323, "aarch64": 282, "ppc64le": 364, "s390x": 355}


def probe_uffd_wp(criu: CriuInfo) -> Feature:
    why = uffd_wp_problem(criu.path)
    if why is None:
        return feature("uffd_wp", "ok", "userfaultfd async write-protect + PAGEMAP_SCAN track "
                       "writes; CRIU has remus's patch")
    return feature("uffd_wp", "missing", why)


def probe_userfaultfd() -> Feature:
    nr = _UFFD_SYSCALL.get(platform.machine())
    if nr is None:
        return feature("userfaultfd", "degraded", f"not probed on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    # UFFD_USER_MODE_ONLY (1) is what an unprivileged caller may still get
    for flags, what in (
        (os.O_CLOEXEC | os.O_NONBLOCK, ""),
        (os.O_CLOEXEC | 1, " (user mode only)"),
    ):
        fd = libc.syscall(nr, flags)
        if fd >= 0:
            os.close(fd)
            return feature("userfaultfd", "ok", f"userfaultfd() syscall works{what}")
        err = ctypes.get_errno()
    return feature("userfaultfd", "missing", f"userfaultfd(): {os.strerror(err)}")


# name -> (what is tried inside a fresh netns, what the detail calls it)
NETNS_PROBES: dict[str, tuple[str, str]] = {
    "nfqueue": ("iptables -w 2 -A OUTPUT -j NFQUEUE --queue-num 9", "iptables NFQUEUE rule"),
    "xt_cgroup": ("iptables -w 2 -A OUTPUT -m cgroup --path / -j ACCEPT", "iptables -m cgroup"),
    "sch_plug": ("tc qdisc add dev lo root plug limit 1000", "tc qdisc plug"),
}


def probe_in_netns(name: str) -> Feature:
    """Try a rule or qdisc in a throw-away netns: it vanishes with the process."""
    script, what = NETNS_PROBES[name]
    rc, out = _run(["unshare", "--net", "sh", "-c", script])
    if rc != 0:
        return feature(name, "missing", f"{what}: {_summary(out)}")
    return feature(name, "ok", f"{what} accepted")


def _mounts() -> list[tuple[str, str, str]]:
    """(mountpoint, fstype, options) from /proc/self/mounts."""
    rows = [ln.split() for ln in Path("/proc/self/mounts").read_text().splitlines()]
    return [(r[1].replace("\\040", " "), r[2], r[3]) for r in rows if len(r) >= 4]


def _try_freeze(parent: Path, version: int) -> str:
    """Freeze an empty temporary cgroup below `parent`; '' on success, else the reason."""
    v2, freezer = version == 2, cgroup.FREEZERS[version]
    file, report = freezer.knob, freezer.report
    probe = parent / f"remus-check-{os.getpid()}-{threading.get_ident()}"
    try:
        probe.mkdir()
    except OSError as e:
        return f"cannot create a cgroup in {parent}: {e.strerror}"
    try:
        if not (probe / file).exists():
            return f"{file} missing in a child cgroup"
        cgroup.freeze(probe, True, v2)
        if cgroup.reports(probe, True, v2):
            return ""
        return f"{report} did not report frozen: {(probe / report).read_text().strip()!r}"
    except OSError as e:
        return f"{file}: {e.strerror}"
    finally:
        try:
            if (probe / file).exists():
                cgroup.freeze(probe, False, v2)
            probe.rmdir()
        except OSError as e:
            log.warning("could not remove probe cgroup %s: %s", probe, e)


def probe_freezer(version: int) -> Feature:
    name = f"cgroup_freezer_v{version}"
    if version == 1:
        mounts = [m for m, t, o in _mounts() if t == "cgroup" and "freezer" in o.split(",")]
        own, absent = cgroup.cgroup_of("self", "freezer") or "/", "no v1 freezer hierarchy mounted"
    else:
        mounts = [m for m, t, _ in _mounts() if t == "cgroup2"]
        own, absent = cgroup.cgroup_of("self") or "/", "cgroup2 is not mounted"
    if not mounts:
        return feature(name, "missing", absent)
    if version == 2 and not _kernel_at_least(5, 2):
        return feature(name, "missing", f"kernel {platform.release()} < 5.2 has no cgroup.freeze")
    if os.geteuid() != 0:
        return feature(name, "ok", f"mounted at {mounts[0]} (not tried: not root)")
    parent = Path(mounts[0]) / own.lstrip("/")
    why = _try_freeze(parent if parent.is_dir() else Path(mounts[0]), version)
    if why:
        return feature(name, "missing", f"{mounts[0]}: {why}")
    return feature(name, "ok", f"froze a test cgroup under {mounts[0]}")


def _kernel_at_least(major: int, minor: int) -> bool:
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    return m is not None and (int(m.group(1)), int(m.group(2))) >= (major, minor)


def probe_namespace(kind: str) -> Feature:
    name, flag = {"net": ("netns", ["--net"]), "pid": ("pidns", ["--pid", "--fork"])}[kind]
    if not Path(f"/proc/self/ns/{kind}").exists():
        return feature(name, "missing", f"/proc/self/ns/{kind} missing")
    if os.geteuid() != 0:
        return feature(name, "ok", f"/proc/self/ns/{kind} present (creation not tried: not root)")
    rc, out = _run(["unshare", *flag, "true"])
    if rc != 0:
        return feature(name, "missing", f"unshare {' '.join(flag)}: {_summary(out)}")
    return feature(name, "ok", f"created a {kind} namespace")


def probe_tcp_repair() -> Feature:
    tcp_repair = 19  # linux/tcp.h; not exported by Python's socket module
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.setsockopt(socket.IPPROTO_TCP, tcp_repair, 1)
        except OSError as e:
            hint = " (needs CAP_NET_ADMIN)" if e.errno == errno.EPERM else ""
            return feature("tcp_repair", "missing", f"setsockopt(TCP_REPAIR): {e.strerror}{hint}")
    return feature("tcp_repair", "ok", "setsockopt(TCP_REPAIR) works")


TMPFS_MAGIC = 0x01021994


def probe_tmpfs_run() -> Feature:
    """CRIU keeps /run/criu.kdat only when statfs("/run") says tmpfs."""
    buf = ctypes.create_string_buffer(256)  # struct statfs is 120 bytes on 64-bit
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.statfs(b"/run", buf) != 0:
        return feature("tmpfs_run", "degraded", f"statfs(/run): {os.strerror(ctypes.get_errno())}")
    (f_type,) = struct.unpack_from("l", buf.raw)
    if f_type == TMPFS_MAGIC:
        return feature("tmpfs_run", "ok", "/run is a tmpfs")
    under = [(m, t) for m, t, _ in reversed(_mounts()) if m in ("/", "/run")]  # topmost first
    mnt, fs = max(under, key=lambda mt: len(mt[0]), default=("?", "?"))
    return feature("tmpfs_run", "degraded", f"/run is not a tmpfs ({fs} on {mnt})")


def probe_pagemap_scan() -> Feature:
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        pagemap_scan(fd, 0, 0)  # an empty range: only whether the ioctl exists
    except OSError as e:
        status: Status = "missing" if e.errno in (errno.ENOTTY, errno.EINVAL) else "degraded"
        return feature("pagemap_scan", status, f"ioctl(PAGEMAP_SCAN): {e.strerror}")
    finally:
        os.close(fd)
    return feature("pagemap_scan", "ok", "ioctl(PAGEMAP_SCAN) works")


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
    path = criu_path if explicit else criu_binary()
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
    ]
    with ThreadPoolExecutor(8) as pool:
        criu_future = pool.submit(probe_criu, path, explicit)
        futures = {n: pool.submit(_safe, n, p, *a) for n, p, a in probes}
        criu, criu_soft_dirty = criu_future.result()
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
