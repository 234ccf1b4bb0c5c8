"""How much of the machine's CPU was idle since the last look (/proc/stat).

The primary agent asks once per epoch under load, to choose between using an
idle core for the next epoch's work early (the sender encodes pages while
CRIU still dumps) and leaving every cycle to the unit on a saturated machine
(remus.primary, BUSY_IDLE_MIN).
"""

from __future__ import annotations

PROC_STAT = "/proc/stat"


def parse_cpu_line(text: str) -> tuple[int, int] | None:
    """(idle, total) clock ticks of the aggregate "cpu" line of /proc/stat, or
    None if the text has none. Idle counts idle and iowait; total every field
    up to steal (guest time is already inside user and nice)."""
    for line in text.splitlines():
        fields = line.split()
        if not fields or fields[0] != "cpu":
            continue
        try:
            ticks = [int(x) for x in fields[1:9]]
        except ValueError:
            return None
        if len(ticks) < 4:
            return None
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)
        return idle, sum(ticks)
    return None


class IdleMeter:
    """share() -> the idle fraction of all CPUs since the previous call (None on
    the first call, when nothing elapsed, or when /proc/stat is unreadable)."""

    def __init__(self, path: str = PROC_STAT) -> None:
        self.path = path
        self._last: tuple[int, int] | None = None

    def share(self) -> float | None:
        try:
            with open(self.path) as f:
                now = parse_cpu_line(f.read(4096))
        except OSError:
            now = None
        last, self._last = self._last, now
        if now is None or last is None or now[1] <= last[1]:
            return None
        return max(0.0, min(1.0, (now[0] - last[0]) / (now[1] - last[1])))
