"""A throw-away VM with Debian's stock kernel, for what this host's kernel lacks.

The CI kernel has no soft-dirty (and no sch_plug); Debian's stock kernel has
both. `run_in_vm(script)` boots that kernel under QEMU with this host's root
file system shared read-only over 9p, a tmpfs overlay on top (the guest
writes nothing back except into one shared exchange directory), runs
`script` with /bin/sh as root, powers off and returns (exit status, output).

No disk image and no download besides Debian packages: qemu-system-x86,
cpio and kmod are installed on the host if missing; busybox-static and the
linux-image package are fetched with `apt-get download` and unpacked under
.cache/vm, never installed (busybox-static conflicts with Debian's busybox,
which may be installed and is dynamically linked: useless in an initrd that
has no loader, so the busybox used is always ours and checked to be static).
KVM is used when it works; otherwise QEMU emulates the CPU (TCG, ~10x slower).

    .venv/bin/python -m remus.vm 'uname -r; cat /proc/cmdline'

Used by tests/integration/test_vm_soft_dirty.py and bench/softdirty_bench.py.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from remus.paths import REPO

log = logging.getLogger(__name__)

CACHE = REPO / ".cache" / "vm"
# Host tools (command -> Debian package), installed if missing. Not busybox:
# see static_busybox().
TOOLS = {"qemu-system-x86_64": "qemu-system-x86", "cpio": "cpio", "depmod": "kmod"}
BUSYBOX_PKG = "busybox-static"
INITRD_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]
# Part of the initrd's cache key (with the busybox's digest): bump it when the
# initrd's make-up changes, so a cached one is rebuilt. 2: our static busybox.
INITRD_FORMAT = 2
# As root, apt would fetch as user _apt, which cannot write to .cache/vm.
APT_AS_ROOT = ["-o", "APT::Sandbox::User=root"]

# Busybox init: load the 9p and overlay modules, mount the host's root
# read-only with a tmpfs overlay, add the kernel's modules and the exchange
# directory, and hand over to the guest script on the shared directory.
INIT = """#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in {modules}; do insmod /mods/$m || echo "insmod $m failed"; done
O=trans=virtio,version=9p2000.L,msize=262144
mount -t 9p -o $O,ro,cache=loose hostroot /lower || exec sh
mount -t tmpfs -o size=6g tmpfs /rw; mkdir /rw/upper /rw/work
mount -t overlay overlay -o lowerdir=/lower,upperdir=/rw/upper,workdir=/rw/work /newroot || exec sh
mkdir -p /newroot/lib/modules/{kver} /newroot/mnt/vmx
mount -t 9p -o $O,ro kmods /newroot/lib/modules/{kver}
mount -t 9p -o $O vmx /newroot/mnt/vmx
mount --move /dev /newroot/dev
exec switch_root /newroot /bin/sh /mnt/vmx/guest-init
"""

GUEST_INIT = """#!/bin/sh
mount -t proc proc /proc 2>/dev/null; mount -t sysfs sys /sys 2>/dev/null
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm
# fresh /run and /tmp, but keep the project visible when it lives under them
mkdir -p /mnt/repo; mount --bind {cwd} /mnt/repo
mount -t tmpfs tmpfs /run; mount -t tmpfs tmpfs /tmp
mkdir -p {cwd}; mount --bind /mnt/repo {cwd}
mount -t cgroup2 cgroup2 /sys/fs/cgroup
hostname remus-vm
ip link set lo up
cd {cwd}
/bin/sh /mnt/vmx/script.sh > /mnt/vmx/output.txt 2>&1
echo $? > /mnt/vmx/status
sync
poweroff -f
"""


@dataclass(frozen=True)
class Assets:
    kernel: Path
    initrd: Path
    modules: Path  # /lib/modules/<kver> of the guest kernel
    kver: str


class VMError(RuntimeError):
    """The VM could not be prepared or did not finish."""


class VMToolsMissing(VMError):
    """A host tool the VM needs is missing and apt-get could not install it."""


# -- ELF: is a binary static? ----------------------------------------------------
# The fields of Elf64_Ehdr / Elf32_Ehdr (<elf.h>) after e_ident[16], as struct
# formats per ELF class (e_ident[EI_CLASS]: 1 = 32-bit, 2 = 64-bit).
ELF_EHDR = {
    1: [("e_type", "H"), ("e_machine", "H"), ("e_version", "I"), ("e_entry", "I"),
        ("e_phoff", "I"), ("e_shoff", "I"), ("e_flags", "I"), ("e_ehsize", "H"),
        ("e_phentsize", "H"), ("e_phnum", "H")],
    2: [("e_type", "H"), ("e_machine", "H"), ("e_version", "I"), ("e_entry", "Q"),
        ("e_phoff", "Q"), ("e_shoff", "Q"), ("e_flags", "I"), ("e_ehsize", "H"),
        ("e_phentsize", "H"), ("e_phnum", "H")],
}
# The fields of Elf64_Phdr / Elf32_Phdr up to p_filesz (p_flags moves between the two).
ELF_PHDR = {
    1: [("p_type", "I"), ("p_offset", "I"), ("p_vaddr", "I"), ("p_paddr", "I"),
        ("p_filesz", "I")],
    2: [("p_type", "I"), ("p_flags", "I"), ("p_offset", "Q"), ("p_vaddr", "Q"),
        ("p_paddr", "Q"), ("p_filesz", "Q")],
}
ELF_MAGIC = b"\x7fELF"
EI_NIDENT = 16
PT_INTERP = 3  # the segment naming the program interpreter (the dynamic loader)
PN_XNUM = 0xFFFF  # e_phnum overflowed into section 0: not produced for executables


def _unpack(layout: list[tuple[str, str]], order: str, data: bytes, off: int) -> dict[str, int]:
    fmt = order + "".join(f for _, f in layout)
    return dict(zip((n for n, _ in layout), struct.unpack_from(fmt, data, off), strict=True))


def elf_interpreter(path: Path) -> str | None:
    """The program interpreter (PT_INTERP) an ELF executable asks for, e.g.
    /lib64/ld-linux-x86-64.so.2; None for a statically linked one (static-pie
    included: it has no PT_INTERP and runs without a loader). ValueError if
    `path` is no ELF file or its program headers lie outside it."""
    data = path.read_bytes()
    if len(data) < EI_NIDENT or data[:4] != ELF_MAGIC:
        raise ValueError(f"{path}: not an ELF file")
    cls, enc = data[4], data[5]
    if cls not in ELF_EHDR or enc not in (1, 2):
        raise ValueError(f"{path}: unknown ELF class {cls} / data encoding {enc}")
    order = "<" if enc == 1 else ">"
    try:
        eh = _unpack(ELF_EHDR[cls], order, data, EI_NIDENT)
        if eh["e_phnum"] == PN_XNUM:
            raise ValueError(f"{path}: more program headers than e_phnum holds")
        for i in range(eh["e_phnum"]):
            ph = _unpack(ELF_PHDR[cls], order, data, eh["e_phoff"] + i * eh["e_phentsize"])
            if ph["p_type"] == PT_INTERP:
                raw = data[ph["p_offset"]:ph["p_offset"] + ph["p_filesz"]]
                if len(raw) != ph["p_filesz"]:
                    raise ValueError(f"{path}: PT_INTERP outside the file")
                return raw.rstrip(b"\0").decode(errors="replace")
    except struct.error as e:
        raise ValueError(f"{path}: truncated ELF headers ({e})") from e
    return None


def require_static(path: Path) -> None:
    """Raise VMError unless `path` is a statically linked ELF executable."""
    try:
        interp = elf_interpreter(path)
    except (OSError, ValueError) as e:
        raise VMError(f"{path} cannot go into the initrd: {e}") from e
    if interp is not None:
        raise VMError(f"{path} is dynamically linked (it needs {interp}), but the initrd has "
                      f"no loader and no libraries: the guest kernel would panic with "
                      f"'Failed to execute /init (error -2)'. It must be the static busybox "
                      f"of Debian's {BUSYBOX_PKG} package.")


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        raise VMError(f"{' '.join(argv)}: {(p.stderr or p.stdout).strip()[-500:]}")
    return p  # type: ignore[no-any-return]


def _which(tool: str) -> str | None:
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin:/usr/bin:/bin")


def _install_tools() -> None:
    """apt-get install the packages of TOOLS whose command is missing; VMToolsMissing
    (naming them) if that fails."""
    missing = sorted({pkg for tool, pkg in TOOLS.items() if not _which(tool)})
    if not missing:
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        _run(["apt-get", "update", "-q"], env=env)
        _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *missing], env=env)
    except VMError as e:
        raise VMToolsMissing(f"the VM needs the Debian package(s) {' '.join(missing)}, and "
                             f"apt-get could not install them: {e}") from e
    still = [tool for tool in TOOLS if not _which(tool)]
    if still:
        raise VMToolsMissing(f"{', '.join(still)} still missing after apt-get install "
                             f"{' '.join(missing)}")


def _apt_download(pkg: str, into: Path) -> Path:
    """`apt-get download pkg` into `into`, unpacked (dpkg-deb -x) to into/fs; the .deb's name."""
    _run(["apt-get", *APT_AS_ROOT, "download", pkg], cwd=into)
    deb = next(into.glob(f"{pkg}_*.deb"), None)
    if deb is None:
        raise VMError(f"apt-get download {pkg} left no {pkg}_*.deb in {into}")
    _run(["dpkg-deb", "-x", str(deb), str(into / "fs")])
    deb.unlink()
    return deb


def static_busybox() -> Path:
    """bin/busybox of Debian's busybox-static, downloaded and unpacked once under
    .cache/vm/busybox-static (never installed: it conflicts with Debian's busybox),
    checked to be statically linked."""
    root = CACHE / BUSYBOX_PKG
    done = root / ".done"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        deb = _apt_download(BUSYBOX_PKG, root)
        done.write_text(deb.name + "\n")
    found = [p for p in (root / "fs" / "bin" / "busybox", root / "fs" / "usr" / "bin" / "busybox")
             if p.exists()]
    if not found:
        raise VMError(f"{BUSYBOX_PKG} ({done.read_text().strip()}) has no bin/busybox "
                      f"under {root / 'fs'}")
    require_static(found[0])
    return found[0]


def _kernel_package() -> str:
    out = _run(["apt-cache", "depends", "linux-image-amd64"]).stdout
    for line in out.splitlines():
        dep = line.strip().removeprefix("Depends:").strip()
        if line.strip().startswith("Depends:") and dep.startswith("linux-image-"):
            return dep
    raise VMError("apt knows no linux-image-amd64 (run apt-get update)")


def assets() -> Assets:
    """Build (once; cached under .cache/vm) the guest kernel, modules and initrd."""
    _install_tools()
    pkg = _kernel_package()
    kver = pkg.removeprefix("linux-image-")
    root = CACHE / kver
    done = root / ".done"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        _apt_download(pkg, root)
        _run(["depmod", "-b", str(root / "fs"), kver])
        done.write_text(pkg + "\n")
    busybox = static_busybox()
    # The initrd is rebuilt when its key changes: a new format, another busybox
    # (an initrd cached before this key existed, e.g. with a dynamic busybox, too).
    key = f"format {INITRD_FORMAT} busybox {hashlib.sha256(busybox.read_bytes()).hexdigest()}\n"
    stamp = root / "initrd.key"
    if not (root / "initrd.gz").exists() or not stamp.exists() or stamp.read_text() != key:
        stamp.unlink(missing_ok=True)
        _build_initrd(root, kver, busybox)
        stamp.write_text(key)
    return Assets(root / "fs" / "boot" / f"vmlinuz-{kver}", root / "initrd.gz",
                  root / "fs" / "lib" / "modules" / kver, kver)


def _module_order(mods: Path, wanted: list[str]) -> list[str]:
    """Relative paths of `wanted` modules and their dependencies, dependencies first."""
    deps: dict[str, list[str]] = {}
    for line in (mods / "modules.dep").read_text().splitlines():
        k, _, v = line.partition(":")
        deps[k] = v.split()
    order: list[str] = []

    def add(k: str) -> None:
        if k not in order:
            for d in deps[k]:
                add(d)
            order.append(k)

    for name in wanted:
        matches = [k for k in deps if Path(k).name.split(".ko")[0] == name]
        if not matches:
            raise VMError(f"module {name} not in the guest kernel")
        add(matches[0])
    return order


def _build_initrd(root: Path, kver: str, busybox: Path) -> None:
    mods = root / "fs" / "lib" / "modules" / kver
    tree = root / "initrd"
    shutil.rmtree(tree, ignore_errors=True)  # nothing of an older build may stay in it
    for d in ("bin", "mods", "proc", "sys", "dev", "lower", "rw", "newroot"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    require_static(busybox)  # it is /init's interpreter: no loader in here
    shutil.copy(busybox, tree / "bin" / "busybox")
    names = []
    for rel in _module_order(mods, INITRD_MODULES):
        src = mods / rel
        if src.suffix != ".ko":
            raise VMError(f"{src}: compressed modules are not handled")
        shutil.copy(src, tree / "mods" / src.name)
        names.append(src.name)
    init = tree / "init"
    init.write_text(INIT.format(modules=" ".join(names), kver=kver))
    init.chmod(0o755)
    files = subprocess.run(["find", "."], cwd=tree, capture_output=True, check=True).stdout
    cpio = subprocess.run(["cpio", "-o", "-H", "newc"], cwd=tree, input=files,
                          capture_output=True, check=True).stdout
    gz = subprocess.run(["gzip", "-1"], input=cpio, capture_output=True, check=True).stdout
    (root / "initrd.gz").write_bytes(gz)


def _accel() -> list[str]:
    """KVM if a guest can really run on it here, else emulation."""
    if os.environ.get("REMUS_VM_ACCEL") == "kvm":
        return ["-accel", "kvm", "-cpu", "host"]
    # /dev/kvm may exist but hang (nested virtualisation without VMX): default to
    # TCG, which is slower but works everywhere; REMUS_VM_ACCEL=kvm opts in.
    return ["-accel", "tcg,thread=multi", "-cpu", "max"]


def run_in_vm(script: str, timeout: float = 1200.0, cwd: Path = REPO,
              memory_mib: int = 4096) -> tuple[int, str]:
    """Boot the VM, run `script` (sh) as root in `cwd`; (exit status, output)."""
    a = assets()
    with tempfile.TemporaryDirectory(prefix="remus-vm-") as tmp:
        x = Path(tmp)
        (x / "script.sh").write_text(script)
        (x / "guest-init").write_text(GUEST_INIT.format(cwd=cwd))
        share = "security_model=passthrough"
        argv = ["qemu-system-x86_64", *_accel(), "-smp", str(min(2, os.cpu_count() or 1)),
                "-m", str(memory_mib), "-nographic", "-no-reboot", "-nic", "none",
                "-kernel", str(a.kernel), "-initrd", str(a.initrd),
                "-append", "console=ttyS0 quiet panic=-1",
                "-virtfs", f"local,path=/,mount_tag=hostroot,{share},readonly=on,multidevs=remap",
                "-virtfs", f"local,path={a.modules},mount_tag=kmods,{share},readonly=on",
                "-virtfs", f"local,path={x},mount_tag=vmx,{share}"]
        console = x / "console.log"
        with open(console, "wb") as out:
            try:
                subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                               timeout=timeout, check=False)
            except subprocess.TimeoutExpired as e:
                raise VMError(f"VM still running after {timeout:.0f} s; console: "
                              f"{console.read_text(errors='replace')[-2000:]}") from e
        status = x / "status"
        output = (x / "output.txt").read_text(errors="replace") if (x / "output.txt").exists() else ""
        if not status.exists():
            raise VMError("the guest did not run the script; console: "
                          f"{console.read_text(errors='replace')[-3000:]}")
        return int(status.read_text().strip() or "255"), output


def main() -> int:
    logging.basicConfig(level=logging.INFO)
    rc, out = run_in_vm(" ".join(sys.argv[1:]) or "uname -r")
    sys.stdout.write(out)
    return rc


if __name__ == "__main__":
    sys.exit(main())
