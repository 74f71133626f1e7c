"""The hot tier: an in-process LRU of tensors, bounded in bytes.

Bounded in bytes rather than entries because feature sizes differ by orders of magnitude between
encoders (a pooled vector vs a 24x24 grid of patch tokens), and memory is what runs out.

Entries are private copies: `put` stores clones and `get` hands out clones, so a caller that edits
its tensors in place (a reduction step, a dtype cast with `out=`) can never change what the next
request sees. Copying a few hundred KB is microseconds; a silently shared buffer is a wrong answer.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping

import torch

Tensors = dict[str, torch.Tensor]


def tensors_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


def clone_tensors(tensors: Mapping[str, torch.Tensor]) -> Tensors:
    return {name: t.detach().clone(memory_format=torch.contiguous_format) for name, t in tensors.items()}


class HotTier:
    """Thread-safe LRU keyed by the hex key digest. A budget of 0 stores nothing."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"budget_bytes must be >= 0, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[str, tuple[Tensors, int]] = OrderedDict()  # front = least recent
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = self.misses = self.evictions = self.too_large = 0

    def get(self, key: str) -> Tensors | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
        # Cloned outside the lock: stored tensors are never mutated, only replaced or dropped.
        return clone_tensors(found[0])

    def peek(self, key: str) -> Tensors | None:
        """Like `get`, but not counted as a hit or a miss: for a second look within one request."""
        with self._lock:
            found = self._entries.get(key)
        return None if found is None else clone_tensors(found[0])

    def put(self, key: str, tensors: Mapping[str, torch.Tensor]) -> bool:
        """Store a private copy; evict least-recently-used entries to make room. An entry larger
        than the whole budget is not stored (it would evict everything and then itself). Returns
        whether the entry was stored."""
        nbytes = tensors_nbytes(tensors)
        if nbytes > self.budget_bytes:
            with self._lock:
                self.too_large += 1
                self._drop(key)  # never leave an older value for this key behind
            return False
        copy = clone_tensors(tensors)
        with self._lock:
            self._drop(key)
            while self._entries and self._bytes + nbytes > self.budget_bytes:
                _, (_, evicted_bytes) = self._entries.popitem(last=False)
                self._bytes -= evicted_bytes
                self.evictions += 1
            self._entries[key] = (copy, nbytes)
            self._bytes += nbytes
        return True

    def discard(self, key: str) -> None:
        with self._lock:
            self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0

    def _drop(self, key: str) -> None:  # caller holds the lock
        found = self._entries.pop(key, None)
        if found is not None:
            self._bytes -= found[1]

    def stats(self) -> dict[str, int]:
        with self._lock:
            return {
                "hot_hits": self.hits,
                "hot_misses": self.misses,
                "hot_bytes": self._bytes,
                "hot_entries": len(self._entries),
                "hot_evictions": self.evictions,
                "hot_too_large": self.too_large,
            }

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        with self._lock:
            return key in self._entries
