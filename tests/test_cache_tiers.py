"""Tests of the two tiers on their own: the hot tier's byte budget and LRU order, the disk tier's
refusal to unpickle, its handling of damaged entries and its cool-down after repeated failures."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import diskcache
import pytest
import torch

from cache.codec import encode
from cache.disk_tier import DiskTier
from cache.hot_tier import HotTier

KB = 1024


def floats(n_bytes: int, fill: float = 1.0) -> dict[str, torch.Tensor]:
    return {"x": torch.full((n_bytes // 4,), fill)}


def hexkey(i: int) -> str:
    return f"{i:064x}"


# -- hot tier -------------------------------------------------------------------------------------
def test_hot_tier_evicts_least_recently_used_within_its_byte_budget():
    hot = HotTier(budget_bytes=3 * KB)
    for name in "abc":
        assert hot.put(name, floats(KB))
    assert hot.get("a") is not None  # a is now the most recent; b the least
    hot.put("d", floats(KB))
    assert "b" not in hot and all(name in hot for name in "acd")
    assert (hot.nbytes, len(hot), hot.evictions) == (3 * KB, 3, 1)


def test_a_big_entry_evicts_as_many_as_it_needs():
    hot = HotTier(budget_bytes=4 * KB)
    for name in "abcd":
        hot.put(name, floats(KB))
    hot.put("big", floats(3 * KB))
    assert [name in hot for name in ("a", "b", "c", "d", "big")] == [False, False, False, True, True]
    assert hot.evictions == 3 and hot.nbytes == 4 * KB


def test_an_entry_larger_than_the_budget_is_not_stored_and_drops_an_older_value():
    hot = HotTier(budget_bytes=2 * KB)
    hot.put("a", floats(KB))
    hot.put("k", floats(KB, fill=1.0))
    assert not hot.put("k", floats(4 * KB, fill=2.0))
    assert "k" not in hot and "a" in hot  # nothing else was evicted for it
    assert hot.too_large == 1 and hot.evictions == 0 and hot.nbytes == KB


def test_replacing_a_key_accounts_bytes_once():
    hot = HotTier(budget_bytes=4 * KB)
    hot.put("k", floats(KB))
    hot.put("k", floats(2 * KB))
    assert hot.nbytes == 2 * KB and len(hot) == 1


def test_hot_tier_hands_out_private_copies():
    hot = HotTier(budget_bytes=KB)
    source = {"x": torch.zeros(4)}
    hot.put("k", source)
    source["x"].add_(1)  # the caller edits its tensor after storing it
    first = hot.get("k")
    assert first is not None and first["x"].tolist() == [0.0] * 4
    first["x"].add_(5)  # and edits what it got back
    assert hot.get("k")["x"].tolist() == [0.0] * 4  # type: ignore[index]


def test_zero_budget_stores_nothing_and_counts():
    hot = HotTier(budget_bytes=0)
    assert not hot.put("k", floats(4))
    assert hot.get("k") is None
    assert hot.stats()["hot_misses"] == 1 and hot.stats()["hot_too_large"] == 1


# -- disk tier ------------------------------------------------------------------------------------
def test_disk_tier_round_trip_and_reopen(tmp_path: Path):
    disk = DiskTier(tmp_path, 1 << 24)
    small, large = floats(KB, 1.5), floats(64 * KB, 2.5)  # inline in SQLite, and a value file
    assert disk.put(hexkey(1), small) and disk.put(hexkey(2), large)
    disk.close()
    reopened = DiskTier(tmp_path, 1 << 24)
    assert torch.equal(reopened.get(hexkey(1))["x"], small["x"])  # type: ignore[index]
    assert torch.equal(reopened.get(hexkey(2))["x"], large["x"])  # type: ignore[index]
    assert reopened.get(hexkey(3)) is None
    assert {k: reopened.stats()[k] for k in ("disk_hits", "disk_misses")} == {"disk_hits": 2, "disk_misses": 1}


def test_values_are_stored_as_raw_codec_bytes(tmp_path: Path):
    disk = DiskTier(tmp_path, 1 << 24)
    disk.put(hexkey(1), floats(KB))
    with diskcache.Cache(tmp_path) as raw:
        assert raw.get(hexkey(1)) == encode(floats(KB), key=hexkey(1))


def test_an_entry_larger_than_the_disk_limit_is_skipped(tmp_path: Path):
    disk = DiskTier(tmp_path, 16 * KB)
    assert not disk.put(hexkey(1), floats(64 * KB))
    assert disk.get(hexkey(1)) is None and disk.stats()["disk_skipped_writes"] == 1


UNPICKLED: list[str] = []


def _record_unpickling() -> str:
    UNPICKLED.append("ran")
    return "payload"


class BoobyTrap:
    """Unpickling this calls `_record_unpickling`: stands in for an attacker's os.system."""

    def __init__(self, padding: int) -> None:
        self.padding = padding

    def __reduce__(self) -> tuple:
        return (_record_unpickling, ()) if self.padding == 0 else (_padded_record, ("p" * self.padding,))


def _padded_record(padding: str) -> str:
    return _record_unpickling()


@pytest.mark.parametrize("padding", [0, 100 * KB])  # a pickle inline in SQLite, and one in a value file
def test_a_pickled_value_planted_in_the_directory_is_never_unpickled(tmp_path: Path, padding: int):
    UNPICKLED.clear()
    disk = DiskTier(tmp_path, 1 << 24)
    with diskcache.Cache(tmp_path) as raw:  # a plain diskcache pickles anything but bytes
        raw.set(hexkey(7), BoobyTrap(padding))
    assert disk.get(hexkey(7)) is None
    assert UNPICKLED == []
    assert disk.stats()["disk_corrupt_entries"] == 1
    with diskcache.Cache(tmp_path) as raw:
        assert hexkey(7) not in raw  # deleted


@pytest.mark.parametrize(
    "planted",
    [
        b"garbage",
        encode(floats(KB), key=hexkey(9)),  # a valid entry of another key
        encode(floats(KB), key=hexkey(1))[:-1],  # torn
        12345,  # a row in raw mode that is not bytes
    ],
)
def test_damaged_entries_are_misses_counted_and_deleted(tmp_path: Path, planted: object):
    disk = DiskTier(tmp_path, 1 << 24)
    with diskcache.Cache(tmp_path) as raw:
        raw.set(hexkey(1), planted)
    assert disk.get(hexkey(1)) is None
    assert disk.stats()["disk_corrupt_entries"] == 1
    assert disk.put(hexkey(1), floats(KB)) and disk.get(hexkey(1)) is not None  # still writable


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_repeated_write_failures_switch_writes_off_for_a_cool_down(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    clock = FakeClock()
    disk = DiskTier(tmp_path, 1 << 24, failures_to_disable=3, cooldown_s=30, clock=clock)
    calls = []

    def full_disk(self: diskcache.Cache, *args: object, **kwargs: object) -> bool:
        calls.append(1)
        raise sqlite3.OperationalError("database or disk is full")

    monkeypatch.setattr(diskcache.Cache, "set", full_disk)
    assert [disk.put(hexkey(i), floats(16)) for i in range(5)] == [False] * 5
    stats = disk.stats()
    assert len(calls) == 3  # the 4th and 5th writes did not touch the disk
    assert (stats["disk_write_errors"], stats["disk_skipped_writes"], stats["disk_times_disabled"]) == (3, 2, 1)
    assert not stats["disk_writable"] and stats["disk_readable"]  # reads are not writes' business
    assert disk.get(hexkey(0)) is None and disk.stats()["disk_misses"] == 1

    clock.now += 31  # cool-down over: one try, which fails, switches it off again at once
    assert not disk.put(hexkey(9), floats(16)) and len(calls) == 4 and not disk.writable

    monkeypatch.undo()
    clock.now += 31
    assert disk.put(hexkey(9), floats(16)) and disk.get(hexkey(9)) is not None
    assert disk.writable and disk.stats()["disk_times_disabled"] == 2


def test_repeated_read_failures_switch_reads_off_and_reopen_after_the_cool_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    clock = FakeClock()
    disk = DiskTier(tmp_path, 1 << 24, failures_to_disable=2, cooldown_s=10, clock=clock)
    disk.put(hexkey(1), floats(16))

    def malformed(self: diskcache.Cache, *args: object, **kwargs: object) -> object:
        raise sqlite3.DatabaseError("database disk image is malformed")

    monkeypatch.setattr(diskcache.Cache, "get", malformed)
    assert [disk.get(hexkey(1)) for _ in range(4)] == [None] * 4
    stats = disk.stats()
    assert (stats["disk_read_errors"], stats["disk_misses"], stats["disk_readable"]) == (2, 4, False)
    monkeypatch.undo()
    clock.now += 11
    assert disk.get(hexkey(1)) is not None and disk.readable
