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

A sequence's last, partly filled block is kept findable too when the sequence ends (finished,
aborted or preempted), under its parent's hash and its computed tokens: the next turn of a
conversation starts with the whole previous turn, whose tail rarely ends on a block boundary, and
without this it would recompute up to block_size - 1 tokens of it (a third of a second turn's
prefill at block size 16). Such a block is never shared: the first sequence that extends those
tokens takes it over whole and writes on after them, and it leaves the table at once.

Freed blocks that carry a hash (or a partial tail) stay findable until the pool needs them again. The free list is
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
    # a freed sequence's partly filled last block: the hash of the blocks before it, its computed tokens
    tail_parent: BlockHash | None = None
    tail_tokens: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self._blocks = [_Block() for _ in range(num_blocks)]
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # front = reused first
        self._cached: dict[BlockHash, int] = {}
        self._tails: dict[BlockHash, set[int]] = {}  # parent hash -> freed partly filled blocks after it

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
        seq.num_cached_tokens = len(hits) * self.block_size
        found = self._tail_hit(seq, len(hits))
        if found is not None:
            tail, same = found
            seq.num_cached_tokens += same
            self._forget_tail(tail)
            del self._free[tail]
            self._blocks[tail].ref_count = 1
            hits.append(tail)
        fresh = [self._take_free_block() for _ in range(self.blocks_needed(seq.num_tokens) - len(hits))]
        seq.block_table = hits + fresh
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
        """Drop all of `seq`'s references at once. Hashed blocks, and the partly filled last one,
        stay findable until reused."""
        self._keep_tail(seq)
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            assert block.ref_count > 0, f"block {block_id} freed more often than allocated"
            block.ref_count -= 1
            if block.ref_count == 0:
                self._free[block_id] = None  # back of the queue: LRU among hashed blocks
                if block.hash is None and block.tail_parent is None:
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

    def _keep_tail(self, seq: Sequence) -> None:
        """Register `seq`'s partly filled, partly computed last block, which only `seq` holds."""
        index, computed = divmod(seq.num_computed_tokens, self.block_size)
        if not computed or index >= len(seq.block_table):
            return
        block_id = seq.block_table[index]
        block = self._blocks[block_id]
        if block.ref_count != 1 or block.hash is not None:
            return
        parent = self._block_hashes(seq)[index - 1] if index else root_hash(seq.extra_key)
        start = index * self.block_size
        block.tail_parent, block.tail_tokens = parent, tuple(seq.token_ids[start:start + computed])
        self._tails.setdefault(parent, set()).add(block_id)

    def _tail_hit(self, seq: Sequence, full_hits: int) -> tuple[int, int] | None:
        """(block id, tokens) of the registered tail block sharing the most leading tokens with
        `seq`'s block number `full_hits`; never `seq`'s last token, which must be computed."""
        parent = self._block_hashes(seq)[full_hits - 1] if full_hits else root_hash(seq.extra_key)
        start = full_hits * self.block_size
        wanted = seq.token_ids[start:seq.num_tokens - 1]
        best, best_len = None, 0
        for block_id in self._tails.get(parent, ()):
            same = 0
            for ours, theirs in zip(wanted, self._blocks[block_id].tail_tokens):
                if ours != theirs:
                    break
                same += 1
            if same > best_len:
                best, best_len = block_id, same
        return (best, best_len) if best is not None else None

    def _forget_tail(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.tail_parent is not None:
            siblings = self._tails[block.tail_parent]
            siblings.discard(block_id)
            if not siblings:
                del self._tails[block.tail_parent]
            block.tail_parent, block.tail_tokens = None, ()

    def _take_free_block(self) -> int:
        if not self._free:
            raise RuntimeError("no free KV-cache block: check can_allocate / can_append first")
        block_id, _ = self._free.popitem(last=False)
        block = self._blocks[block_id]
        if block.hash is not None:  # evict its cached content
            del self._cached[block.hash]
            block.hash = None
        self._forget_tail(block_id)
        block.ref_count = 1
        return block_id
