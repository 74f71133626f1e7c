"""The disk tier: codec bytes in a diskcache directory, shared by processes, never trusted.

diskcache is SQLite in WAL mode plus one file per large value; it is thread- and process-safe, and a
process killed mid-write leaves either the old row or the new one (SQLite transactions) plus, at
worst, an orphaned value file. On top of it:

- Values are raw bytes from `codec.encode` (checksummed, bound to their key) and keys are hex
  strings; nothing is pickled either way, and waits on a locked database are bounded by `timeout_s`
  (diskcache's default is 60 s) (`guarded_diskcache.py`).
- Every error is a miss. A full disk makes every write raise `sqlite3.OperationalError`; a locked
  database raises `diskcache.Timeout`; a damaged file raises `sqlite3.DatabaseError` or `OSError`; a
  damaged row raises whatever diskcache's internals trip on. None of it may fail a request, so the
  I/O calls below catch `Exception`, count it, and report a miss (read) or drop the write.
- After `failures_to_disable` failures in a row, reads or writes switch themselves off for
  `cooldown_s` (`breaker.py`; apart, because a full disk fails every write but still serves reads):
  a dead disk should cost one failed call per cool-down, not a timeout on every request. When reads
  trip, the handle is dropped too, and the next call after the cool-down reopens the directory.
- A damaged entry (`CorruptEntry`) is a miss, is deleted, and is counted.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

import diskcache
import torch

from cache import codec
from cache.breaker import Breaker
from cache.codec import CorruptEntry, Tensors
from cache.guarded_diskcache import open_cache

log = logging.getLogger("mmserve.cache")

COUNTERS = (
    "hits", "misses", "writes", "skipped_writes", "corrupt_entries",
    "open_errors", "read_errors", "write_errors", "times_disabled",
)


class DiskTier:
    """A size-bounded, least-recently-used directory of codec entries that degrades to a no-op."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        size_limit_bytes: int,
        *,
        timeout_s: float = 1.0,
        failures_to_disable: int = 3,
        cooldown_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if size_limit_bytes <= 0:
            raise ValueError(f"size_limit_bytes must be > 0, got {size_limit_bytes}")
        if failures_to_disable < 1 or cooldown_s < 0 or timeout_s <= 0:
            raise ValueError("failures_to_disable must be >= 1, cooldown_s >= 0 and timeout_s > 0")
        self.directory = os.fspath(directory)
        self.size_limit_bytes = size_limit_bytes
        self.timeout_s, self.cooldown_s = timeout_s, cooldown_s
        self._clock = clock
        self._lock = threading.Lock()  # guards the handle, the breakers and the counters
        self._cache: diskcache.Cache | None = None
        self._breakers = {op: Breaker(failures_to_disable, cooldown_s) for op in ("read", "write")}
        self._counts = dict.fromkeys(COUNTERS, 0)
        self._handle("read")  # open now, so a bad directory shows up in stats (and the log) at start

    # -- the two operations -----------------------------------------------------------------------
    def get(self, key: str) -> Tensors | None:
        """The entry's tensors (fresh, owned by the caller), or None on a miss of any kind."""
        cache = self._handle("read") if self.readable else None
        data = None
        if cache is not None:
            try:
                data = cache.get(key, default=None, retry=False)
                self._succeeded("read")
            except CorruptEntry as error:  # a row in a mode we refuse to load
                self._succeeded("read")
                self._discard_corrupt(cache, key, error)
            except Exception as error:  # noqa: BLE001 - every disk error is a miss (module docstring)
                self._failed("read", "read", error)
        tensors = self._decode(cache, key, data) if data is not None else None
        self._count("misses" if tensors is None else "hits")
        return tensors

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Store the entry; False if it was not stored (writes off, too large, or a disk error)."""
        cache = self._handle("write") if self.writable else None
        if cache is None:
            self._count("skipped_writes")
            return False
        data = codec.encode(tensors, key=key)
        if len(data) > self.size_limit_bytes:
            self._count("skipped_writes")
            return False
        try:
            cache.set(key, data, retry=False)
        except Exception as error:  # noqa: BLE001 - a full or broken disk drops the write
            self._failed("write", "write", error)
            return False
        self._succeeded("write")
        self._count("writes")
        return True

    # -- state ------------------------------------------------------------------------------------
    @property
    def readable(self) -> bool:
        """False while reads are switched off after repeated failures."""
        return self._breakers["read"].allows(self._clock())

    @property
    def writable(self) -> bool:
        """False while writes are switched off after repeated failures."""
        return self._breakers["write"].allows(self._clock())

    def stats(self) -> dict[str, int | bool]:
        volume = 0
        cache = self._cache
        if cache is not None and self.readable:
            try:
                volume = int(cache.volume())
            except Exception:  # noqa: BLE001 - stats must not fail either
                volume = 0
        with self._lock:
            counts = {f"disk_{name}": value for name, value in self._counts.items()}
        state = {"disk_enabled": True, "disk_readable": self.readable, "disk_writable": self.writable}
        return state | {"disk_bytes": volume} | counts

    @staticmethod
    def absent_stats() -> dict[str, int | bool]:
        """The same counters, all zero, for a cache configured without a disk tier."""
        state = {"disk_enabled": False, "disk_readable": False, "disk_writable": False}
        return state | {"disk_bytes": 0} | {f"disk_{name}": 0 for name in COUNTERS}

    def close(self) -> None:
        with self._lock:
            cache, self._cache = self._cache, None
        _close_quietly(cache)

    # -- internals --------------------------------------------------------------------------------
    def _handle(self, operation: str) -> diskcache.Cache | None:
        """The open cache, opening it if needed; None if it cannot be opened (a failed `operation`)."""
        with self._lock:
            if self._cache is not None:
                return self._cache
        try:
            # Opened outside the lock: opening may wait up to timeout_s on a locked database.
            cache = open_cache(self.directory, self.size_limit_bytes, self.timeout_s)
        except Exception as error:  # noqa: BLE001 - an unusable directory means no disk tier
            self._failed(operation, "open", error)
            return None
        with self._lock:
            if self._cache is None:
                self._cache = cache
                return cache
            winner = self._cache
        _close_quietly(cache)  # another thread opened it first
        return winner

    def _decode(self, cache: diskcache.Cache | None, key: str, data: object) -> Tensors | None:
        try:
            return codec.decode(data, expected_key=key)  # type: ignore[arg-type]
        except CorruptEntry as error:
            self._discard_corrupt(cache, key, error)
            return None

    def _discard_corrupt(self, cache: diskcache.Cache | None, key: str, error: CorruptEntry) -> None:
        log.warning("feature cache: dropping a corrupt disk entry %s: %s", key, error)
        self._count("corrupt_entries")
        if cache is None:
            return
        try:
            cache.delete(key, retry=False)
        except Exception as delete_error:  # noqa: BLE001
            self._failed("write", "write", delete_error)

    def _count(self, name: str) -> None:
        with self._lock:
            self._counts[name] += 1

    def _succeeded(self, operation: str) -> None:
        with self._lock:
            self._breakers[operation].succeeded()

    def _failed(self, operation: str, stage: str, error: Exception) -> None:
        """`operation` (read or write) failed at `stage` (open, read or write)."""
        with self._lock:
            self._counts[f"{stage}_errors"] += 1
            if not self._breakers[operation].failed(self._clock()):
                log.debug("feature cache: disk %s failed: %r", stage, error)
                return
            self._counts["times_disabled"] += 1
            cache = None
            if operation == "read":  # reopen from scratch after the cool-down; a full disk still
                cache, self._cache = self._cache, None  # reads through the handle it has
        log.warning(
            "feature cache: disk %ss at %s off for %.0f s after repeated failures (last, on %s: %r)",
            operation, self.directory, self.cooldown_s, stage, error,
        )
        _close_quietly(cache)


def _close_quietly(cache: diskcache.Cache | None) -> None:
    if cache is None:
        return
    try:
        cache.close()
    except Exception:  # noqa: BLE001 - closing a broken handle may fail too; nothing to do about it
        pass
