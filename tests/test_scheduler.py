"""Tests of llm/scheduler.py: the step contract, chunked prefill, prefix reuse through the scheduler,
preemption by recompute, abort, stop conditions; then a hypothesis state machine over scheduler and
block manager with a fake runner that checks every K/V slot it reads holds what it should."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llm.scheduler import PromptRejected, Scheduler, SchedulerConfig, SchedulerOutput
from llm.params import SamplingParams
from llm.sequence import Sequence, SequenceStatus

STOP = 0


def config(**overrides) -> SchedulerConfig:
    values = dict(num_blocks=16, max_model_len=64, block_size=4, max_num_seqs=4, max_num_batched_tokens=32)
    return SchedulerConfig(**(values | overrides))


def seq(request_id: str, tokens: list[int], image: str = "img-a", max_new: int = 4, min_new: int = 0) -> Sequence:
    return Sequence(request_id, tuple(tokens), extra_key=image,
                    params=SamplingParams(max_tokens=max_new, min_tokens=min_new), stop_ids=frozenset({STOP}))


def step(scheduler: Scheduler, token: int = 7) -> tuple[SchedulerOutput, list[Sequence]]:
    out = scheduler.schedule()
    return out, scheduler.update(out, {c.request_id: token for c in out.chunks if c.sample})


# -- config and admission ---------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(num_blocks=0), dict(block_size=-1), dict(max_model_len=True),
                                 dict(max_num_seqs=8, max_num_batched_tokens=4), dict(max_num_seqs=2.0)])
def test_config_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        config(**bad)


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config().num_blocks = 3


def test_a_prompt_that_can_never_fit_the_pool_is_rejected_naming_both_numbers():
    scheduler = Scheduler(config(num_blocks=4, max_model_len=100))
    with pytest.raises(PromptRejected, match=r"needs 5 KV-cache blocks of 4 tokens.*pool has 4 blocks"):
        scheduler.add(seq("a", [1] * 17))
    scheduler.add(seq("b", [1] * 16))  # exactly the pool: accepted
    assert isinstance(PromptRejected("x"), ValueError)


def test_a_prompt_leaving_no_room_to_generate_is_rejected():
    scheduler = Scheduler(config(max_model_len=10))
    with pytest.raises(PromptRejected, match=r"maximum context length is 10 tokens.*prompt has 10 tokens"):
        scheduler.add(seq("a", [1] * 10))


def test_request_ids_are_unique_among_live_requests():
    scheduler = Scheduler(config())
    scheduler.add(seq("a", [1, 2]))
    with pytest.raises(ValueError, match="already in use"):
        scheduler.add(seq("a", [3]))


# -- the step -------------------------------------------------------------------------------------
def test_prefill_then_decodes_until_max_new_tokens():
    scheduler = Scheduler(config())
    scheduler.add(seq("a", [5, 6, 7], max_new=3))
    out, finished = step(scheduler, token=11)
    (chunk,) = out.chunks
    assert (chunk.start, chunk.end, chunk.token_ids, chunk.is_prefill, chunk.sample) == (0, 3, (5, 6, 7), True, True)
    assert chunk.block_table == (0,) and chunk.extra_key == "img-a" and not finished
    out, _ = step(scheduler, token=12)
    (chunk,) = out.chunks
    assert (chunk.start, chunk.end, chunk.token_ids, chunk.is_prefill) == (3, 4, (11,), False)
    out, finished = step(scheduler, token=13)
    assert [s.request_id for s in finished] == ["a"]
    a = finished[0]
    assert a.output_token_ids == [11, 12, 13] and a.finish_reason == "length" and a.status is SequenceStatus.FINISHED
    assert scheduler.block_manager.num_used_blocks == 0 and scheduler.is_idle
    assert scheduler.schedule().finished_ids == ("a",)  # told to the runner once, on the next schedule
    assert scheduler.schedule().finished_ids == ()


def test_a_stop_id_ends_the_sequence_unappended_but_not_before_min_new_tokens():
    scheduler = Scheduler(config())
    scheduler.add(seq("a", [5, 6], max_new=8, min_new=2))
    step(scheduler, token=STOP)  # too early: kept as an ordinary token
    step(scheduler, token=9)
    _, finished = step(scheduler, token=STOP)
    assert finished[0].output_token_ids == [STOP, 9] and finished[0].finish_reason == "stop"


def test_generation_stops_at_the_context_length():
    scheduler = Scheduler(config(max_model_len=6))
    scheduler.add(seq("a", [1, 2, 3, 4], max_new=50))
    step(scheduler)
    _, finished = step(scheduler)
    assert finished[0].num_tokens == 6 and finished[0].finish_reason == "length"


def test_chunked_prefill_spreads_a_long_prompt_over_steps_within_the_budget():
    scheduler = Scheduler(config(max_num_batched_tokens=8, max_num_seqs=2))
    scheduler.add(seq("long", list(range(1, 21)), max_new=2))
    ranges = []
    for _ in range(3):
        out, _ = step(scheduler)
        (chunk,) = out.chunks
        ranges.append((chunk.start, chunk.end, chunk.is_prefill, chunk.sample))
    assert ranges == [(0, 8, True, False), (8, 16, True, False), (16, 20, True, True)]
    assert scheduler.get("long").output_token_ids == [7]


def test_decodes_and_prefill_chunks_share_a_step_decodes_first():
    scheduler = Scheduler(config(max_num_batched_tokens=8, max_num_seqs=4))
    scheduler.add(seq("a", [1, 2, 3], max_new=10))
    step(scheduler)
    scheduler.add(seq("b", list(range(10, 30)), max_new=10))
    out, _ = step(scheduler)
    assert [(c.request_id, c.start, c.end, c.is_prefill) for c in out.chunks] == [("a", 3, 4, False), ("b", 0, 7, True)]
    assert out.num_batched_tokens == 8
    out, _ = step(scheduler)
    assert [(c.request_id, c.start, c.end) for c in out.chunks] == [("a", 4, 5), ("b", 7, 14)]


def test_a_repeated_prompt_with_the_same_image_skips_the_cached_prefill():
    scheduler = Scheduler(config())
    prompt = list(range(1, 11))
    scheduler.add(seq("a", prompt, max_new=1))
    step(scheduler)
    scheduler.add(seq("same", prompt, max_new=1))
    scheduler.add(seq("other-image", prompt, image="img-b", max_new=1))
    out, _ = step(scheduler)
    starts = {c.request_id: c.start for c in out.chunks}
    assert starts == {"same": 9, "other-image": 0}  # 8 in a's shared blocks, 1 in its freed tail


def test_preemption_frees_the_newest_and_recomputes_its_generated_tokens():
    scheduler = Scheduler(config(num_blocks=4, max_model_len=64, max_num_batched_tokens=16))
    scheduler.add(seq("old", [1] * 8, max_new=20))  # 2 blocks
    scheduler.add(seq("new", [2] * 7, max_new=20))  # 2 blocks: the pool is full
    step(scheduler)  # both prefill; "new" now has 8 tokens, "old" 9 and needs a third block
    out, _ = step(scheduler)
    assert out.preempted_ids == ("new",) and [c.request_id for c in out.chunks] == ["old"]
    new = scheduler.get("new")
    assert new.status is SequenceStatus.PREEMPTED and new.block_table == [] and scheduler.waiting[0] is new
    assert new.output_token_ids == [7] and new.num_computed_tokens == 0
    scheduler.abort("old")
    out, _ = step(scheduler)
    (chunk,) = out.chunks  # recomputes prompt + its generated token; the prompt's full block is cached
    assert (chunk.request_id, chunk.start, chunk.end, chunk.sample) == ("new", 4, 8, True)
    assert new.status is SequenceStatus.RUNNING and new.num_preemptions == 1


def test_abort_of_a_waiting_request():
    scheduler = Scheduler(config(max_num_seqs=1, max_num_batched_tokens=4))
    scheduler.add(seq("a", [1, 2]))
    scheduler.add(seq("b", [3, 4]))
    step(scheduler)
    assert scheduler.abort("b") and not scheduler.abort("b") and not scheduler.abort("nobody")
    assert list(scheduler.waiting) == [] and scheduler.get("b") is None
    out = scheduler.schedule()
    assert out.finished_ids == ("b",)


def test_abort_of_a_running_request_frees_its_blocks_at_once_even_mid_step():
    scheduler = Scheduler(config())
    a = seq("a", list(range(1, 10)))
    scheduler.add(a)
    out = scheduler.schedule()
    assert scheduler.block_manager.num_used_blocks == 3
    assert scheduler.abort("a")  # while the runner is busy with `out`
    assert scheduler.block_manager.num_used_blocks == 0 and a.status is SequenceStatus.ABORTED
    assert scheduler.update(out, {"a": 5}) == [] and a.output_token_ids == [] and a.finish_reason == "abort"
    assert scheduler.is_idle


def test_scheduler_output_is_frozen():
    scheduler = Scheduler(config())
    scheduler.add(seq("a", [1]))
    out = scheduler.schedule()
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.chunks[0].start = 3  # type: ignore[misc]


# -- the state machine ----------------------------------------------------------------------------
MACHINE_CONFIG = SchedulerConfig(num_blocks=10, block_size=4, max_num_seqs=4, max_num_batched_tokens=12,
                                 max_model_len=48)  # the pool (40 tokens) is shorter than the context
PREFIXES = [[random.Random(i).randint(1, 50) for _ in range(40)] for i in range(3)]


class FakeRunner:
    """Stands in for the model runner. Each slot it writes holds what real K/V would depend on: the
    image and every token up to that position. Before computing a chunk it checks each slot it attends
    to holds exactly that for this sequence, so a wrongly shared or wrongly evicted block shows up."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.scheduler, self.slots = scheduler, {}

    def run(self, out: SchedulerOutput, rng: random.Random) -> dict[str, int]:
        manager, size = self.scheduler.block_manager, self.scheduler.config.block_size
        sampled = {}
        for chunk in out.chunks:
            tokens = self.scheduler.get(chunk.request_id).token_ids
            assert chunk.start < chunk.end, "a chunk must compute a token: logits come from computing one"
            assert chunk.token_ids == tuple(tokens[chunk.start:chunk.end])
            for position in range(chunk.end):
                block = chunk.block_table[position // size]
                slot, content = (block, position % size), (chunk.extra_key, tuple(tokens[:position + 1]))
                if position < chunk.start:
                    assert self.slots.get(slot) == content, f"{chunk.request_id} reads a stale slot {slot}"
                else:
                    assert manager.ref_count(block) == 1, f"{chunk.request_id} writes into shared block {block}"
                    self.slots[slot] = content
            if chunk.sample:
                sampled[chunk.request_id] = STOP if rng.random() < 0.1 else rng.randint(1, 50)
        return sampled


class SchedulerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.scheduler = Scheduler(MACHINE_CONFIG)
        self.runner = FakeRunner(self.scheduler)
        self.requests: dict[str, Sequence] = {}

    @rule(prefix=st.integers(0, 2), shared=st.integers(0, 40), tail=st.lists(st.integers(1, 50), max_size=8),
          image=st.sampled_from(["img-a", "img-b"]), max_new=st.integers(1, 12))
    def add(self, prefix: int, shared: int, tail: list[int], image: str, max_new: int) -> None:
        request = seq(f"r{len(self.requests)}", (PREFIXES[prefix][:shared] + tail) or [1], image, max_new)
        cfg = MACHINE_CONFIG
        if request.num_prompt_tokens >= cfg.max_model_len or request.num_prompt_tokens > cfg.pool_tokens:
            with pytest.raises(PromptRejected):
                self.scheduler.add(request)
            return
        self.scheduler.add(request)
        self.requests[request.request_id] = request

    @rule(seed=st.integers(0, 2**16))
    def step(self, seed: int) -> None:
        self._step(random.Random(seed))

    @precondition(lambda self: self.requests)
    @rule(data=st.data(), mid_step=st.booleans())
    def abort(self, data: st.DataObject, mid_step: bool) -> None:
        request_id = data.draw(st.sampled_from(sorted(self.requests)))
        was_live = not self.requests[request_id].is_finished
        if not mid_step:
            assert self.scheduler.abort(request_id) == was_live
            return
        out = self.scheduler.schedule()  # abort while the runner works on `out`
        sampled = self.runner.run(out, random.Random(0))
        assert self.scheduler.abort(request_id) == was_live
        self._check_finished(self.scheduler.update(out, sampled))

    def _step(self, rng: random.Random) -> None:
        out = self.scheduler.schedule()
        assert out.num_batched_tokens <= MACHINE_CONFIG.max_num_batched_tokens
        self._check_finished(self.scheduler.update(out, self.runner.run(out, rng)))

    def _check_finished(self, finished: list[Sequence]) -> None:
        for s in finished:
            assert s.status is SequenceStatus.FINISHED and s.finish_reason in ("stop", "length")
            assert s.num_output_tokens <= s.params.max_tokens and s.num_tokens <= MACHINE_CONFIG.max_model_len

    @invariant()
    def blocks_are_accounted_for(self) -> None:
        manager, size = self.scheduler.block_manager, MACHINE_CONFIG.block_size
        assert manager.num_free_blocks + manager.num_used_blocks == MACHINE_CONFIG.num_blocks
        live = [s for s in self.requests.values() if not s.is_finished]
        queued = set(self.scheduler.running) | {s.request_id for s in self.scheduler.waiting}
        assert {s.request_id for s in live} == queued
        owners: Counter[int] = Counter()
        for s in live:
            if s.is_waiting:
                assert s.block_table == [] and s.num_computed_tokens == 0
                continue
            assert len(set(s.block_table)) == len(s.block_table)
            # The newest sampled token gets its slot when its decode is scheduled.
            assert len(s.block_table) * size >= s.num_computed_tokens >= s.num_cached_tokens
            assert s.num_tokens > s.num_computed_tokens
            owners.update(s.block_table)
        for block in range(MACHINE_CONFIG.num_blocks):
            assert manager.ref_count(block) == owners[block]
            assert owners[block] <= 1 or manager.is_cached(block), f"block {block} shared but not a cached prefix"
        assert manager.num_used_blocks == len(owners)
        assert all(not s.block_table for s in self.requests.values() if s.is_finished)
        if not self.scheduler.running:
            assert manager.num_used_blocks == 0

    def teardown(self) -> None:
        rng = random.Random(1)
        for _ in range(500):
            if self.scheduler.is_idle:
                break
            self._step(rng)
            self.blocks_are_accounted_for()
        assert self.scheduler.is_idle and self.scheduler.block_manager.num_used_blocks == 0
        assert all(s.status in (SequenceStatus.FINISHED, SequenceStatus.ABORTED) for s in self.requests.values())


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
