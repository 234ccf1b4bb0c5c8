"""Settings and the validation of their timing relations (checked at load).

Relations (Patroni-style, checked before anything starts):
  heartbeat * 2 <= lease          a lease survives one lost heartbeat
  lease < takeover_timeout        the primary stops releasing output before
                                  the backup may take over (no two actives)
The epoch interval has no relation to check: heartbeats, not epochs or
their ACKs, prove each agent alive, so a long interval never looks like a
dead peer (an epoch of any length keeps the lease alive by stream progress).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from remus.errors import ConfigError

_DURATION = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(us|ms|s|m)?\s*$")
_SCALE = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, None: 1.0}


def parse_duration(text: str | float, what: str = "duration") -> float:
    """'25ms', '0.2s', '1', '500us' -> seconds. Bare numbers are seconds."""
    if isinstance(text, int | float):
        return float(text)
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"{what} {text!r}: expected a number with a unit, e.g. 50ms or 0.2s")
    return float(m.group(1)) * _SCALE[m.group(2)]


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1000:g}ms"


def parse_addr(text: str, default_port: int) -> tuple[str, int]:
    """'HOST[:PORT]' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        return text, default_port
    try:
        p = int(port)
    except ValueError as e:
        raise ConfigError(f"address {text!r}: port {port!r} is not a number") from e
    if not 0 < p < 65536:
        raise ConfigError(f"address {text!r}: port out of range")
    return host or "0.0.0.0", p


DEFAULT_PORT = 7788
MIN_INTERVAL = 0.005
MAX_INTERVAL = 10.0


@dataclass
class Timing:
    interval: float = 0.050
    heartbeat: float = 0.050
    lease: float = 0.200
    takeover_timeout: float = 0.300

    def validate(self, labels: dict[str, str] | None = None) -> Timing:
        """ConfigError unless the relations hold; the message names both settings
        in conflict (`labels`: how to call each, by default its flag and value)."""
        def n(k: str) -> str:
            if labels and k in labels:
                return labels[k]
            return f"--{k.replace('_', '-')} {fmt_ms(getattr(self, k))}"

        if not MIN_INTERVAL <= self.interval <= MAX_INTERVAL:
            raise ConfigError(f"{n('interval')}: must be between "
                              f"{fmt_ms(MIN_INTERVAL)} and {MAX_INTERVAL:g}s")
        if self.heartbeat <= 0 or self.heartbeat * 2 > self.lease:
            raise ConfigError(f"{n('heartbeat')} must be at most half of {n('lease')}, "
                              "so that one lost heartbeat is survived")
        if self.lease >= self.takeover_timeout:
            raise ConfigError(f"{n('lease')} must be shorter than {n('takeover_timeout')}: "
                              "the primary must stop releasing output before the backup may "
                              "take over")
        return self


def check_interval(seconds: float) -> float:
    Timing(interval=seconds, heartbeat=0.05, lease=0.2, takeover_timeout=10.0).validate()
    return seconds
