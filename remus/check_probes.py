"""The probes of `remus check`: real attempts, not guesses from config files.

Netfilter and qdisc features are tried inside a throw-away network namespace
(`unshare --net`), so nothing is left on the host; cgroup freezers are tried
on an empty, temporary cgroup. Each probe returns a Feature (or CriuInfo) of
remus.check_report; remus.check runs them all concurrently.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import platform
import re
import socket
import struct
import subprocess
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from remus import cgroup
from remus.check_report import (
    MIN_CRIU,
    CriuInfo,
    Feature,
    Status,
    feature,
    parse_criu_version,
    version_at_least,
)
from remus.checkpoint.tracking import kernel_soft_dirty, uffd_wp_problem
from remus.checkpoint.uffd_kernel import USERFAULTFD_SYSCALL, own_userfaultfd, pagemap_scan
from remus.errors import HostError
from remus.proc import run_cmd

log = logging.getLogger(__name__)

PROBE_TIMEOUT = 10.0


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


def probe_uffd_wp(criu: CriuInfo) -> Feature:
    why = uffd_wp_problem(criu.path)
    if why is None:
        return feature("uffd_wp", "ok", "userfaultfd async write-protect + PAGEMAP_SCAN track "
                       "writes; CRIU has remus's patch")
    return feature("uffd_wp", "missing", why)


def probe_userfaultfd() -> Feature:
    nr = USERFAULTFD_SYSCALL.get(platform.machine())
    if nr is None:
        return feature("userfaultfd", "degraded", f"not probed on {platform.machine()}")
    try:
        fd = own_userfaultfd(nr)  # falls back to user-mode-only, what an unprivileged caller gets
    except OSError as e:
        return feature("userfaultfd", "missing", f"userfaultfd(): {os.strerror(e.errno) if e.errno else e}")
    os.close(fd)
    return feature("userfaultfd", "ok", "userfaultfd() syscall works")


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


def probe_page_encoder() -> Feature:
    """Whether bin/setup built the encoder's C module (it is optional)."""
    try:
        import remus.checkpoint._pagexor as m  # noqa: F401
    except ImportError as e:
        return feature("page_encoder", "degraded", f"remus.checkpoint._pagexor: {e}")
    return feature("page_encoder", "ok", os.path.basename(m.__file__ or "built"))


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
