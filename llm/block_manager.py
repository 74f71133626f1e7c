"""Paged self-attention KV-cache bookkeeping: which fixed-size blocks of one pool each sequence owns.

The pool is `num_blocks` blocks of `block_size` token slots. A sequence's `block_table[i]` holds its
tokens i*block_size .. (i+1)*block_size-1. The manager only hands block ids out and takes them back;
the model runner owns the tensors those ids index (STYLE lessons 1-2).

Prefix reuse. Every FULL block has a hash chained from the previous block's hash and its own token
ids; the chain is rooted in the sequence's `extra_key` (the image digest), because in a
cross-attention model each self-attention K/V depends on the image too. A new sequence whose leading
full blocks' hashes are known shares those blocks (ref count + 1) and skips their prefill
(`num_cached_tokens`). SHA-256 rather than Python's `hash`: prompts come from clients, and a forged
64-bit collision would hand one client another's K/V.

A block's hash is registered only once its K/V were computed (`cache_computed_blocks`, called after a
step), never at allocation: a sequence admitted in the same step as an identical one would otherwise
read slots that are still being written.

Freed blocks that carry a hash stay findable until the pool needs them again. The free list is
ordered by eviction: blocks with no hash at the front (nothing is lost by reusing them), hashed blocks
at the back in least-recently-freed order (LRU), a sequence's tail before its head since a tail is
useless once its head is gone.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from llm.sequence import Sequence

BlockHash = bytes


def root_hash(extra_key: str) -> BlockHash:
    return hashlib.sha256(b"mmserve-kv-root\0" + extra_key.encode()).digest()


def chain_hash(parent: BlockHash, token_ids: list[int]) -> BlockHash:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass(slots=True)
class _Block:
    ref_count: int = 0
    hash: BlockHash | None = None  # set once the block is full, computed and the first with this content


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = reused first
        self._cached: dict[BlockHash, int] = {}

    # -- accounting -------------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks no sequence holds, cached ones included (they are evicted on demand)."""
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    def is_cached(self, block_id: int) -> bool:
        return self._blocks[block_id].hash is not None

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation -------------------------------------------------------------------------------
    def can_allocate(self, seq: Sequence) -> bool:
        """Whether `allocate(seq)` would succeed. Cache hits on free blocks still take a free block."""
        hits = self._cache_hits(seq)
        revived = sum(1 for block_id in hits if self._blocks[block_id].ref_count == 0)
        fresh = self.blocks_needed(seq.num_tokens) - len(hits)
        return fresh + revived <= len(self._free)

    def allocate(self, seq: Sequence) -> int:
        """Give a sequence with no blocks slots for all its `num_tokens` tokens (the whole prompt, or
        prompt + outputs after a preemption), reusing cached leading blocks. Sets and returns
        `seq.num_cached_tokens`; the scheduler starts computing from there."""
        assert not seq.block_table, f"{seq.request_id} already holds blocks"
        hits = self._cache_hits(seq)
        for block_id in hits:
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1
        fresh = [self._take_free_block() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.block_table = hits + fresh
        seq.num_cached_tokens = len(hits) * self.block_size
        return seq.num_cached_tokens

    def can_append(self, seq: Sequence) -> bool:
        """Whether the table can grow to cover every token of `seq` (its newest sampled one included)."""
        return self.blocks_needed(seq.num_tokens) - len(seq.block_table) <= len(self._free)

    def append(self, seq: Sequence) -> None:
        """Grow the table to cover all of `seq`'s tokens: one new block when a decode crosses a block
        boundary, none otherwise."""
        while len(seq.block_table) < self.blocks_needed(seq.num_tokens):
            seq.block_table.append(self._take_free_block())

    def free(self, seq: Sequence) -> None:
        """Drop all of `seq`'s references at once. Hashed blocks stay findable until reused."""
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than allocated"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None  # back of the queue: LRU among hashed blocks
                if block.hash is None:
                    self._free.move_to_end(block_id, last=False)
        seq.block_table = []  # num_cached_tokens stays: it reports what admission found

    def cache_computed_blocks(self, seq: Sequence, computed_before: int) -> None:
        """Register the blocks that became full and computed when `seq.num_computed_tokens` went from
        `computed_before` to its current value, so later sequences can share them. A block whose
        content is already registered under another id stays anonymous (it is a duplicate)."""
        hashes = self._block_hashes(seq)
        for index in range(computed_before // self.block_size, seq.num_computed_tokens // self.block_size):
            block = self._blocks[seq.block_table[index]]
            if block.hash is None and hashes[index] not in self._cached:
                block.hash = hashes[index]
                self._cached[block.hash] = seq.block_table[index]

    # -- internals --------------------------------------------------------------------------------
    def _block_hashes(self, seq: Sequence) -> list[BlockHash]:
        """Chained hashes of all of `seq`'s full blocks, extended in place: tokens never change, so
        the hashes stay valid across steps and preemptions."""
        size, hashes = self.block_size, seq.block_hashes
        parent = hashes[-1] if hashes else root_hash(seq.extra_key)
        for index in range(len(hashes), seq.num_tokens // size):
            parent = chain_hash(parent, seq.token_ids[index * size:(index + 1) * size])
            hashes.append(parent)
        return hashes

    def _cache_hits(self, seq: Sequence) -> list[int]:
        """Ids of the registered blocks matching `seq`'s leading full blocks. The last token is never
        a hit: computing it is what yields the logits for the next token."""
        hits = []
        for block_hash in self._block_hashes(seq)[: (seq.num_tokens - 1) // self.block_size]:
            block_id = self._cached.get(block_hash)
            if block_id is None:
                break
            hits.append(block_id)
        return hits

    def _take_free_block(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache block: check can_allocate / can_append first")
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.hash is not None:  # evict its cached content
            del self._cached[block.hash]
            block.hash = None
        block.ref_count = 1
        return block_id
