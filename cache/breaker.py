"""A circuit breaker: after `limit` failures in a row, stop trying for `cooldown_s`.

The disk tier keeps one for reads and one for writes. They fail apart: on a full disk every write
fails while reads still find what was stored before, and those hits are worth keeping. A dead or
locked disk trips both. After the cool-down one call goes through; if it fails too, the breaker
switches off again at once (the count of failures in a row is still at the limit).

Not thread-safe on its own: the disk tier calls it under its lock.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Breaker:
    limit: int
    cooldown_s: float
    failures_in_a_row: int = 0
    off_until: float = float("-inf")  # clock time from which calls go through again

    def allows(self, now: float) -> bool:
        return now >= self.off_until

    def succeeded(self) -> None:
        self.failures_in_a_row = 0

    def failed(self, now: float) -> bool:
        """Record a failure; True if it switched the breaker off."""
        self.failures_in_a_row += 1
        if self.failures_in_a_row < self.limit:
            return False
        self.off_until = now + self.cooldown_s
        return True
