"""Image K/V, computed once per feature digest and kept while any live request uses them; released
ones stay, least recently used first out, within a byte budget, so the next turn of a conversation,
or another request showing the same image, finds them ready.

They live in an arena preallocated at start, as the self-attention KV pool is: per cross-attention
layer one K and one V tensor of `capacity` token slots, an image taking a contiguous range of them,
head-major ([kv_heads, N, head_dim], what decode attention reads fastest: llm/attention.py
`head_major`). Why preallocate: a batch captioning step projects 64 images x 12 layers of K/V, 800
MB; into freshly mapped memory the writes ran at 0.5 GB/s on this class of VM (every page faulted
in, many never touched since boot), 1.9 s of a 4.0 s first step, 0.1 s into the arena. Images
projected together get adjacent ranges, so a step's decode rows read them as one [B, ...] view with
no copy; each image's range goes back to the free list on its own when it is evicted.

When the arena has no contiguous room even after evicting every unheld image (all of it held by
live requests, or fragmented), a batch gets ordinary tensors instead: correct, only slower, and
counted in the same budget.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from llm.attention import KVShape
from llm.kv_cache import KV, QuantizedKV, bytes_per_token, zeros

CrossKV = list[tuple[KV, KV]]  # per cross-attention layer: K, V [kv_heads, N, head_dim] (a tensor or int8)


class TokenRanges:
    """First-fit allocator of contiguous ranges in [0, capacity); plain Python, adjacent free ranges
    merged on free."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._starts: list[int] = [0] if capacity else []  # free ranges, sorted by start
        self._lengths: list[int] = [capacity] if capacity else []

    @property
    def free(self) -> int:
        return sum(self._lengths)

    def free_ranges(self) -> list[tuple[int, int]]:
        return list(zip(self._starts, self._lengths))

    def fits(self, n: int) -> bool:
        return any(length >= n for length in self._lengths)

    def allocate(self, n: int) -> int | None:
        """The start of a free range of n slots, now used; None when no free range is that long."""
        for i, length in enumerate(self._lengths):
            if length >= n:
                start = self._starts[i]
                if length == n:
                    del self._starts[i], self._lengths[i]
                else:
                    self._starts[i], self._lengths[i] = start + n, length - n
                return start
        return None

    def release(self, start: int, n: int) -> None:
        i = bisect.bisect_left(self._starts, start)
        if (i < len(self._starts) and self._starts[i] < start + n) or (
                i > 0 and self._starts[i - 1] + self._lengths[i - 1] > start) or start + n > self.capacity:
            raise ValueError(f"range {start}+{n} is not in use")
        if i > 0 and self._starts[i - 1] + self._lengths[i - 1] == start:  # merge with the range before
            i -= 1
            self._lengths[i] += n
        else:
            self._starts.insert(i, start)
            self._lengths.insert(i, n)
        if i + 1 < len(self._starts) and self._starts[i] + self._lengths[i] == self._starts[i + 1]:
            self._lengths[i] += self._lengths.pop(i + 1)
            del self._starts[i + 1]


@dataclass
class _Entry:
    kv: CrossKV
    start: int | None  # first arena slot; None: outside the arena
    tokens: int


class CrossKVPool:
    """Image K/V by feature digest, reference-counted by live requests, LRU among the unreferenced.

        start, dest = pool.reserve(len(digests), num_tokens)  # per layer K, V [B, kv_heads, N, head_dim]
        model.cross_kv(image_tokens, out=dest)                 # the model writes them in place
        pool.put(digests, start, dest)
    """

    def __init__(self, budget_bytes: int, shape: KVShape, dtype: torch.dtype, device: torch.device) -> None:
        """`dtype`: a float, or torch.int8 for the quantized format (llm/kv_cache.py)."""
        self.budget_bytes, self.shape, self.dtype, self.device = budget_bytes, shape, dtype, device
        self.token_bytes = bytes_per_token(shape, dtype)
        capacity = budget_bytes // self.token_bytes if self.token_bytes else 0
        # zeros, not empty: the pages are faulted in now, at start, not in a request's first step;
        # [tokens * heads, head_dim] per layer, a range of tokens viewed head-major by `_view`
        per_layer = (capacity * shape.kv_heads, shape.head_dim)
        self._k = [zeros(per_layer, dtype, device) for _ in range(shape.layers)]
        self._v = [zeros(per_layer, dtype, device) for _ in range(shape.layers)]
        self._ranges = TokenRanges(capacity)
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._refs: dict[str, int] = {}
        self.bytes = 0
        self.hits = self.misses = self.evictions = 0

    @property
    def capacity_tokens(self) -> int:
        return self._ranges.capacity

    def __contains__(self, digest: str) -> bool:
        return digest in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def acquire(self, digest: str) -> None:
        self._refs[digest] = self._refs.get(digest, 0) + 1

    def release(self, digest: str) -> None:
        left = self._refs[digest] - 1
        if left:
            self._refs[digest] = left
        else:
            del self._refs[digest]
        self._evict(self._within_budget)

    def get(self, digest: str) -> CrossKV | None:
        entry = self._entries.get(digest)
        if entry is None:
            return None
        self._entries.move_to_end(digest)
        return entry.kv

    def reserve(self, count: int, num_tokens: int) -> tuple[int | None, CrossKV]:
        """Room for `count` images of `num_tokens` tokens each, adjacent: (first slot or None when
        outside the arena, per layer K and V [count, kv_heads, num_tokens, head_dim] to write into)."""
        n = count * num_tokens
        self._evict(lambda: self._ranges.fits(n))
        start = self._ranges.allocate(n)
        size = (count, self.shape.kv_heads, num_tokens, self.shape.head_dim)
        if start is None:
            return None, [(zeros(size, self.dtype, self.device), zeros(size, self.dtype, self.device))
                          for _ in range(self.shape.layers)]
        return start, [(_view(k, start, size), _view(v, start, size)) for k, v in zip(self._k, self._v)]

    def put(self, digests: list[str], start: int | None, kv: CrossKV) -> None:
        """The images `reserve` made room for, now filled: one entry per digest, in order."""
        num_tokens = kv[0][0].shape[2]
        for i, digest in enumerate(digests):
            self._entries[digest] = _Entry([(k[i], v[i]) for k, v in kv],
                                           None if start is None else start + i * num_tokens, num_tokens)
        self.bytes += len(digests) * num_tokens * self.token_bytes
        self._evict(self._within_budget)

    def _within_budget(self) -> bool:
        return self.bytes <= self.budget_bytes

    def _evict(self, enough: Callable[[], bool]) -> None:
        """Drop unheld entries, least recently used first, until `enough()`."""
        for digest in list(self._entries):
            if enough():
                return
            if digest in self._refs:
                continue
            entry = self._entries.pop(digest)
            self.bytes -= entry.tokens * self.token_bytes
            self.evictions += 1
            if entry.start is not None:
                self._ranges.release(entry.start, entry.tokens)


def _view(arena: KV, start: int, size: tuple[int, int, int, int]) -> KV:
    """Token slots start.. of a layer's arena [tokens * heads, head_dim] as `size` images [count,
    heads, tokens, head_dim], each image head-major and contiguous."""
    count, h, n, d = size
    if isinstance(arena, QuantizedKV):
        return QuantizedKV(_view(arena.data, start, size), _view(arena.scale, start, (count, h, n, 1)),
                           _view(arena.zero, start, (count, h, n, 1)))
    return arena.narrow(0, start * h, count * h * n).view(size)
