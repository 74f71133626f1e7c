"""A full, locked or unusable disk never fails a request: the cache serves from the hot tier (or
computes), counts the disk errors, and picks the disk back up once it works again."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import diskcache
import pytest
import torch

from cache import FeatureCache, FeatureKey, image_digest

MB = 1 << 20


def key_for(i: int) -> FeatureKey:
    return FeatureKey(image_digest(b"image %d" % i), "demo-cnn", "ab" * 32, {"size": 128})


def features(i: int) -> dict[str, torch.Tensor]:
    return {"tokens": torch.full((1000,), float(i))}  # 4 KB: stored inside SQLite, not as a file


def serve_twice(cache: FeatureCache, n: int) -> list[str]:
    """Every request succeeds, first computed and then from memory, whatever the disk does."""
    sources = []
    for _ in range(2):
        for i in range(n):
            tensors, source = cache.get_or_compute(key_for(i), lambda i=i: features(i))
            assert torch.equal(tensors["tokens"], features(i)["tokens"])
            sources.append(source)
    return sources


def test_writes_failing_with_disk_full_are_counted_and_swallowed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    def disk_full(self: diskcache.Cache, *args: object, **kwargs: object) -> bool:
        raise sqlite3.OperationalError("database or disk is full")

    cache = FeatureCache(hot_bytes=MB, disk_dir=tmp_path)
    cache.put(key_for(100), features(100))  # stored while the disk still had room
    monkeypatch.setattr(diskcache.Cache, "set", disk_full)
    assert serve_twice(cache, 5) == ["computed"] * 5 + ["hot"] * 5
    stats = cache.stats()
    assert stats["disk_write_errors"] == 3 and stats["disk_skipped_writes"] == 2  # off after 3 in a row
    assert stats["disk_times_disabled"] == 1 and not stats["disk_writable"]
    assert stats["computes"] == 5 and stats["hot_hits"] == 5
    cache.clear_hot_tier()  # a full disk still serves what it holds
    assert cache.get_or_compute(key_for(100), lambda: pytest.fail("on disk"))[1] == "disk"
    assert cache.stats()["disk_readable"]


def test_a_database_that_really_fills_up(tmp_path: Path):
    """SQLite's own SQLITE_FULL, from a page cap that diskcache applies on every connection."""
    with diskcache.Cache(tmp_path) as raw:
        ((pages,),) = raw._sql("PRAGMA page_count").fetchall()
    with diskcache.Cache(tmp_path, sqlite_max_page_count=pages + 3):
        pass
    cache = FeatureCache(hot_bytes=MB, disk_dir=tmp_path)
    assert serve_twice(cache, 6) == ["computed"] * 6 + ["hot"] * 6
    stats = cache.stats()
    assert stats["disk_writes"] >= 1 and stats["disk_write_errors"] >= 1
    with diskcache.Cache(tmp_path) as raw:
        stored = [i for i in range(6) if key_for(i).digest() in raw]
    assert stored and len(stored) < 6
    reader = FeatureCache(hot_bytes=0, disk_dir=tmp_path)  # what did get written reads back intact
    for i in stored:
        tensors = reader.get(key_for(i))
        assert tensors is not None and torch.equal(tensors["tokens"], features(i)["tokens"])


def test_a_directory_that_cannot_be_opened_leaves_the_hot_tier(tmp_path: Path):
    not_a_directory = tmp_path / "file"
    not_a_directory.write_bytes(b"in the way")
    cache = FeatureCache(hot_bytes=MB, disk_dir=not_a_directory)
    assert serve_twice(cache, 3) == ["computed"] * 3 + ["hot"] * 3
    stats = cache.stats()
    assert stats["disk_open_errors"] >= 3 and stats["disk_writes"] == 0
    assert not stats["disk_readable"] and not stats["disk_writable"]


def test_a_locked_database_is_a_miss_and_the_tier_recovers(tmp_path: Path):
    cache = FeatureCache(hot_bytes=MB, disk_dir=tmp_path, disk_timeout_s=0.05, disk_cooldown_s=0.3)
    cache.put(key_for(0), features(0))
    cache.clear_hot_tier()
    locker = sqlite3.connect(tmp_path / "cache.db", isolation_level=None)
    locker.execute("BEGIN IMMEDIATE")  # another process holding the write lock indefinitely
    try:
        start = time.monotonic()
        assert serve_twice(cache, 3) == ["computed"] * 3 + ["hot"] * 3  # key 0 could not even be read
        assert time.monotonic() - start < 5  # bounded waits, not diskcache's 60 s retry on reopen
        stats = cache.stats()
        assert stats["disk_read_errors"] + stats["disk_write_errors"] >= 3 and not stats["disk_writable"]
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    time.sleep(0.35)  # cool-down over
    cache.clear_hot_tier()
    tensors, source = cache.get_or_compute(key_for(0), lambda: pytest.fail("on disk"))
    assert source == "disk" and torch.equal(tensors["tokens"], features(0)["tokens"])
    cache.put(key_for(1), features(1))
    assert cache.stats()["disk_writable"] and cache.stats()["disk_writes"] == 2


def test_a_disk_error_on_read_is_a_miss(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    cache = FeatureCache(hot_bytes=0, disk_dir=tmp_path)
    cache.put(key_for(0), features(0))

    def broken(self: diskcache.Cache, *args: object, **kwargs: object) -> object:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(diskcache.Cache, "get", broken)
    assert cache.get(key_for(0)) is None
    assert cache.stats()["disk_read_errors"] == 1
    monkeypatch.undo()
    assert cache.get(key_for(0)) is not None
