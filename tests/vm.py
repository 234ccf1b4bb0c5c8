"""A throw-away VM with Debian's stock kernel, for what this host's kernel lacks.

The CI kernel has no soft-dirty (and no sch_plug); Debian's stock kernel has
both. `run_in_vm(script)` boots that kernel under QEMU with this host's root
file system shared read-only over 9p, a tmpfs overlay on top (the guest
writes nothing back except into one shared exchange directory), runs
`script` with /bin/sh as root, powers off and returns (exit status, output).

No disk image and no download besides Debian packages: qemu-system-x86,
busybox-static, cpio and the linux-image package (fetched with `apt-get
download`, unpacked under .cache/vm, never installed on the host). KVM is
used when it works; otherwise QEMU emulates the CPU (TCG, ~10x slower).

    .venv/bin/python -m tests.vm 'uname -r; cat /proc/cmdline'
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache" / "vm"
APT = ["qemu-system-x86", "busybox-static", "cpio", "kmod"]
INITRD_MODULES = ["virtio_pci", "9pnet_virtio", "9p", "overlay"]

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


def _run(argv: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    p = subprocess.run(argv, capture_output=True, text=True, **kw)  # type: ignore[call-overload]
    if p.returncode != 0:
        raise VMError(f"{' '.join(argv)}: {(p.stderr or p.stdout).strip()[-500:]}")
    return p  # type: ignore[no-any-return]


def _install_tools() -> None:
    if all(shutil.which(t) for t in ("qemu-system-x86_64", "busybox", "cpio", "depmod")):
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    _run(["apt-get", "update", "-q"], env=env)
    _run(["apt-get", "install", "-y", "-q", "--no-install-recommends", *APT], env=env)


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
        _run(["apt-get", "download", pkg], cwd=root)
        deb = next(root.glob("linux-image-*.deb"))
        _run(["dpkg-deb", "-x", str(deb), str(root / "fs")])
        deb.unlink()
        _run(["depmod", "-b", str(root / "fs"), kver])
        _build_initrd(root, kver)
        done.write_text(pkg + "\n")
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


def _build_initrd(root: Path, kver: str) -> None:
    mods = root / "fs" / "lib" / "modules" / kver
    tree = root / "initrd"
    for d in ("bin", "mods", "proc", "sys", "dev", "lower", "rw", "newroot"):
        (tree / d).mkdir(parents=True, exist_ok=True)
    busybox = shutil.which("busybox")
    assert busybox is not None
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
