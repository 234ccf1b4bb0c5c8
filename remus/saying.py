"""Say a sentence once per change, not once per retry.

A condition an agent retries many times a second (an unreachable backup, a
refusal, a coordinator that is down) is logged when it starts and when it
changes, never on every try; `forget()` when it is over, so that the next
occurrence is said again.
"""

from __future__ import annotations

import logging


class Once:
    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self.last: str | None = None

    def say(self, sentence: str, level: int = logging.WARNING, key: str | None = None) -> bool:
        """Log `sentence` unless `key` (default: the sentence) was the last said;
        True if it was logged."""
        k = sentence if key is None else key
        if k == self.last:
            return False
        self.log.log(level, "%s", sentence)
        self.last = k
        return True

    def forget(self) -> None:
        self.last = None
