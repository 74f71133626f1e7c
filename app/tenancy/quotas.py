"""Per-key quotas per minute and per UTC day — requests, tokens, images, pixels — persisted in SQLite.

Every worker process on a host opens the same database (setting usage_db; WAL), so a key's usage is
one number whoever served it, and survives restarts. Two steps per request:

    admit(principal)   one BEGIN IMMEDIATE transaction: read the key's minute and day rows, refuse
                       (429 + Retry-After, OpenAI's shape) if a limit is reached, else count the
                       request. Check and charge are one transaction, so two processes can never both
                       take the last request of a window.
    charge(principal, tokens, images, pixels)   when the request ends (app/tenancy/finalize.py).

Tokens, images and pixels are only known at the end, so admission refuses once they have reached the
limit and a request that started under it is answered in full (a key may overshoot by one request's
worth). A transaction is atomic: a process killed at any instant leaves a request counted once or not
at all. Anonymous requests (an open server) are not counted.
"""

from __future__ import annotations

import math
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

from app.auth import Refusal
from app.tenancy.principal import Limits, Principal

SCHEMA = """
CREATE TABLE IF NOT EXISTS usage (
    key_id TEXT NOT NULL, window TEXT NOT NULL, period INTEGER NOT NULL,
    requests INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0,
    images INTEGER NOT NULL DEFAULT 0, pixels INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (key_id, window, period)) WITHOUT ROWID;
"""
WINDOWS = {"minute": 60, "day": 86_400}
COUNTERS = ("requests", "tokens", "images", "pixels")
KEEP_DAYS = 35  # day rows older than this are pruned


@dataclass(frozen=True, slots=True)
class Usage:
    requests: int = 0
    tokens: int = 0
    images: int = 0
    pixels: int = 0


class QuotaStore:
    def __init__(self, path: Path, busy_timeout_s: float = 10.0, clock: Callable[[], float] = time.time) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._clock = clock
        self._pruned = 0.0

    def close(self) -> None:
        self.conn.close()

    def _periods(self, now: float) -> dict[str, int]:
        return {window: int(now // seconds) for window, seconds in WINDOWS.items()}

    def _read(self, key_id: str, periods: dict[str, int]) -> dict[str, Usage]:
        used = {}
        for window, period in periods.items():
            row = self.conn.execute("SELECT requests, tokens, images, pixels FROM usage WHERE key_id = ? AND "
                                    "window = ? AND period = ?", (key_id, window, period)).fetchone()
            used[window] = Usage(*row) if row else Usage()
        return used

    def _add(self, key_id: str, periods: dict[str, int], usage: Usage) -> None:
        for window, period in periods.items():
            self.conn.execute("INSERT INTO usage (key_id, window, period, requests, tokens, images, pixels) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key_id, window, period) DO UPDATE SET "
                              "requests = requests + excluded.requests, tokens = tokens + excluded.tokens, "
                              "images = images + excluded.images, pixels = pixels + excluded.pixels",
                              (key_id, window, period, usage.requests, usage.tokens, usage.images, usage.pixels))

    def admit(self, principal: Principal) -> Refusal | None:
        """Count one request against the key's windows, or refuse it (nothing counted)."""
        if not principal.key_id:
            return None
        now = self._clock()
        periods = self._periods(now)
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                refusal = _over(principal.limits, self._read(principal.key_id, periods), now)
                if refusal is None:
                    self._add(principal.key_id, periods, Usage(requests=1))
                    if now - self._pruned > 60:
                        self._prune(periods)
                        self._pruned = now
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")
        return refusal

    def charge(self, principal: Principal, tokens: int = 0, images: int = 0, pixels: int = 0) -> None:
        if not principal.key_id or not (tokens or images or pixels):
            return
        periods = self._periods(self._clock())
        with self._lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                self._add(principal.key_id, periods, Usage(0, max(0, tokens), max(0, images), max(0, pixels)))
            except BaseException:
                self.conn.execute("ROLLBACK")
                raise
            self.conn.execute("COMMIT")

    def usage(self, key_id: str) -> dict[str, Usage]:
        """The key's usage in the current minute and UTC day."""
        with self._lock:
            return self._read(key_id, self._periods(self._clock()))

    def _prune(self, periods: dict[str, int]) -> None:
        self.conn.execute("DELETE FROM usage WHERE (window = 'minute' AND period < ?) OR "
                          "(window = 'day' AND period < ?)", (periods["minute"] - 1, periods["day"] - KEEP_DAYS))


def _over(limits: Limits, used: dict[str, Usage], now: float) -> Refusal | None:
    for window, seconds in WINDOWS.items():
        have = used[window]
        for counter in COUNTERS:
            limit = getattr(limits, f"{counter}_per_{window}")
            value = getattr(have, counter)
            if limit and (value + 1 > limit if counter == "requests" else value >= limit):
                wait = math.ceil(seconds - now % seconds)
                where = "this minute" if window == "minute" else "today (UTC)"
                return Refusal(429, f"this API key reached its quota of {limit} {counter} per {window}: "
                               f"{value} used {where}; retry in {wait} s", "insufficient_quota",
                               "insufficient_quota", "quota_exceeded", max(1, wait))
    return None


def limits_dict(limits: Limits) -> dict[str, int]:
    return {f.name: getattr(limits, f.name) for f in fields(Limits)}
