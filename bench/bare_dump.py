"""Bare `criu dump --leave-running` of a running unit, N times: median pause (ms) as JSON.

`bare_dump.py PID NETNS_NAME [N]` run inside the unit's host. The same CRIU
options as remus uses (tcp-established, network lock skipped), images on tmpfs.
"""

import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from remus.checkpoint.criu import read_dump_stats  # noqa: E402
from remus.paths import criu_binary  # noqa: E402

pid, netns = sys.argv[1], sys.argv[2]
n = int(sys.argv[3]) if len(sys.argv) > 3 else 5
pauses, walls = [], []
for i in range(n):
    d = Path(f"/dev/shm/remus-bare-{pid}-{i}")
    d.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["nsenter", f"--net=/run/netns/{netns}", criu_binary() or "criu", "dump",
                        "-t", pid, "-D", str(d), "--leave-running", "--tcp-established",
                        "--skip-in-flight", "--network-lock", "skip", "--ext-unix-sk",
                        "--file-locks", "--manage-cgroups=ignore", "-v0", "-o", "dump.log"],
                       capture_output=True, text=True)
    if r.returncode == 0:
        st = read_dump_stats(d)
        pauses.append((st.get("freezing_time", 0) + st.get("frozen_time", 0)) / 1000)
    shutil.rmtree(d, ignore_errors=True)
print(json.dumps({"pause_ms_p50": round(statistics.median(pauses), 2) if pauses else None,
                  "runs": len(pauses)}))
