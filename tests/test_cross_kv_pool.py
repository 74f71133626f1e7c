"""The image K/V pool: its range allocator (property tests), its arena, eviction and overflow; and the
grouping of decode rows by length."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llm.attention import KVShape
from llm.cross_kv_pool import CrossKVPool, TokenRanges
from llm.model_runner import MAX_DECODE_GROUPS, _stack_or_view, length_groups

SHAPE = KVShape(layers=2, kv_heads=2, head_dim=4)
TOKEN_BYTES = SHAPE.elements_per_token * 4  # fp32


@settings(max_examples=200, deadline=None)
@given(capacity=st.integers(0, 64),
       ops=st.lists(st.tuples(st.booleans(), st.integers(1, 20), st.integers(0, 1000)), max_size=60))
def test_token_ranges_never_overlap_and_free_space_is_kept(capacity, ops):
    ranges = TokenRanges(capacity)
    used: dict[int, int] = {}  # start -> length
    for allocate, n, pick in ops:
        if allocate or not used:
            fits = ranges.fits(n)
            start = ranges.allocate(n)
            assert (start is not None) == fits
            if start is None:
                continue
            assert 0 <= start and start + n <= capacity
            assert all(start + n <= s or s + m <= start for s, m in used.items()), "overlap"
            used[start] = n
        else:
            start = sorted(used)[pick % len(used)]
            ranges.release(start, used.pop(start))
        assert ranges.free + sum(used.values()) == capacity
        free = ranges.free_ranges()
        # sorted, disjoint from each other and from every used range, and merged (never adjacent)
        assert all(a + m < b for (a, m), (b, _) in zip(free, free[1:]))
        assert all(s + m <= a or a + k <= s for a, k in free for s, m in used.items())
    for start in sorted(used):
        ranges.release(start, used.pop(start))
    assert ranges.free_ranges() == ([(0, capacity)] if capacity else [])


def test_releasing_a_range_not_in_use_is_refused():
    ranges = TokenRanges(10)
    start = ranges.allocate(4)
    with pytest.raises(ValueError):
        ranges.release(start + 4, 2)  # free already
    with pytest.raises(ValueError):
        ranges.release(8, 4)  # past the end


def _fill(pool: CrossKVPool, digests: list[str], tokens: int, value: float):
    start, dest = pool.reserve(len(digests), tokens)
    for k, v in dest:
        k.fill_(value)
        v.fill_(-value)
    for d in digests:
        pool.acquire(d)
    pool.put(digests, start, dest)
    return start


def test_images_projected_together_sit_side_by_side_and_stack_without_a_copy():
    pool = CrossKVPool(10 * TOKEN_BYTES * 3, SHAPE, torch.float32, torch.device("cpu"))
    assert pool.capacity_tokens == 30
    start = _fill(pool, ["a", "b", "c"], 10, 1.0)
    assert start == 0 and pool.bytes == 30 * TOKEN_BYTES
    ks = [pool.get(d)[1][0] for d in "abc"]
    stacked = _stack_or_view(ks, 10)
    assert stacked.data_ptr() == ks[0].data_ptr() and torch.equal(stacked, torch.ones(3, 2, 10, 4))
    assert torch.equal(pool.get("b")[0][1], -torch.ones(2, 10, 4))


def test_an_evicted_image_gives_its_range_to_the_next_and_held_ones_stay():
    pool = CrossKVPool(TOKEN_BYTES * 20, SHAPE, torch.float32, torch.device("cpu"))
    _fill(pool, ["a"], 10, 1.0)
    _fill(pool, ["b"], 10, 2.0)
    pool.release("a")  # a is unheld now but kept: still within the budget
    assert "a" in pool and pool.evictions == 0
    start = _fill(pool, ["c"], 10, 3.0)  # no room: a (unheld, least recent) goes, c takes its place
    assert start == 0 and "a" not in pool and pool.evictions == 1
    assert torch.equal(pool.get("b")[0][0], torch.full((2, 10, 4), 2.0))  # b untouched
    assert torch.equal(pool.get("c")[0][0], torch.full((2, 10, 4), 3.0))


def test_when_every_image_is_held_a_new_one_lives_outside_the_arena_and_is_dropped_on_release():
    pool = CrossKVPool(TOKEN_BYTES * 20, SHAPE, torch.float32, torch.device("cpu"))
    _fill(pool, ["a", "b"], 10, 1.0)
    start = _fill(pool, ["c"], 10, 5.0)
    assert start is None and {"a", "b", "c"} <= set(pool._entries)
    assert torch.equal(pool.get("c")[1][1], -torch.full((2, 10, 4), 5.0))
    assert pool.bytes == 30 * TOKEN_BYTES  # over the budget while held
    pool.release("c")  # now unheld and over budget: evicted
    assert "c" not in pool and pool.bytes == 20 * TOKEN_BYTES
    pool.release("a")  # within the budget: kept for reuse
    assert "a" in pool


def test_a_zero_budget_keeps_nothing_unheld():
    pool = CrossKVPool(0, SHAPE, torch.float32, torch.device("cpu"))
    assert pool.capacity_tokens == 0
    _fill(pool, ["a"], 5, 1.0)
    assert "a" in pool
    pool.release("a")
    assert len(pool) == 0 and pool.bytes == 0


# -- decode rows grouped by length (llm/model_runner.py) ---------------------------------------------

@settings(max_examples=200, deadline=None)
@given(lens=st.lists(st.integers(1, 2000), min_size=1, max_size=64), cost=st.integers(0, 1000))
def test_length_groups_cover_every_row_and_never_read_more_than_one_group(lens, cost):
    lens = sorted(lens)
    bounds = length_groups(lens, group_cost=cost)
    assert bounds[0] == 0 and bounds[-1] == len(lens) and all(a < b for a, b in zip(bounds, bounds[1:]))
    assert len(bounds) - 1 <= MAX_DECODE_GROUPS
    padded = sum((e - s) * lens[e - 1] for s, e in zip(bounds, bounds[1:]))
    assert padded + (len(bounds) - 1) * cost <= len(lens) * lens[-1] + cost


def test_length_groups_split_a_chat_batch_and_keep_a_captioning_batch_whole():
    assert length_groups([40] * 64) == [0, 64]  # every row as long: nothing to save
    chat = sorted(range(34, 386, 22))  # 16 rows from 34 to 364 keys
    assert len(length_groups(chat)) - 1 >= 2


def test_a_throwaway_engine_pool_holds_exactly_its_images(monkeypatch):
    """generate_greedy / teacher_forced_logits size their image K/V pool to their images (it is touched
    whole at start), and every image still lands inside it."""
    from llm.models.coca import CoCaDecoder, CoCaDecoderConfig
    from llm.generate import as_images, image_kv_bytes, teacher_forced_logits

    torch.manual_seed(0)
    decoder = CoCaDecoder(CoCaDecoderConfig(vocab_size=50, width=32, heads=4, text_layers=1, multimodal_layers=2,
                                            context_length=16)).eval()
    embs = torch.randn(3, 7, 32)
    per_token = decoder.cross_kv_shape.elements_per_token * 4
    assert image_kv_bytes(decoder, as_images(embs)) == 3 * 7 * per_token
    assert image_kv_bytes(decoder, as_images([embs[0], embs[1, :5]])) == 12 * per_token
    assert image_kv_bytes(decoder, [None, as_images(embs)[:2]]) == 14 * per_token  # none; two in one request
    pools = []
    real_init = CrossKVPool.__init__

    def spy(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        pools.append(self)

    monkeypatch.setattr(CrossKVPool, "__init__", spy)
    teacher_forced_logits(decoder, embs, torch.randint(0, 50, (3, 5)))
    (pool,) = pools
    assert pool.capacity_tokens == 21 and len(pool) == 3
    assert all(entry.start is not None for entry in pool._entries.values())  # none fell outside the arena
