"""Tests of FeatureCache: hot over disk with promotion, private copies, tenant isolation, and
single-flight (one compute for a burst of identical misses; a failure reaches every waiter)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch

from cache import FeatureCache, FeatureKey, image_digest

MB = 1 << 20


def key_for(image: bytes, tenant: str | None = None) -> FeatureKey:
    return FeatureKey(image_digest(image), "demo-cnn", "ab" * 32, {"size": 128}, {"tokens": 64}, tenant_salt=tenant)


def features(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(64, 32, generator=generator)
    return {"tokens": tokens, "pooled": torch.randn(32, generator=generator).bfloat16()}


def same(a: dict[str, torch.Tensor] | None, b: dict[str, torch.Tensor]) -> bool:
    if a is None or list(a) != list(b):
        return False
    return all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in b)


def test_get_or_compute_goes_computed_then_hot_then_disk(tmp_path: Path):
    cache = FeatureCache(hot_bytes=MB, disk_dir=tmp_path, disk_bytes=64 * MB)
    key, expected = key_for(b"img"), features(1)
    assert cache.get(key) is None
    for source in ("computed", "hot"):
        tensors, got = cache.get_or_compute(key, lambda: features(1))
        assert got == source and same(tensors, expected)
    cache.clear_hot_tier()
    tensors, source = cache.get_or_compute(key, lambda: pytest.fail("must not compute"))
    assert source == "disk" and same(tensors, expected)
    assert cache.get_or_compute(key, lambda: pytest.fail("must not compute"))[1] == "hot"  # promoted
    stats = cache.stats()
    assert (stats["computes"], stats["disk_hits"], stats["hot_hits"], stats["hot_entries"]) == (1, 1, 2, 1)
    assert stats["compute_seconds"] > 0 and stats["hot_bytes"] == 64 * 32 * 4 + 32 * 2


def test_a_new_cache_on_the_same_directory_sees_the_entries(tmp_path: Path):
    with FeatureCache(hot_bytes=MB, disk_dir=tmp_path) as first:
        first.put(key_for(b"img"), features(2))
    with FeatureCache(hot_bytes=MB, disk_dir=tmp_path) as second:
        assert same(second.get(key_for(b"img")), features(2))


def test_callers_get_private_copies_from_every_source(tmp_path: Path):
    cache = FeatureCache(hot_bytes=MB, disk_dir=tmp_path)
    key, original = key_for(b"img"), features(3)
    mine = features(3)
    computed, _ = cache.get_or_compute(key, lambda: mine)
    computed["tokens"].zero_()  # the caller edits what it got ...
    mine["pooled"].zero_()  # ... and what it handed to the cache
    hot, _ = cache.get_or_compute(key, lambda: pytest.fail("cached"))
    assert same(hot, original)
    hot["tokens"].add_(1)
    cache.clear_hot_tier()
    from_disk = cache.get(key)
    assert same(from_disk, original)
    from_disk["tokens"].add_(1)  # type: ignore[index]
    assert same(cache.get(key), original)


def test_put_replaces_the_value_on_both_tiers(tmp_path: Path):
    cache = FeatureCache(hot_bytes=MB, disk_dir=tmp_path)
    cache.put(key_for(b"img"), features(4))
    cache.put(key_for(b"img"), features(5))
    assert same(cache.get(key_for(b"img")), features(5))
    cache.clear_hot_tier()
    assert same(cache.get(key_for(b"img")), features(5))


def test_tenants_sending_the_same_image_share_no_entry(tmp_path: Path):
    cache = FeatureCache(hot_bytes=MB, disk_dir=tmp_path)
    image = b"the very same image bytes"
    alice, bob = key_for(image, tenant="alice"), key_for(image, tenant="bob")
    assert alice.image_digest == bob.image_digest and alice.digest() != bob.digest()
    cache.get_or_compute(alice, lambda: features(6))
    assert cache.get(bob) is None
    cache.clear_hot_tier()
    assert cache.get(bob) is None  # not on disk either
    _, source = cache.get_or_compute(bob, lambda: features(7))
    assert source == "computed" and cache.stats()["computes"] == 2
    assert same(cache.get(alice), features(6)) and same(cache.get(bob), features(7))


def test_works_without_a_disk_tier():
    cache = FeatureCache(hot_bytes=MB)
    assert cache.get_or_compute(key_for(b"img"), lambda: features(8))[1] == "computed"
    assert cache.get_or_compute(key_for(b"img"), lambda: features(8))[1] == "hot"
    assert cache.stats()["disk_enabled"] is False


def test_put_refuses_what_it_cannot_store():
    cache = FeatureCache(hot_bytes=MB)
    with pytest.raises(TypeError):
        cache.put(key_for(b"img"), {"tokens": [1.0, 2.0]})  # type: ignore[dict-item]
    with pytest.raises(ValueError):
        cache.get_or_compute(key_for(b"img"), lambda: {"x": torch.zeros(2, dtype=torch.float64)})
    assert cache.get(key_for(b"img")) is None


# -- single-flight --------------------------------------------------------------------------------
def run_threads(n: int, target) -> list:
    """Start n threads at once (barrier) and collect each one's result or exception."""
    barrier, results, lock = threading.Barrier(n), [], threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            outcome = target()
        except Exception as error:  # noqa: BLE001
            outcome = error
        with lock:
            results.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert not any(thread.is_alive() for thread in threads)
    return results


def test_sixteen_threads_asking_for_one_new_key_compute_it_once(tmp_path: Path):
    cache = FeatureCache(hot_bytes=MB, disk_dir=tmp_path)
    computed = []

    def compute() -> dict[str, torch.Tensor]:
        computed.append(threading.get_ident())
        time.sleep(0.2)  # long enough for every thread to arrive while it runs
        return features(9)

    results = run_threads(16, lambda: cache.get_or_compute(key_for(b"popular"), compute))
    assert len(computed) == 1
    assert all(same(tensors, features(9)) for tensors, _ in results)
    assert {source for _, source in results} <= {"computed", "hot"}
    tensors = [t["tokens"] for t, _ in results]
    assert len({t.data_ptr() for t in tensors}) == 16  # each caller its own copy
    assert cache.stats()["computes"] == 1 and cache.stats()["in_flight"] == 0


def test_a_failing_compute_reaches_every_waiter_and_caches_nothing(tmp_path: Path):
    cache = FeatureCache(hot_bytes=MB, disk_dir=tmp_path)
    calls = []

    def compute() -> dict[str, torch.Tensor]:
        calls.append(1)
        time.sleep(0.2)
        raise RuntimeError("encoder exploded")

    results = run_threads(8, lambda: cache.get_or_compute(key_for(b"doomed"), compute))
    assert len(calls) == 1
    assert all(isinstance(r, RuntimeError) and "encoder exploded" in str(r) for r in results)
    assert cache.get(key_for(b"doomed")) is None
    assert cache.stats()["compute_errors"] == 1 and cache.stats()["in_flight"] == 0
    assert cache.get_or_compute(key_for(b"doomed"), lambda: features(10))[1] == "computed"  # retried


def test_different_keys_compute_in_parallel():
    cache = FeatureCache(hot_bytes=MB)
    started = threading.Barrier(2, timeout=10)

    def compute(seed: int) -> dict[str, torch.Tensor]:
        started.wait()  # both computes must be running at once, or this times out
        return features(seed)

    results = []

    def ask(seed: int) -> None:
        results.append(cache.get_or_compute(key_for(b"%d" % seed), lambda: compute(seed)))

    threads = [threading.Thread(target=ask, args=(seed,)) for seed in (11, 12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    assert len(results) == 2 and cache.stats()["computes"] == 2


def test_a_compute_asking_for_its_own_key_fails_instead_of_deadlocking():
    cache = FeatureCache(hot_bytes=MB)
    key = key_for(b"self")
    with pytest.raises(RuntimeError, match="single-flight"):
        cache.get_or_compute(key, lambda: cache.get_or_compute(key, lambda: features(13))[0])
    assert cache.stats()["in_flight"] == 0
