"""One request's bookkeeping as the scheduler sees it: its tokens, its stop conditions, where it is in
its life, and which KV-cache blocks hold it. No tensors live here (STYLE lesson 1); the model runner
reads a `ScheduledChunk` (llm/scheduler.py), never a `Sequence`.

Life of a sequence:  WAITING -> RUNNING -> FINISHED
                                RUNNING -> PREEMPTED (back in the waiting queue) -> RUNNING ...
                     any live state -> ABORTED
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Literal

from llm.params import SamplingParams

FinishReason = Literal["stop", "length", "abort"]  # OpenAI's finish_reason values, plus "abort"


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    PREEMPTED = auto()  # waiting again after its blocks were taken; its outputs are recomputed with the prompt
    FINISHED = auto()
    ABORTED = auto()


@dataclass(eq=False, slots=True)
class Sequence:
    """A request's token history and scheduling state.

    `token_ids` is the prompt followed by the generated tokens: one list, because after a preemption
    both are recomputed alike and the block hashes run across the boundary. A stop token ends the
    sequence without being appended (the same contract as llm.generate.generate_greedy).

    `extra_key` is the image digest. In a cross-attention model every self-attention K/V depends on
    the image, so it roots the chain of block hashes: the same tokens under another image never share.
    """

    request_id: str
    prompt_token_ids: tuple[int, ...]
    extra_key: str = ""
    params: SamplingParams = SamplingParams()  # its max_tokens and min_tokens bound the generation
    stop_ids: frozenset[int] = frozenset()  # the ids that end it: the model's end-of-turn ids and the request's
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    token_ids: list[int] = field(init=False)
    # Filled by the block manager and the scheduler:
    block_table: list[int] = field(init=False, default_factory=list)
    block_hashes: list[bytes] = field(init=False, default_factory=list)  # chained, one per FULL block
    num_computed_tokens: int = field(init=False, default=0)  # tokens whose K/V are in the cache
    num_cached_tokens: int = field(init=False, default=0)  # of those, found in the prefix cache at admission
    num_preemptions: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.prompt_token_ids = tuple(int(t) for t in self.prompt_token_ids)
        self.stop_ids = frozenset(self.stop_ids)
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id!r} has an empty prompt")
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens still to run through the model: the rest of a (re)prefill, or 1 for a decode."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_waiting(self) -> bool:
        return self.status in (SequenceStatus.WAITING, SequenceStatus.PREEMPTED)

    @property
    def is_finished(self) -> bool:
        return self.status in (SequenceStatus.FINISHED, SequenceStatus.ABORTED)

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(int(token_id))
