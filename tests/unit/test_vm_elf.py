"""remus/vm.py's static-ELF check, on real files: the VM's initrd has no loader,
so its busybox must be statically linked (a dynamic one makes the guest kernel
panic with `Failed to execute /init (error -2)`)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from remus.vm import VMError, elf_interpreter, require_static

HELLO = "int main(void) { return 0; }\n"


def _dynamic_binary() -> Path:
    for p in (Path("/bin/ls"), Path("/usr/bin/ls")):
        if p.exists():
            return p.resolve()
    pytest.skip("no /bin/ls (Debian package coreutils)")


def _compile(tmp_path: Path, *flags: str) -> Path:
    """A tiny C program built with gcc `flags` (and run once); skips, naming the
    package, if gcc or the C library to link with is missing."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.skip("needs gcc (Debian package gcc, part of build-essential)")
    src, exe = tmp_path / "hello.c", tmp_path / "hello"
    src.write_text(HELLO)
    p = subprocess.run([gcc, *flags, "-o", str(exe), str(src)], capture_output=True, text=True,
                       timeout=120)
    if p.returncode != 0:
        if "cannot find" in p.stderr:  # -lc (libc.a), crt1.o, ...: no C library to link
            pytest.skip("needs the C library for linking, libc.a included (Debian package "
                        f"libc6-dev, part of build-essential): {p.stderr.strip()[-200:]}")
        raise AssertionError(p.stderr)
    assert subprocess.run([str(exe)], timeout=30).returncode == 0
    return exe


def test_a_dynamic_executable_names_its_loader() -> None:
    ls = _dynamic_binary()
    interp = elf_interpreter(ls)
    assert interp is not None and "ld-linux" in interp, interp
    with pytest.raises(VMError, match="dynamically linked"):
        require_static(ls)


def test_a_static_executable_has_no_loader(tmp_path: Path) -> None:
    exe = _compile(tmp_path, "-static")
    assert elf_interpreter(exe) is None
    require_static(exe)


def test_a_static_pie_has_no_loader(tmp_path: Path) -> None:
    """static-pie has a dynamic section (it relocates itself) but no PT_INTERP."""
    exe = _compile(tmp_path, "-static-pie")
    assert elf_interpreter(exe) is None
    require_static(exe)


def test_the_same_program_linked_dynamically_is_refused(tmp_path: Path) -> None:
    exe = _compile(tmp_path)
    assert elf_interpreter(exe) is not None
    with pytest.raises(VMError, match="dynamically linked"):
        require_static(exe)


def test_not_an_elf_file_is_refused(tmp_path: Path) -> None:
    script = tmp_path / "busybox"
    script.write_text("#!/bin/sh\necho not busybox\n")
    with pytest.raises(ValueError, match="not an ELF file"):
        elf_interpreter(script)
    with pytest.raises(VMError, match="not an ELF file"):
        require_static(script)


def test_truncated_headers_are_refused(tmp_path: Path) -> None:
    cut = tmp_path / "cut"
    cut.write_bytes(_dynamic_binary().read_bytes()[:40])
    with pytest.raises(ValueError, match="truncated"):
        elf_interpreter(cut)
