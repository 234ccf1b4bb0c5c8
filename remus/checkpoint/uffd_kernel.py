"""The kernel side of uffd-wp dirty tracking: userfaultfd and PAGEMAP_SCAN.

On kernels >= 6.7 a userfaultfd in async write-protect mode
(UFFD_FEATURE_WP_ASYNC) records writes in the page tables without any fault
reaching user space, and the PAGEMAP_SCAN ioctl on /proc/PID/pagemap reports
them (PAGE_IS_WRITTEN) and re-arms them (PM_SCAN_WP_MATCHING).

Here: the ABI constants and structs (include/uapi/linux/userfaultfd.h,
include/uapi/linux/fs.h), the ioctls (UFFDIO_API, UFFDIO_REGISTER,
PAGEMAP_SCAN), a userfaultfd of this process, and the probe of whether this
kernel tracks writes that way. The tracker that uses them for a unit's
processes is remus.checkpoint.uffd.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import mmap
import os

from remus.checkpoint.inject import SYS_USERFAULTFD, syscall

# -- kernel ABI (include/uapi/linux/userfaultfd.h, include/uapi/linux/fs.h) ----

UFFD_API = 0xAA
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
UFFD_FEATURE_WP_ASYNC = 1 << 15
UFFDIO_REGISTER_MODE_WP = 1 << 1
O_CLOEXEC = 0o2000000
O_NONBLOCK = 0o4000

PM_SCAN_WP_MATCHING = 1 << 0
PM_SCAN_CHECK_WPASYNC = 1 << 1
PAGE_IS_WPALLOWED = 1 << 0
PAGE_IS_WRITTEN = 1 << 1
PAGE_IS_FILE = 1 << 2
PAGE_IS_PRESENT = 1 << 3

#: highest user address on x86_64 with 4-level page tables (TASK_SIZE_MAX)
USER_END = 0x7FFFFFFFF000


def _iowr(kind: int, nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (kind << 8) | nr


class UffdioApi(ctypes.Structure):  # struct uffdio_api
    _fields_ = [("api", ctypes.c_uint64), ("features", ctypes.c_uint64),
                ("ioctls", ctypes.c_uint64)]


class UffdioRegister(ctypes.Structure):  # struct uffdio_register (range inlined)
    _fields_ = [("start", ctypes.c_uint64), ("len", ctypes.c_uint64),
                ("mode", ctypes.c_uint64), ("ioctls", ctypes.c_uint64)]


class PmScanArg(ctypes.Structure):  # struct pm_scan_arg
    _fields_ = [(n, ctypes.c_uint64) for n in (
        "size", "flags", "start", "end", "walk_end", "vec", "vec_len", "max_pages",
        "category_inverted", "category_mask", "category_anyof_mask", "return_mask")]


class PageRegion(ctypes.Structure):  # struct page_region
    _fields_ = [("start", ctypes.c_uint64), ("end", ctypes.c_uint64),
                ("categories", ctypes.c_uint64)]


UFFDIO_API = _iowr(UFFD_API, 0x3F, ctypes.sizeof(UffdioApi))
UFFDIO_REGISTER = _iowr(UFFD_API, 0x00, ctypes.sizeof(UffdioRegister))
PAGEMAP_SCAN = _iowr(ord("f"), 16, ctypes.sizeof(PmScanArg))
# Not UFFD_FEATURE_WP_UNPOPULATED: its markers in empty entries read as swapped
# pages (see arm()); an empty entry that gets written is marked written anyway.
FEATURES = UFFD_FEATURE_WP_ASYNC


# -- the ioctls ---------------------------------------------------------------

def uffd_api(fd: int) -> None:
    api = UffdioApi(api=UFFD_API, features=FEATURES)
    fcntl.ioctl(fd, UFFDIO_API, api, True)
    if api.features & FEATURES != FEATURES:
        raise OSError(errno.EINVAL, "userfaultfd lacks UFFD_FEATURE_WP_ASYNC")


def uffd_register_wp(fd: int, start: int, end: int) -> None:
    reg = UffdioRegister(start=start, len=end - start, mode=UFFDIO_REGISTER_MODE_WP)
    fcntl.ioctl(fd, UFFDIO_REGISTER, reg, True)


def pagemap_scan(pagemap_fd: int, start: int, end: int, *, flags: int = 0,
                 mask: int = 0, return_mask: int = 0,
                 max_regions: int = 0) -> list[tuple[int, int, int]]:
    """PAGEMAP_SCAN over [start, end): regions (start, end, categories) that match."""
    vec = (PageRegion * max_regions)() if max_regions else None
    arg = PmScanArg(size=ctypes.sizeof(PmScanArg), flags=flags, start=start, end=end,
                    vec=ctypes.addressof(vec) if vec is not None else 0,
                    vec_len=max_regions, category_mask=mask, return_mask=return_mask)
    n = fcntl.ioctl(pagemap_fd, PAGEMAP_SCAN, arg, True)
    if vec is None:
        return []
    return [(vec[i].start, vec[i].end, vec[i].categories) for i in range(n)]


#: regions per re-arm call; a re-arm of more regions goes on from walk_end
ARM_REGIONS = 4096


def arm(pagemap_fd: int, start: int, end: int, check: bool = False) -> int:
    """Write-protect the written pages of [start, end) again (re-arm).

    Returns how many pages were written (and are now protected again).
    check: fail with EPERM when part of the range is not registered.

    Only present pages are armed. An empty page-table entry also reads as
    written, and arming it would leave a uffd-wp marker there, which reads as
    a swapped, unwritten page (PAGE_IS_SWAPPED): CRIU would record it as a
    page of the parent that does not exist. An empty entry needs no arming: the
    page that a write faults in there is marked written. (A written page that
    was swapped out before the dump stays written: copied again, no harm.)
    """
    flags = PM_SCAN_WP_MATCHING | (PM_SCAN_CHECK_WPASYNC if check else 0)
    vec = (PageRegion * ARM_REGIONS)()
    arg = PmScanArg(size=ctypes.sizeof(PmScanArg), flags=flags, end=end,
                    vec=ctypes.addressof(vec), vec_len=ARM_REGIONS,
                    category_mask=PAGE_IS_WRITTEN | PAGE_IS_PRESENT,
                    return_mask=PAGE_IS_WRITTEN)
    pages = 0
    while start < end:
        arg.start = start
        n = fcntl.ioctl(pagemap_fd, PAGEMAP_SCAN, arg, True)
        pages += sum(vec[i].end - vec[i].start for i in range(n)) // mmap.PAGESIZE
        if arg.walk_end <= start:
            break
        start = arg.walk_end
    return pages


# -- what this kernel offers -------------------------------------------------------

def kernel_uffd_wp() -> str | None:
    """None when this kernel tracks writes with uffd-wp async; else why not.

    Registers a page of our own, arms it, writes it and asks PAGEMAP_SCAN.
    """
    try:
        fd = own_userfaultfd()
    except OSError as e:
        return f"userfaultfd: {e.strerror or e}"
    page = mmap.PAGESIZE
    buf = mmap.mmap(-1, 2 * page, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    cell = ctypes.c_char.from_buffer(buf)
    addr = ctypes.addressof(cell)
    del cell
    try:
        buf[0] = 1
        buf[page] = 1
        uffd_api(fd)
        uffd_register_wp(fd, addr, addr + 2 * page)
        with open("/proc/self/pagemap", "rb") as pm:
            arm(pm.fileno(), addr, addr + 2 * page, check=True)
            buf[page] = 2
            written = pagemap_scan(pm.fileno(), addr, addr + 2 * page, mask=PAGE_IS_WRITTEN,
                                   return_mask=PAGE_IS_WRITTEN, max_regions=4)
        if written != [(addr + page, addr + 2 * page, PAGE_IS_WRITTEN)]:
            return f"PAGEMAP_SCAN reported {written} for one written page"
        return None
    except OSError as e:
        what = "PAGEMAP_SCAN" if e.errno == errno.ENOTTY else "userfaultfd write-protect"
        return f"{what}: {e.strerror or e} (needs Linux >= 6.7)"
    finally:
        buf.close()
        os.close(fd)


#: userfaultfd(2)'s number per machine (the tracker itself is x86_64 only: inject)
USERFAULTFD_SYSCALL = {"x86_64": 323, "aarch64": 282, "ppc64le": 364, "s390x": 355}


def own_userfaultfd(nr: int = SYS_USERFAULTFD) -> int:
    """A userfaultfd of this process; user-mode-only where that is all we may get."""
    try:
        return syscall(nr, O_CLOEXEC | O_NONBLOCK)
    except OSError as e:
        if e.errno != errno.EPERM:
            raise
        return syscall(nr, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY)
