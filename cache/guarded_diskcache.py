"""diskcache, narrowed to what the disk tier needs: bytes only, never pickle, bounded waits.

`BytesOnlyDisk` is diskcache's serialiser restricted to str keys and bytes values. diskcache pickles
every other value, and unpickles any row stored in pickle mode; whoever can write the cache directory
could then run code in the server (RELIABILITY, "cache"). This one refuses to store anything but
bytes and refuses to load a row in any mode but raw bytes: such a row is a `CorruptEntry`.

`open_cache` opens a `diskcache.Cache` with the settings the tier relies on, through
`_BoundedWaitCache`. diskcache's setup statements retry a locked database for 60 s (its
`_sql_retry`, diskcache 5.6.x); a request that reopens the directory while another process holds the
write lock would hang that long. The subclass retries for `timeout_s`, then raises. It overrides a
private property of a pinned dependency: re-check it when diskcache is upgraded (tests/
test_cache_broken_disk.py::test_a_locked_database_is_a_miss_and_the_tier_recovers times it).

`sqlite_mmap_size=0`: with memory-mapped reads an I/O error on the database file arrives as SIGBUS
and kills the process (SQLite docs, "Memory-Mapped I/O"); with plain reads it is an exception.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable

import diskcache
from diskcache.core import MODE_BINARY, MODE_RAW, UNKNOWN

from cache.codec import CorruptEntry


class BytesOnlyDisk(diskcache.Disk):
    def put(self, key: object) -> tuple[object, bool]:
        if type(key) is not str:
            raise TypeError(f"disk tier keys are hex strings, got {type(key).__name__}")
        return super().put(key)

    def get(self, key: object, raw: bool) -> object:
        if not raw:
            raise CorruptEntry("row holds a pickled key")
        return super().get(key, raw)

    def store(self, value: object, read: bool, key: object = UNKNOWN) -> tuple:
        if type(value) is not bytes or read:
            raise TypeError(f"disk tier values are bytes, got {type(value).__name__}")
        return super().store(value, read, key=key)

    def fetch(self, mode: int, filename: str | None, value: object, read: bool) -> object:
        if mode not in (MODE_RAW, MODE_BINARY) or read:
            raise CorruptEntry(f"row is stored in mode {mode}, not raw bytes")
        return super().fetch(mode, filename, value, read)


class _BoundedWaitCache(diskcache.Cache):
    def __init__(self, directory: str, *, timeout_s: float, **settings: object) -> None:
        self._locked_retry_s = timeout_s  # read by _sql_retry, which __init__ below already uses
        super().__init__(directory, timeout=timeout_s, disk=BytesOnlyDisk, **settings)

    @property
    def _sql_retry(self) -> Callable[..., sqlite3.Cursor]:
        sql, give_up_after = self._sql, self._locked_retry_s

        def execute_with_bounded_retry(statement: str, *args: object, **kwargs: object) -> sqlite3.Cursor:
            start = time.monotonic()
            while True:
                try:
                    return sql(statement, *args, **kwargs)
                except sqlite3.OperationalError as error:
                    if str(error) != "database is locked" or time.monotonic() - start > give_up_after:
                        raise
                    time.sleep(0.001)

        return execute_with_bounded_retry


def open_cache(directory: str, size_limit_bytes: int, timeout_s: float) -> diskcache.Cache:
    """A least-recently-used diskcache of at most `size_limit_bytes`, waiting at most about
    `timeout_s` on a locked database anywhere (setup included)."""
    return _BoundedWaitCache(
        directory,
        timeout_s=timeout_s,
        size_limit=size_limit_bytes,
        eviction_policy="least-recently-used",
        sqlite_mmap_size=0,
    )
