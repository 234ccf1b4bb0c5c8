"""An UNPROTECTED unit for baselines: same container as `remus run`, no agent.

Run inside a lab host: `remus lab exec pri -- python bench/plain_unit.py NAME VIP DEV -- CMD...`
Prints "ready PID" once CMD runs, then waits until stdin closes, then removes
everything it made.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from remus.cgroup import UnitCgroup  # noqa: E402
from remus.container import Container  # noqa: E402
from remus.unit import UnitSpec, start_unit  # noqa: E402


def main() -> None:
    sep = sys.argv.index("--")
    name, vip, dev = sys.argv[1:sep]
    argv = sys.argv[sep + 1:]
    spec = UnitSpec.for_run(name, vip, dev)
    c = Container(spec)
    c.create(active=True)
    cg = UnitCgroup(spec.name)
    wrapper, pid = start_unit(spec, argv, cg)
    try:
        c.activate(announce=True)
        print(f"ready {pid}", flush=True)
        sys.stdin.read()
    finally:
        os.kill(pid, signal.SIGKILL)
        wrapper.wait()
        c.remove()
        cg.remove()


if __name__ == "__main__":
    main()
