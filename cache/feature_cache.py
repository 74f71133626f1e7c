"""The two-tier feature cache: hot (in-process LRU) over disk (shared directory), plus single-flight.

A lookup tries the hot tier, then the disk tier; a disk hit is promoted to the hot tier. A store
goes to both. The disk tier is optional and may switch itself off after repeated failures, in which
case the cache carries on with the hot tier alone: the cache can make a request faster, never fail it.

`get_or_compute` is what the serving path calls. Concurrent calls for the same missing key run
`compute` once (single-flight) and all get its result; if it raises, all of them raise and nothing is
stored. Every caller gets its own copy of the tensors and may edit them freely.

Keys are content addresses (`FeatureKey`): one key always names the same features, so "the value last
stored for this key" and "the value this key implies" are the same thing.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Literal

import torch

from cache.codec import Tensors, validate_tensors
from cache.disk_tier import DiskTier
from cache.hot_tier import HotTier, clone_tensors
from cache.key import FeatureKey
from cache.single_flight import SingleFlight

Source = Literal["hot", "disk", "computed"]


class FeatureCache:
    """`hot_bytes`: memory budget of the hot tier (0: none). `disk_dir`: the disk tier's directory
    (None: no disk tier). `disk_bytes`: its size limit. The `disk_*` keywords tune its failure
    handling (see `DiskTier`)."""

    def __init__(
        self,
        hot_bytes: int,
        disk_dir: str | os.PathLike[str] | None = None,
        disk_bytes: int = 1 << 30,
        *,
        disk_timeout_s: float = 1.0,
        disk_failures_to_disable: int = 3,
        disk_cooldown_s: float = 30.0,
    ) -> None:
        self._hot = HotTier(hot_bytes)
        self._disk = (
            DiskTier(
                disk_dir,
                disk_bytes,
                timeout_s=disk_timeout_s,
                failures_to_disable=disk_failures_to_disable,
                cooldown_s=disk_cooldown_s,
            )
            if disk_dir is not None
            else None
        )
        self._flights: SingleFlight[tuple[Tensors, Source]] = SingleFlight()
        self._lock = threading.Lock()  # guards the compute counters
        self._computes = self._compute_errors = 0
        self._compute_seconds = 0.0

    # -- lookups and stores -----------------------------------------------------------------------
    def get(self, key: FeatureKey) -> Tensors | None:
        found = self._lookup(key.digest())
        return None if found is None else found[0]

    def put(self, key: FeatureKey, tensors: Mapping[str, torch.Tensor]) -> None:
        """Store in both tiers. Raises TypeError/ValueError for what the cache cannot hold (see
        `codec.validate_tensors`); a disk failure is counted, never raised."""
        validate_tensors(tensors)
        self._store(key.digest(), tensors)

    def get_or_compute(
        self, key: FeatureKey, compute: Callable[[], Mapping[str, torch.Tensor]]
    ) -> tuple[Tensors, Source]:
        """The features for `key` and where they came from: "hot", "disk", or "computed" (also for a
        caller that waited on another's computation of the same key)."""
        digest = key.digest()
        tensors = self._hot.get(digest)
        if tensors is not None:
            return tensors, "hot"
        shared, _ = self._flights.run(digest, lambda: self._fill(digest, compute))
        return clone_tensors(shared[0]), shared[1]

    def _lookup(self, digest: str) -> tuple[Tensors, Source] | None:
        tensors = self._hot.get(digest)
        if tensors is not None:
            return tensors, "hot"
        return self._from_disk(digest)

    def _from_disk(self, digest: str) -> tuple[Tensors, Source] | None:
        tensors = self._disk.get(digest) if self._disk is not None else None
        if tensors is None:
            return None
        self._hot.put(digest, tensors)
        return tensors, "disk"

    def _fill(self, digest: str, compute: Callable[[], Mapping[str, torch.Tensor]]) -> tuple[Tensors, Source]:
        """Runs once per flight. The uncounted second look at the hot tier catches a flight for this
        key that landed between our hot miss and the start of ours."""
        tensors = self._hot.peek(digest)
        if tensors is not None:
            return tensors, "hot"
        found = self._from_disk(digest)
        if found is not None:
            return found
        computed = self._compute(compute)
        self._store(digest, computed)
        return computed, "computed"

    def _compute(self, compute: Callable[[], Mapping[str, torch.Tensor]]) -> Tensors:
        start = time.perf_counter()
        try:
            tensors = compute()
            validate_tensors(tensors)
        except BaseException:
            with self._lock:
                self._compute_errors += 1
                self._compute_seconds += time.perf_counter() - start
            raise
        with self._lock:
            self._computes += 1
            self._compute_seconds += time.perf_counter() - start
        return dict(tensors)

    def _store(self, digest: str, tensors: Mapping[str, torch.Tensor]) -> None:
        self._hot.put(digest, tensors)
        if self._disk is not None:
            self._disk.put(digest, tensors)

    # -- housekeeping -----------------------------------------------------------------------------
    def clear_hot_tier(self) -> None:
        """Forget the in-memory entries (the disk tier keeps its own)."""
        self._hot.clear()

    def stats(self) -> dict[str, int | float | bool]:
        with self._lock:
            computes = {
                "computes": self._computes,
                "compute_errors": self._compute_errors,
                "compute_seconds": self._compute_seconds,
            }
        return {
            **self._hot.stats(),
            **(self._disk.stats() if self._disk is not None else DiskTier.absent_stats()),
            **computes,
            "in_flight": self._flights.in_flight(),
        }

    def close(self) -> None:
        if self._disk is not None:
            self._disk.close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
