"""The Vagrant lab (vagrant/): it validates, its scripts are clean, and it installs for real.

No VM is booted. What can be checked without one is checked for real:
`vagrant validate` (with vagrant-libvirt, so libvirt's provider block is
validated too), the Vagrantfile's key and rsync behaviour, shellcheck, and
vagrant/provision.sh run on this machine through the same entry point the
VMs use, with only its output directory (REMUS_ETC) and key source moved to
a temporary directory. The lookup of the lab interface is read-only and is
pointed at 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from remus.paths import REPO, criu_binary

pytestmark = pytest.mark.root

VAGRANT_DIR = REPO / "vagrant"
VAGRANTFILE = VAGRANT_DIR / "Vagrantfile"
PROVISION = VAGRANT_DIR / "provision.sh"
SETUP = REPO / "bin" / "setup"
README = VAGRANT_DIR / "README.md"
# Debian bookworm main has all of them; rsync is what the Vagrantfile syncs with.
APT_TOOLS = {"vagrant": "vagrant", "vagrant-libvirt": None, "shellcheck": "shellcheck",
             "rsync": "rsync"}
# Loads the Vagrantfile with a stand-in `Vagrant.configure` and prints its
# constants, so the test sees the values Vagrant would use.
RUBY_DUMP = """
module Vagrant; def self.configure(*); end; end
load ARGV.shift
require "json"
puts JSON.generate({"nodes" => NODES, "vip" => VIP, "exclude" => RSYNC_EXCLUDE})
"""


def _installed(pkg: str) -> bool:
    p = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return p.returncode == 0 and "install ok installed" in p.stdout


@pytest.fixture(scope="module")
def tools() -> None:
    missing = [pkg for pkg, exe in APT_TOOLS.items()
               if (exe and not shutil.which(exe)) or (exe is None and not _installed(pkg))]
    if not missing:
        return
    env = os.environ | {"DEBIAN_FRONTEND": "noninteractive"}
    p = subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *missing],
                       capture_output=True, text=True, env=env, timeout=900)
    if p.returncode != 0:
        pytest.skip(f"apt-get cannot install {' '.join(missing)}: {p.stderr.strip()[-400:]}")


@pytest.fixture
def vagrant_env(tmp_path: Path) -> dict[str, str]:
    """Vagrant with its home and per-project state in tmp_path, offline, libvirt."""
    return os.environ | {
        "VAGRANT_HOME": str(tmp_path / "vagrant-home"),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "vagrant-dot"),
        "VAGRANT_DEFAULT_PROVIDER": "libvirt",
        "VAGRANT_CHECKPOINT_DISABLE": "1",  # no version check against the internet
        "VAGRANT_NO_COLOR": "1",
    }


def vagrant(args: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["vagrant", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=180)


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """A throw-away project holding a copy of the Vagrantfile (its vagrant/ dir)."""
    d = tmp_path / "proj" / "vagrant"
    d.mkdir(parents=True)
    shutil.copy(VAGRANTFILE, d / "Vagrantfile")
    return d


def vagrantfile_values() -> dict[str, object]:
    p = subprocess.run(["ruby", "-e", RUBY_DUMP, str(VAGRANTFILE)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out: dict[str, object] = json.loads(p.stdout)
    return out


# -- the Vagrantfile ---------------------------------------------------------

def test_vagrantfile_validates(tools: None, vagrant_env: dict[str, str]) -> None:
    key = VAGRANT_DIR / "remus.key"
    had_key = key.exists()
    p = vagrant(["validate"], VAGRANT_DIR, vagrant_env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "Vagrantfile validated successfully" in p.stdout
    # VirtualBox is not installed here: its block is only evaluated, not validated.
    p = vagrant(["validate", "--ignore-provider"], VAGRANT_DIR, vagrant_env)
    assert p.returncode == 0, p.stdout + p.stderr
    assert key.exists() == had_key, "validate must not create vagrant/remus.key"


def test_validate_catches_a_bad_provider_option(tools: None, vagrant_env: dict[str, str],
                                                project_copy: Path) -> None:
    vf = project_copy / "Vagrantfile"
    text = vf.read_text()
    assert "lv.cpus = 2" in text
    vf.write_text(text.replace("lv.cpus = 2", "lv.cpus = 2\n        lv.no_such_option = 1"))
    p = vagrant(["validate"], project_copy, vagrant_env)
    assert p.returncode != 0
    assert "no_such_option" in p.stdout + p.stderr


def test_three_machines_on_libvirt(tools: None, vagrant_env: dict[str, str]) -> None:
    p = vagrant(["status", "--machine-readable"], VAGRANT_DIR, vagrant_env)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [line.split(",") for line in p.stdout.splitlines()]
    states = {r[1]: r[3] for r in rows if len(r) >= 4 and r[2] == "state"}
    providers = {r[1]: r[3] for r in rows if len(r) >= 4 and r[2] == "provider-name"}
    assert states == {"primary": "not_created", "backup": "not_created", "client": "not_created"}
    assert set(providers.values()) == {"libvirt"}


def test_network_and_provisioning_values(tools: None) -> None:
    v = vagrantfile_values()
    nodes = v["nodes"]
    assert isinstance(nodes, dict)
    assert {n: nodes[n]["ip"] for n in nodes} == {
        "primary": "192.168.56.11", "backup": "192.168.56.12", "client": "192.168.56.13"}
    assert all(1024 <= nodes[n]["memory"] <= 2048 for n in nodes)
    assert v["vip"] == "192.168.56.100/24"
    text = VAGRANTFILE.read_text()
    assert "/opt/remus/vagrant/provision.sh #{name} #{node[:ip]}" in text
    assert 'config.vm.box = "debian/bookworm64"' in text


def test_key_is_made_only_when_provisioning(tools: None, vagrant_env: dict[str, str],
                                            project_copy: Path) -> None:
    key = project_copy / "remus.key"
    assert vagrant(["validate"], project_copy, vagrant_env).returncode == 0
    assert not key.exists()
    # No VM exists, so this only loads the Vagrantfile and says so.
    p = vagrant(["provision", "primary"], project_copy, vagrant_env)
    assert "not created" in p.stdout + p.stderr, p.stdout + p.stderr
    assert key.exists()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    first = key.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}\n", first)
    from remus.protocol import load_key

    assert len(load_key(key)) == 32
    vagrant(["provision", "primary"], project_copy, vagrant_env)
    assert key.read_text() == first, "an existing key must never be replaced"


def test_rsync_excludes_keep_build_caches_apart(tools: None, tmp_path: Path) -> None:
    """The Vagrantfile's excludes with Vagrant's rsync flags, on the real tree."""
    excludes = vagrantfile_values()["exclude"]
    assert isinstance(excludes, list)
    dest = tmp_path / "opt-remus"
    (dest / ".venv").mkdir(parents=True)
    (dest / ".venv" / "vm-own").write_text("built in the VM\n")
    args = ["rsync", "--archive", "--delete", "--copy-links", "--exclude", ".vagrant/"]
    for e in excludes:
        args += ["--exclude", e]
    p = subprocess.run([*args, f"{REPO}/", f"{dest}/"], capture_output=True, text=True, timeout=300)
    # 24: a source file vanished mid-copy (other work edits the checkout meanwhile).
    assert p.returncode in (0, 24), p.stderr
    for gone in (".cache", ".git", "remus.egg-info"):
        assert not (dest / gone).exists(), gone
    assert not list(dest.rglob("__pycache__"))
    assert (dest / ".venv" / "vm-own").exists(), "rsync --delete removed the VM's own venv"
    assert os.access(dest / "vagrant" / "provision.sh", os.X_OK)
    assert (dest / "bin" / "setup").exists() and (dest / "remus" / "loadgen.py").exists()


# -- the scripts -------------------------------------------------------------

@pytest.mark.parametrize("script", [PROVISION, SETUP], ids=["provision.sh", "bin-setup"])
def test_bash_syntax(script: Path) -> None:
    p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("script", [PROVISION, SETUP], ids=["provision.sh", "bin-setup"])
def test_shellcheck(tools: None, script: Path) -> None:
    p = subprocess.run(["shellcheck", "--severity=style", str(script)], capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr


# -- provision.sh, for real ---------------------------------------------------

def provision(args: list[str], etc: Path, key_src: Path | None,
              timeout: float = 1800) -> subprocess.CompletedProcess[str]:
    env = os.environ | {"REMUS_ETC": str(etc)}
    env.pop("REMUS_SETUP_ARGS", None)  # the full bin/setup, apt step included
    if key_src is not None:
        env["REMUS_KEY_SRC"] = str(key_src)
    return subprocess.run([str(PROVISION), *args], env=env, capture_output=True, text=True,
                          timeout=timeout, cwd="/")


@pytest.fixture
def key_src(tmp_path: Path) -> Path:
    k = tmp_path / "src.key"
    k.write_text(os.urandom(32).hex() + "\n")
    k.chmod(0o644)  # provisioning must not keep a readable mode
    return k


@pytest.mark.slow  # the full bin/setup (apt step included) or apt-get install
def test_provision_primary_for_real(tmp_path: Path, key_src: Path) -> None:
    etc = tmp_path / "etc-remus"
    p = provision(["primary", "127.0.0.1"], etc, key_src)
    assert p.returncode == 0, p.stderr
    assert "[setup] done" in p.stderr and "[provision] done: primary" in p.stderr
    assert sorted(f.name for f in etc.iterdir()) == ["dev", "key", "role"]  # no temp files left
    assert (etc / "dev").read_text() == "lo\n"
    assert (etc / "role").read_text() == "primary\n"
    key = etc / "key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == 0
    assert key.read_text() == key_src.read_text()
    # What bin/setup must have produced: a venv with remus and pycriu, a working CRIU.
    py = REPO / ".venv" / "bin" / "python"
    q = subprocess.run([str(py), "-c", "import remus, pycriu; print(remus.__file__)"],
                       capture_output=True, text=True, cwd="/")
    assert q.returncode == 0, q.stderr
    assert q.stdout.strip() == str(REPO / "remus" / "__init__.py")
    c = subprocess.run([str(criu_binary()), "check"], capture_output=True, text=True, timeout=60)
    assert c.returncode == 0 and "Looks good" in c.stdout + c.stderr, c.stdout + c.stderr


@pytest.mark.slow  # the full bin/setup (apt step included) or apt-get install
def test_provision_client_for_real(tmp_path: Path) -> None:
    etc = tmp_path / "etc-remus"
    p = provision(["client", "127.0.0.1"], etc, None, timeout=600)
    assert p.returncode == 0, p.stderr
    assert "[setup]" not in p.stderr  # the client needs no CRIU
    assert sorted(f.name for f in etc.iterdir()) == ["dev", "role"]
    assert (etc / "role").read_text() == "client\n"
    assert shutil.which("redis-cli") and shutil.which("python3")


@pytest.fixture
def short_key(tmp_path: Path) -> Path:
    k = tmp_path / "short.key"
    k.write_text("abcd\n")
    return k


@pytest.mark.parametrize("args,key,rc,message", [
    ([], "good", 2, "ROLE"),
    (["bogus"], "good", 2, "unknown role: bogus"),
    (["primary", "a", "b"], "good", 2, "ROLE"),
    (["primary", "203.0.113.9"], "good", 1, "no interface holds 203.0.113.9"),
    (["backup"], "missing", 1, "no key at"),
    (["backup"], "short", 1, "at least 16 bytes"),
])
def test_provision_refuses_bad_input_before_installing(
        tmp_path: Path, key_src: Path, short_key: Path,
        args: list[str], key: str, rc: int, message: str) -> None:
    etc = tmp_path / "etc-remus"
    src = {"good": key_src, "short": short_key, "missing": tmp_path / "none.key"}[key]
    p = provision(args, etc, src, timeout=60)
    assert p.returncode == rc, p.stderr
    assert message in p.stderr
    assert "[setup]" not in p.stderr, "bin/setup ran before the input was checked"
    assert not etc.exists()


# -- the walkthrough ------------------------------------------------------------

def readme_remus_commands() -> list[list[str]]:
    """Every `sudo /opt/remus/bin/remus ...` in the README, as argv after `remus`."""
    cmds = []
    for inner in re.findall(r"-c '([^']*)'", README.read_text()):
        m = re.search(r"sudo /opt/remus/bin/remus (.*)", inner)
        if m:
            cmds.append(shlex.split(m.group(1).replace('"$(cat /etc/remus/dev)"', "eth1")))
    return cmds


def test_readme_commands_are_accepted_by_the_cli(tools: None) -> None:
    from remus.cli import cli

    cmds = readme_remus_commands()
    assert {c[0] for c in cmds} >= {"check", "backup", "run", "status", "set-interval"}
    for argv in cmds:
        sub = cli.commands[argv[0]]
        with sub.make_context(argv[0], argv[1:]) as ctx:  # raises on unknown options or values
            assert ctx.params is not None
    run = next(c for c in cmds if c[0] == "run")
    nodes = vagrantfile_values()["nodes"]
    assert isinstance(nodes, dict)
    assert run[run.index("--backup") + 1] == nodes["backup"]["ip"]
    assert run[run.index("--vip") + 1] == vagrantfile_values()["vip"]
    backup = next(c for c in cmds if c[0] == "backup")
    assert backup[backup.index("--listen") + 1] == nodes["backup"]["ip"]


@pytest.fixture(autouse=True)
def _no_stray_state() -> Iterator[None]:
    """Nothing this module runs may leave Vagrant state in the checkout."""
    before = (VAGRANT_DIR / ".vagrant").exists()
    yield
    assert (VAGRANT_DIR / ".vagrant").exists() == before
