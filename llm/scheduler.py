"""Which tokens of which sequences run in the next model step. Plain Python (STYLE lesson 1).

The engine step is three lines (STYLE lesson 3):

    out = scheduler.schedule(); sampled = runner.run(out); finished = scheduler.update(out, sampled)

One view covers prefill and decode, as in vLLM v1: a sequence has `num_tokens` tokens of which
`num_computed_tokens` have K/V in the cache; a step computes a range [start, end) of the rest. A decode
is the range of length 1 holding the last sampled token; a prefill is cut into chunks that fit the
per-step token budget (chunked prefill). Each step schedules, in this order:

1. decodes of running sequences (short and latency-bound, so they go first), in admission order;
2. the next prefill chunks of running sequences still prefilling;
3. new (or preempted) sequences from the waiting queue, first come first served, while the budget,
   `max_num_seqs` and the free blocks allow, unless this step had to preempt.

Blocks: an admitted sequence gets blocks for all its tokens at once, so its later prefill chunks need
none; a decode needs a block when it crosses a block boundary. When none is free, the most recently
admitted running sequence is preempted by recompute: its blocks are freed and it goes back to the
front of the waiting queue, its generated tokens kept to be recomputed with the prompt (its cached
blocks often survive, so little is really recomputed).

Not thread-safe: `abort` must be called from the engine loop, between steps or during `runner.run`.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, fields

from llm.block_manager import BlockManager
from llm.sequence import FinishReason, Sequence, SequenceStatus


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    num_blocks: int  # KV-cache pool size, derived by the model runner from memory
    max_model_len: int  # context length: prompt + generated tokens
    block_size: int = 16  # tokens per KV-cache block
    max_num_seqs: int = 64  # running sequences at once
    max_num_batched_tokens: int = 512  # tokens computed per step, prefill chunks and decodes together

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"SchedulerConfig.{f.name} must be an integer >= 1, got {value!r}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= max_num_seqs "
                             f"({self.max_num_seqs}), or running decodes could not all fit in one step")

    @property
    def pool_tokens(self) -> int:
        return self.num_blocks * self.block_size


class PromptRejected(ValueError):
    """A request the scheduler can never run; the message names the limit. The HTTP layer maps it to 400."""


@dataclass(frozen=True, slots=True)
class ScheduledChunk:
    """What the runner computes for one sequence this step: K/V (and, if `sample`, logits) for the
    tokens at positions start .. end-1, attending to positions 0 .. end-1 through `block_table`."""

    request_id: str
    start: int
    end: int
    token_ids: tuple[int, ...]  # the tokens at positions start .. end-1
    is_prefill: bool  # False: a decode of the last sampled token
    sample: bool  # the chunk reaches the last known token, so the runner samples the next one
    block_table: tuple[int, ...]
    extra_key: str  # the image digest: which image's cross-attention K/V to use

    @property
    def num_tokens(self) -> int:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]
    preempted_ids: tuple[str, ...]  # lost their blocks this step; they will be recomputed
    finished_ids: tuple[str, ...]  # finished or aborted since the last schedule: the runner drops their state

    @property
    def num_batched_tokens(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig) -> None:
        self.config = config
        self.block_manager = BlockManager(config.num_blocks, config.block_size)
        self.waiting: deque[Sequence] = deque()
        self.running: dict[str, Sequence] = {}  # admission order: the last is preempted first
        self._live: dict[str, Sequence] = {}  # waiting or running, by request id
        self._ended_since_schedule: list[str] = []

    # -- requests ---------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        """Queue a new request, or reject one that could never run."""
        prompt, cfg = seq.num_prompt_tokens, self.config
        if prompt >= cfg.max_model_len:
            raise PromptRejected(f"This model's maximum context length is {cfg.max_model_len} tokens. However, "
                                 f"the prompt has {prompt} tokens, leaving no room to generate.")
        if self.block_manager.blocks_needed(prompt) > cfg.num_blocks:
            raise PromptRejected(f"The prompt needs {self.block_manager.blocks_needed(prompt)} KV-cache blocks "
                                 f"of {cfg.block_size} tokens but the whole pool has {cfg.num_blocks} blocks.")
        if seq.request_id in self._live:
            raise ValueError(f"request id {seq.request_id!r} is already in use")
        assert seq.status is SequenceStatus.WAITING and not seq.block_table, "add() takes a fresh Sequence"
        self.waiting.append(seq)
        self._live[seq.request_id] = seq

    def abort(self, request_id: str) -> bool:
        """End a waiting or running request now and free what it holds. False if it is not live."""
        seq = self._live.get(request_id)
        if seq is None:
            return False
        if seq.is_waiting:
            self.waiting.remove(seq)
        else:
            del self.running[request_id]
            self.block_manager.free(seq)
        self._end(seq, SequenceStatus.ABORTED, "abort")
        return True

    def get(self, request_id: str) -> Sequence | None:
        return self._live.get(request_id)

    @property
    def is_idle(self) -> bool:
        return not self._live

    # -- the step ---------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        preempted: list[str] = []
        decoding = [s for s in self.running.values() if s.num_uncomputed_tokens == 1]
        prefilling = [s for s in self.running.values() if s.num_uncomputed_tokens > 1]
        for seq in decoding + prefilling:
            if budget == 0:
                break
            if seq.status is not SequenceStatus.RUNNING:  # preempted to make room for an older one
                continue
            while not self.block_manager.can_append(seq):
                victim = self._preempt_newest()
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            else:
                self.block_manager.append(seq)
                chunks.append(self._chunk(seq, min(seq.num_uncomputed_tokens, budget)))
                budget -= chunks[-1].num_tokens
        while (not preempted and self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and self.block_manager.can_allocate(self.waiting[0])):
            seq = self.waiting.popleft()
            seq.num_computed_tokens = self.block_manager.allocate(seq)
            seq.status = SequenceStatus.RUNNING
            self.running[seq.request_id] = seq
            chunks.append(self._chunk(seq, min(seq.num_uncomputed_tokens, budget)))
            budget -= chunks[-1].num_tokens
        ended, self._ended_since_schedule = self._ended_since_schedule, []
        return SchedulerOutput(tuple(chunks), tuple(preempted), tuple(ended))

    def update(self, output: SchedulerOutput, sampled: dict[str, int]) -> list[Sequence]:
        """Record what the step computed and the tokens it sampled; return the sequences it finished.
        Chunks of requests aborted while the step ran are ignored."""
        finished = []
        for chunk in output.chunks:
            seq = self.running.get(chunk.request_id)
            if seq is None:
                continue
            assert seq.num_computed_tokens == chunk.start, f"{seq.request_id}: update() out of step with schedule()"
            seq.num_computed_tokens = chunk.end
            self.block_manager.cache_computed_blocks(seq, computed_before=chunk.start)
            if not chunk.sample:
                continue
            if chunk.request_id not in sampled:
                raise KeyError(f"the runner sampled no token for {chunk.request_id!r}, whose chunk asked for one")
            reason = self._append_or_finish(seq, sampled[chunk.request_id])
            if reason is not None:
                del self.running[seq.request_id]
                self.block_manager.free(seq)
                self._end(seq, SequenceStatus.FINISHED, reason)
                finished.append(seq)
        return finished

    # -- internals --------------------------------------------------------------------------------
    def _chunk(self, seq: Sequence, num_tokens: int) -> ScheduledChunk:
        start = seq.num_computed_tokens
        end = start + num_tokens
        return ScheduledChunk(request_id=seq.request_id, start=start, end=end,
                              token_ids=tuple(seq.token_ids[start:end]),
                              is_prefill=start < seq.num_prompt_tokens or num_tokens > 1,
                              sample=end == seq.num_tokens, block_table=tuple(seq.block_table),
                              extra_key=seq.extra_key)

    def _preempt_newest(self) -> Sequence:
        _, seq = self.running.popitem()
        self.block_manager.free(seq)
        seq.status, seq.num_computed_tokens, seq.num_cached_tokens = SequenceStatus.PREEMPTED, 0, 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
        return seq

    def _append_or_finish(self, seq: Sequence, token_id: int) -> FinishReason | None:
        """Append a sampled token, or say why the sequence ends. A stop id ends it unappended. A
        sequence also ends when the pool could not hold one more of its tokens, so that a lone
        sequence always fits and preemption can never loop."""
        if token_id in seq.stop_ids and seq.num_output_tokens >= seq.params.min_tokens:
            return "stop"
        seq.append_token(token_id)
        if (seq.num_output_tokens >= seq.params.max_tokens or seq.num_tokens >= self.config.max_model_len
                or seq.num_tokens > self.config.pool_tokens):
            return "length"
        return None

    def _end(self, seq: Sequence, status: SequenceStatus, reason: FinishReason) -> None:
        seq.status, seq.finish_reason = status, reason
        del self._live[seq.request_id]
        self._ended_since_schedule.append(seq.request_id)
