"""Running host tools (ip, iptables, mount, nsenter, sysctl, CRIU's checks): one runner.

Output is captured as text. Failures become HostError with a one-line message
(the CLI prints RemusErrors as one line): a tool that cannot be started or
runs past its timeout always, a non-zero exit with check=True.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Sequence

from remus.errors import HostError

TIMEOUT = 30.0


def run_cmd(argv: Sequence[str], *, netns: str | None = None, stdin: str | None = None,
            check: bool = True, timeout: float | None = TIMEOUT) -> subprocess.CompletedProcess[str]:
    """Run argv, in network namespace `netns` (a path) through nsenter --net if given.

    stdin: text fed to the tool (None: it inherits ours). The HostError of a
    tool that could not run has the OSError or TimeoutExpired as __cause__."""
    full = list(argv) if netns is None else ["nsenter", f"--net={netns}", "--", *argv]
    try:
        res = subprocess.run(full, input=stdin, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise HostError(f"{argv[0]}: {err}") from err
    if check and res.returncode != 0:
        raise HostError(f"{command_line(argv)}: {failure(res)}")
    return res


#: run_cmd's signature, for code that takes a runner (tests pass a fake one)
Runner = Callable[..., "subprocess.CompletedProcess[str]"]


def command_line(argv: Sequence[str]) -> str:
    """argv for a message; a multi-line argument (a script) shows its first line."""
    return " ".join(a.split("\n", 1)[0] + " ..." if "\n" in a else a for a in argv)


def failure(res: subprocess.CompletedProcess[str]) -> str:
    """What a failed tool said (stderr, else stdout) on one line, else its exit status."""
    said = (res.stderr or res.stdout or "").strip().replace("\n", "; ")
    return said or f"exit {res.returncode}"
