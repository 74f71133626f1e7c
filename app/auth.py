"""API keys, per-key rate limits and per-key token quotas on /v1/*.

Off when no key is configured (settings `api_keys`, `api_key_file`). When on, every /v1/* request needs
`Authorization: Bearer <key>` (401 otherwise); /health, /ready, /metrics and the OpenAPI schema stay
open for probes and scrapers. The presented key is compared with every configured key by
`hmac.compare_digest`, without stopping at a match, so the time taken tells nothing about which key
was close or how much of one was right.

Rate limit: a token bucket per key (`rate_limit_rpm` refill, `rate_limit_burst` capacity); an empty
bucket gets 429 with `Retry-After`. Quota: tokens per UTC day per key; whoever answers a request calls
`charge(key, tokens)`, and a key at its quota gets 429 `insufficient_quota` until the day turns. A
request that started under the quota is answered in full, so a key can overshoot it by one request.
Per-key state only ever exists for configured keys: a flood of made-up keys allocates nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from litestar import Request
from litestar.types import ASGIApp, Receive, Scope, Send

from app.errors import send_error
from app.request_id import request_id_of
from app.metrics import Metrics
from app.settings import Settings

log = logging.getLogger("mmserve")
API_KEY_STATE = "mmserve_api_key"  # where the middleware leaves the caller's key in the scope state
PROTECTED_PREFIX = "/v1/"
SECONDS_PER_DAY = 86_400


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


def api_key_of(request: Request) -> str | None:
    """The key the request was let in with; None when keys are off."""
    return request.scope.get("state", {}).get(API_KEY_STATE)


def log_end_user(*names: str | None) -> None:
    """OpenAI's `user` and `safety_identifier`: the client's name for its end user, there for abuse
    monitoring. Here the operator monitors, so the request's log line names it (with the request id)."""
    given = [name for name in names if name]
    if given:
        log.info("end user: %s", " / ".join(repr(name) for name in given))


def tenant_of(key: str | None) -> str | None:
    """The feature-cache salt of a key: tenants never share cached image features (a cache hit would
    tell one what another sent)."""
    return hashlib.sha256(key.encode()).hexdigest() if key else None


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


class KeyAccess:
    def __init__(self, keys: frozenset[str], *, requests_per_minute: float, burst: int, tokens_per_day: int,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time) -> None:
        self._keys = [(k, k.encode()) for k in sorted(keys)]
        self.requests_per_minute, self.burst, self.tokens_per_day = requests_per_minute, burst, tokens_per_day
        self._clock, self._wall_clock = clock, wall_clock
        self._buckets: dict[str, TokenBucket] = {}
        self._used: dict[str, tuple[int, int]] = {}  # key -> (UTC day number, tokens charged that day)
        self._lock = threading.Lock()  # charge() may come from a worker thread

    @classmethod
    def from_settings(cls, settings: Settings) -> "KeyAccess":
        return cls(load_api_keys(settings), requests_per_minute=settings.rate_limit_rpm,
                   burst=settings.rate_limit_burst, tokens_per_day=settings.quota_tokens_per_day)

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def identify(self, authorization: str | None) -> str | None:
        """The configured key an `Authorization: Bearer <key>` header carries, or None."""
        scheme, _, presented = (authorization or "").strip().partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        candidate = presented.strip().encode()
        match = None
        for key, raw in self._keys:
            if hmac.compare_digest(candidate, raw):
                match = key
        return match

    def admit(self, key: str) -> Refusal | None:
        """Take one request from the key's allowance: None when it may go ahead."""
        with self._lock:
            if self.tokens_per_day and self._used_today(key) >= self.tokens_per_day:
                wait = SECONDS_PER_DAY - self._wall_clock() % SECONDS_PER_DAY
                return Refusal(429, f"this API key used its quota of {self.tokens_per_day} tokens for today (UTC)",
                               "insufficient_quota", "insufficient_quota", "quota_exceeded", math.ceil(wait))
            if self.requests_per_minute:
                now = self._clock()
                bucket = self._buckets.setdefault(key, TokenBucket(self.burst, self.requests_per_minute / 60.0,
                                                                   self.burst, now))
                wait = bucket.take(now)
                if wait:
                    return Refusal(429, f"rate limit reached: {self.requests_per_minute:g} requests per minute "
                                   f"(bursts of {self.burst}) per API key", "rate_limit_error",
                                   "rate_limit_exceeded", "rate_limited", max(1, math.ceil(wait)))
        return None

    def charge(self, key: str | None, tokens: int) -> None:
        """Count `tokens` against the key's daily quota; a no-op when keys are off (key None)."""
        if key is None or tokens <= 0:
            return
        with self._lock:
            self._used[key] = (self._today(), self._used_today(key) + tokens)

    def used_today(self, key: str) -> int:
        with self._lock:
            return self._used_today(key)

    def _today(self) -> int:
        return int(self._wall_clock() // SECONDS_PER_DAY)

    def _used_today(self, key: str) -> int:
        day, used = self._used.get(key, (-1, 0))
        return used if day == self._today() else 0


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


class AuthMiddleware:
    def __init__(self, app: ASGIApp, access: KeyAccess, metrics: Metrics) -> None:
        self.app, self.access, self.metrics = app, access, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.access.enabled or not scope["path"].startswith(PROTECTED_PREFIX):
            await self.app(scope, receive, send)
            return
        authorization = _header(scope, b"authorization")
        key = self.access.identify(authorization)
        if key is None:
            self.metrics.rejections.labels("unauthenticated", "").inc()
            message = ("invalid API key" if authorization else
                       "missing API key: send the header 'Authorization: Bearer <key>'")
            await send_error(send, 401, message, "invalid_request_error", "invalid_api_key",
                             {"WWW-Authenticate": "Bearer"}, request_id_of(scope))
            return
        refusal = self.access.admit(key)
        if refusal is not None:
            self.metrics.rejections.labels(refusal.reason, "").inc()
            await send_error(send, refusal.status, refusal.message, refusal.type, refusal.code,
                             {"Retry-After": str(refusal.retry_after_s)}, request_id_of(scope))
            return
        scope.setdefault("state", {})[API_KEY_STATE] = key
        await self.app(scope, receive, send)
