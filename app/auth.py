"""The env/file API keys, the per-process rate limit and the refusal they answer with.

Keys, scopes, tenants and the persisted quotas are app/tenancy/; the key check on every path is
app/tenancy/middleware.py. Rate limit: a token bucket per key (`rate_limit_rpm` refill,
`rate_limit_burst` capacity); an empty bucket gets 429 with `Retry-After`.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from app.settings import Settings

log = logging.getLogger("mmserve")


def load_api_keys(settings: Settings) -> frozenset[str]:
    """Keys from the comma list and the key file (one per line; blank lines and `#` lines skipped)."""
    keys = settings.api_keys.split(",")
    if settings.api_key_file:
        path = Path(settings.api_key_file)
        try:
            keys += [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
        except OSError as e:
            raise ValueError(f"api_key_file {path}: {e.strerror or e}") from None
    return frozenset(k.strip() for k in keys if k.strip())


def log_end_user(*names: str | None) -> None:
    """OpenAI's `user` and `safety_identifier`: the client's name for its end user, there for abuse
    monitoring. Here the operator monitors, so the request's log line names it (with the request id)."""
    given = [name for name in names if name]
    if given:
        log.info("end user: %s", " / ".join(repr(name) for name in given))


@dataclass
class TokenBucket:
    capacity: float
    per_second: float
    tokens: float
    updated: float

    def take(self, now: float) -> float:
        """Take one token: 0.0 when granted, else the seconds until one will be there."""
        self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.per_second)
        self.updated = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.per_second


@dataclass(frozen=True)
class Refusal:
    status: int
    message: str
    type: str
    code: str
    reason: str  # the metrics label
    retry_after_s: int


class RateLimiter:
    """A token bucket per key id (`rate_limit_rpm` refill, `rate_limit_burst` capacity), in this process:
    a burst guard. The quotas that must hold across processes and restarts are app/tenancy/quotas.py."""

    def __init__(self, requests_per_minute: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.requests_per_minute, self.burst, self._clock = requests_per_minute, burst, clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> "RateLimiter":
        return cls(settings.rate_limit_rpm, settings.rate_limit_burst)

    def admit(self, key_id: str) -> Refusal | None:
        """Take one request from the key's bucket: None when it may go ahead. Only identified keys get a
        bucket, so a flood of made-up keys allocates nothing."""
        if not self.requests_per_minute or not key_id:
            return None
        with self._lock:
            now = self._clock()
            bucket = self._buckets.setdefault(key_id, TokenBucket(self.burst, self.requests_per_minute / 60.0,
                                                                  self.burst, now))
            wait = bucket.take(now)
        if wait:
            return Refusal(429, f"rate limit reached: {self.requests_per_minute:g} requests per minute "
                           f"(bursts of {self.burst}) per API key", "rate_limit_error",
                           "rate_limit_exceeded", "rate_limited", max(1, math.ceil(wait)))
        return None
