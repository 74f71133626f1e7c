"""A hypothesis state machine over FeatureCache with a small hot tier and a disk tier in a temp dir.

Rules: put, get, damage one stored entry through diskcache (garbage, a flipped byte, a torn value,
another key's valid entry, a planted pickle), flip or truncate bytes in the files themselves, drop
the hot tier, reopen the cache on the same directory.

The invariant: a get returns exactly the features its key implies (values are a deterministic function
of the key, as with real content-hashed keys) or a miss; a key never stored always misses. While the
directory is undamaged, a stored key must also hit. After damage to one entry only that key may miss
(until stored again); after damage to the files themselves anything may miss, but nothing may be wrong.

The SQLite `-shm` file is left alone: it is the live shared-memory index of open connections, rebuilt
on open, not data at rest.
"""

from __future__ import annotations

import pickle
import shutil
import sqlite3
import tempfile
from contextlib import closing
from pathlib import Path

import diskcache
import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cache import FeatureCache, FeatureKey, image_digest
from cache.codec import encode

N_KEYS = 4
HOT_BYTES = 48 * 1024  # holds one large entry, or a few small ones
KEYS = [FeatureKey(image_digest(b"image %d" % i), "sm-encoder", "weights", {"size": 8}) for i in range(N_KEYS)]


def features(i: int) -> dict[str, torch.Tensor]:
    """Even keys are large (40 KB: a diskcache value file), odd keys small (inline in SQLite)."""
    generator = torch.Generator().manual_seed(i)
    rows = 10_000 if i % 2 == 0 else 50
    return {
        "tokens": torch.randn(rows, generator=generator),
        "pooled": torch.randn(4, generator=generator).to(torch.bfloat16),
        "mask": torch.arange(3) % (i + 2) == 0,
    }


EXPECTED = [features(i) for i in range(N_KEYS)]


def is_expected(got: dict[str, torch.Tensor], i: int) -> bool:
    want = EXPECTED[i]
    if list(got) != list(want):
        return False
    return all(got[n].dtype == want[n].dtype and torch.equal(got[n], want[n]) for n in want)


class FeatureCacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.directory = Path(tempfile.mkdtemp(prefix="mmserve-cache-sm-"))
        self.cache = self._open()
        self.stored: set[int] = set()  # keys put at least once
        self.maybe_lost: set[int] = set()  # keys whose disk entry was damaged since their last put
        self.files_damaged = False

    def _open(self) -> FeatureCache:
        return FeatureCache(hot_bytes=HOT_BYTES, disk_dir=self.directory, disk_bytes=1 << 26, disk_timeout_s=2.0)

    @rule(i=st.integers(0, N_KEYS - 1))
    def put(self, i: int) -> None:
        self.cache.put(KEYS[i], EXPECTED[i])
        self.stored.add(i)
        self.maybe_lost.discard(i)

    @rule(i=st.integers(0, N_KEYS - 1))
    def get(self, i: int) -> None:
        got = self.cache.get(KEYS[i])
        if got is not None:
            assert i in self.stored, f"key {i} was never stored but got a hit"
            assert is_expected(got, i), f"wrong features for key {i}"
        elif i in self.stored and i not in self.maybe_lost and not self.files_damaged:
            raise AssertionError(f"key {i} was stored, nothing was damaged, yet it missed")

    @rule()
    def get_every_key(self) -> None:
        for i in range(N_KEYS):
            self.get(i)

    @rule(i=st.integers(0, N_KEYS - 1), damage=st.sampled_from(["garbage", "flip", "torn", "other_key", "pickle"]))
    def damage_one_entry(self, i: int, damage: str) -> None:
        """Overwrite one entry's stored value through diskcache itself, as a buggy or hostile writer."""
        digest, other = KEYS[i].digest(), (i + 1) % N_KEYS
        try:
            with diskcache.Cache(self.directory) as raw:
                current = raw.get(digest)
                if not isinstance(current, bytes):  # nothing there: damage another key's valid entry
                    current = encode(EXPECTED[other], key=KEYS[other].digest())
                if damage == "garbage":
                    raw.set(digest, b"\x00garbage" * 10)
                elif damage == "flip":
                    at = len(current) - 40  # inside the tensor bytes
                    raw.set(digest, current[:at] + bytes([current[at] ^ 0x10]) + current[at + 1 :])
                elif damage == "torn":
                    raw.set(digest, current[: len(current) // 2])
                elif damage == "other_key":
                    raw.set(digest, encode(EXPECTED[other], key=KEYS[other].digest()))
                else:
                    raw.set(digest, pickle.dumps(EXPECTED[i]))
        except Exception:  # noqa: BLE001 - the files may already be too damaged to open
            return
        self.maybe_lost.add(i)

    @rule(
        which=st.sampled_from(["cache.db", "cache.db-wal", "value file"]),
        i=st.integers(0, N_KEYS - 1),
        offset=st.floats(0, 1),
        mask=st.integers(1, 255),
        truncate=st.booleans(),
    )
    def damage_the_files(self, which: str, i: int, offset: float, mask: int, truncate: bool) -> None:
        """Flip a byte of the database, its write-ahead log or key i's value file, or tear the value
        file. The file is named by its role, not picked from a listing: value file names are random,
        and hypothesis must be able to replay a failure."""
        path = self.directory / which if which != "value file" else self._value_file(i)
        if path is None or not path.is_file() or path.stat().st_size == 0:
            return
        position = min(int(offset * path.stat().st_size), path.stat().st_size - 1)
        with open(path, "r+b") as f:
            if truncate and which == "value file":
                f.truncate(position)
            else:
                f.seek(position)
                byte = f.read(1)[0]
                f.seek(position)
                f.write(bytes([byte ^ mask]))
        self.files_damaged = True

    def _value_file(self, i: int) -> Path | None:
        try:
            with closing(sqlite3.connect(f"file:{self.directory / 'cache.db'}?mode=ro", uri=True)) as db:
                row = db.execute("SELECT filename FROM Cache WHERE key = ?", (KEYS[i].digest(),)).fetchone()
        except (sqlite3.Error, UnicodeDecodeError):  # a damaged database; diskcache sees the same errors
            return None
        return self.directory / row[0] if row and row[0] else None

    @rule()
    def drop_hot_tier(self) -> None:
        self.cache.clear_hot_tier()

    @rule()
    def reopen(self) -> None:
        self.cache.close()
        self.cache = self._open()

    @invariant()
    def hot_tier_within_budget(self) -> None:
        assert self.cache.stats()["hot_bytes"] <= HOT_BYTES

    def teardown(self) -> None:
        self.cache.close()
        shutil.rmtree(self.directory, ignore_errors=True)


FeatureCacheMachine.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestFeatureCacheMachine = FeatureCacheMachine.TestCase
