"""Tests of llm/block_manager.py: allocation, growth across a block boundary, freeing, prefix reuse keyed
by tokens AND image digest, reference counts, eviction order. Plain Python, no torch."""

from __future__ import annotations

import pytest

from llm.block_manager import BlockManager
from llm.sequence import Sequence

BS = 4


def seq(request_id: str, tokens: list[int], image: str = "img-a") -> Sequence:
    return Sequence(request_id, tuple(tokens), extra_key=image)


def computed(manager: BlockManager, s: Sequence) -> Sequence:
    """Allocate if needed, then record that the runner computed every token, as the scheduler's
    update() would."""
    if not s.block_table:
        s.num_computed_tokens = manager.allocate(s)
    before, s.num_computed_tokens = s.num_computed_tokens, s.num_tokens
    manager.cache_computed_blocks(s, computed_before=before)
    return s


def test_allocate_gives_blocks_for_every_prompt_token():
    manager = BlockManager(num_blocks=8, block_size=BS)
    a = seq("a", list(range(1, 11)))  # 10 tokens -> 3 blocks
    assert manager.can_allocate(a)
    assert manager.allocate(a) == 0  # nothing cached yet
    assert len(a.block_table) == 3 and len(set(a.block_table)) == 3
    assert (manager.num_free_blocks, manager.num_used_blocks, manager.usage) == (5, 3, 3 / 8)
    assert all(manager.ref_count(b) == 1 for b in a.block_table)


def test_can_allocate_is_false_when_the_pool_is_short():
    manager = BlockManager(num_blocks=2, block_size=BS)
    assert not manager.can_allocate(seq("a", list(range(1, 10))))  # 9 tokens need 3 blocks
    with pytest.raises(RuntimeError, match="no free KV-cache block"):
        manager.allocate(seq("b", list(range(1, 10))))


def test_append_adds_a_block_only_when_a_token_crosses_the_boundary():
    manager = BlockManager(num_blocks=4, block_size=BS)
    a = seq("a", list(range(1, 9)))  # exactly 2 full blocks
    manager.allocate(a)
    manager.append(a)
    assert len(a.block_table) == 2
    a.append_token(99)  # token 9 starts block 3
    assert manager.can_append(a)
    manager.append(a)
    assert len(a.block_table) == 3 and manager.num_used_blocks == 3
    for token in (100, 101, 102):  # fill block 3: no new block
        a.append_token(token)
        manager.append(a)
    assert len(a.block_table) == 3
    a.append_token(103)
    manager.append(a)
    assert len(a.block_table) == 4 and manager.num_free_blocks == 0
    a.append_token(104)
    a.append_token(105)
    a.append_token(106)
    a.append_token(107)  # 17th token: needs a 5th block
    assert not manager.can_append(a)


def test_free_returns_every_block_at_once():
    manager = BlockManager(num_blocks=6, block_size=BS)
    a, b = seq("a", list(range(1, 12))), seq("b", [5, 6])
    manager.allocate(a)
    manager.allocate(b)
    manager.free(a)
    assert a.block_table == [] and manager.num_used_blocks == 1
    manager.free(b)
    assert manager.num_free_blocks == 6 and manager.usage == 0.0


def test_same_tokens_and_image_reuse_computed_blocks_and_report_cached_tokens():
    manager = BlockManager(num_blocks=10, block_size=BS)
    a = computed(manager, seq("a", list(range(1, 11))))  # blocks 0,1 full; block 2 holds 2 tokens
    b = seq("b", list(range(1, 9)) + [50, 51, 52])
    assert manager.allocate(b) == 8 and b.num_cached_tokens == 8
    assert b.block_table[:2] == a.block_table[:2]
    assert b.block_table[2] not in a.block_table
    assert [manager.ref_count(x) for x in a.block_table] == [2, 2, 1]
    assert manager.num_used_blocks == 3 + 1


def test_same_tokens_under_another_image_never_share():
    manager = BlockManager(num_blocks=10, block_size=BS)
    a = computed(manager, seq("a", list(range(1, 11)), image="img-a"))
    b = seq("b", list(range(1, 11)), image="img-b")
    assert manager.allocate(b) == 0
    assert not set(a.block_table) & set(b.block_table)


def test_blocks_are_shared_only_once_computed():
    """Two identical prompts admitted in one step must not share: the first's K/V are not written yet."""
    manager = BlockManager(num_blocks=10, block_size=BS)
    a, b = seq("a", list(range(1, 11))), seq("b", list(range(1, 11)))
    manager.allocate(a)
    assert manager.allocate(b) == 0
    computed(manager, a)
    computed(manager, b)  # same content already registered by a: b's copies stay anonymous
    assert [manager.is_cached(x) for x in a.block_table] == [True, True, False]
    assert not any(manager.is_cached(x) for x in b.block_table)
    manager.free(a)
    manager.free(b)
    assert manager.num_free_blocks == 10


def test_the_last_token_is_never_a_cache_hit():
    manager = BlockManager(num_blocks=10, block_size=BS)
    computed(manager, seq("a", list(range(1, 9))))  # 2 full blocks, both registered
    b = seq("b", list(range(1, 9)))
    assert manager.allocate(b) == 4  # block 2 is recomputed to get the logits of token 8


def test_ref_counts_with_three_sharers_and_freeing_in_any_order():
    manager = BlockManager(num_blocks=10, block_size=BS)
    prefix = list(range(1, 9))
    a = computed(manager, seq("a", prefix + [9]))
    b, c = seq("b", prefix + [10, 11]), seq("c", prefix + [12])
    manager.allocate(b)
    manager.allocate(c)
    shared = a.block_table[:2]
    assert [manager.ref_count(x) for x in shared] == [3, 3]
    manager.free(b)
    assert [manager.ref_count(x) for x in shared] == [2, 2]
    manager.free(a)
    assert [manager.ref_count(x) for x in shared] == [1, 1] and c.block_table[:2] == shared
    manager.free(c)
    assert manager.num_used_blocks == 0
    d = seq("d", prefix + [13])  # freed blocks with a hash are still found
    assert manager.allocate(d) == 8 and d.block_table[:2] == shared


def test_a_cache_hit_on_a_free_block_still_needs_a_free_block():
    manager = BlockManager(num_blocks=3, block_size=BS)
    a = computed(manager, seq("a", list(range(1, 10))))  # 3 blocks, the first 2 registered
    manager.free(a)
    other = seq("other", [7])
    manager.allocate(other)  # takes the anonymous block, leaving the 2 cached ones free
    b = seq("b", list(range(1, 10)))  # 2 hits (both on free blocks) + 1 fresh = 3 > 2 free
    assert not manager.can_allocate(b)
    manager.free(other)
    assert manager.can_allocate(b) and manager.allocate(b) == 8


def test_the_next_turn_takes_over_the_partly_filled_tail_of_the_last():
    manager = BlockManager(num_blocks=10, block_size=BS)
    a = computed(manager, seq("a", list(range(1, 11))))  # blocks of 4 + 4 + 2 computed tokens
    table = list(a.block_table)
    manager.free(a)
    b = seq("b", list(range(1, 11)) + [60, 61])  # the whole of turn 1, then turn 2
    assert manager.allocate(b) == 10 and b.block_table[:3] == table
    assert [manager.ref_count(x) for x in b.block_table] == [1, 1, 1]
    c = seq("c", list(range(1, 11)) + [70])  # the tail now belongs to b: c recomputes it elsewhere
    assert manager.allocate(c) == 8 and c.block_table[2] != table[2]
    computed(manager, b)
    assert manager.is_cached(b.block_table[2])  # filled by b: an ordinary shared block from now on


def test_a_tail_serves_its_common_prefix_but_never_the_last_token():
    manager = BlockManager(num_blocks=10, block_size=BS)
    manager.free(computed(manager, seq("a", list(range(1, 11)))))
    assert manager.allocate(seq("b", list(range(1, 10)) + [99, 5])) == 9  # shares 9, not 10
    manager = BlockManager(num_blocks=10, block_size=BS)
    manager.free(computed(manager, seq("a", list(range(1, 11)))))
    assert manager.allocate(seq("same", list(range(1, 11)))) == 9  # token 10 is computed again


def test_tails_are_keyed_by_image_and_by_the_blocks_before_them():
    manager = BlockManager(num_blocks=10, block_size=BS)
    manager.free(computed(manager, seq("a", list(range(1, 11)))))
    assert manager.allocate(seq("other-image", list(range(1, 12)), image="img-b")) == 0
    assert manager.allocate(seq("other-head", [0, *range(2, 12)])) == 0


def test_an_evicted_tail_is_forgotten():
    manager = BlockManager(num_blocks=5, block_size=BS)
    manager.free(computed(manager, seq("a", list(range(1, 11)))))  # 2 hashed blocks, 1 tail, 2 never used
    x = seq("x", list(range(100, 112)))  # 3 blocks: the unused ones, then a's tail (a tail goes before its head)
    manager.allocate(x)
    manager.free(x)
    assert manager.allocate(seq("b", list(range(1, 13)))) == 8  # a's full blocks, not its overwritten tail
    assert manager._tails == {}


def test_eviction_reuses_anonymous_blocks_first_then_least_recently_freed():
    manager = BlockManager(num_blocks=4, block_size=BS)
    a = computed(manager, seq("a", list(range(1, 10))))  # 2 registered blocks + 1 anonymous
    manager.free(a)
    manager.allocate(seq("x", [1]))  # the anonymous block goes first
    b = seq("b", list(range(1, 10)))
    assert manager.allocate(b) == 8  # so the cached ones survived
    manager.free(b)
    fill = seq("fill", list(range(100, 106)))  # 2 blocks: the free anonymous one, then a's tail
    manager.allocate(fill)
    c = seq("c", list(range(1, 10)))
    manager.free(fill)
    assert manager.allocate(c) == 4  # the head block survived, the tail block was evicted
