"""Per-request sampling inside one batch: a grammar's mask, greedy, temperature, top-k, top-p, repetition
penalty, seed.

Every request carries its own `torch.Generator`, seeded from its `seed`, and draws from it only for
its own rows, so a seeded request gives the same tokens whatever else shares its batch. Greedy rows
(temperature 0) skip the random path altogether and are taken in one vectorised argmax.

A constrained request (llm/grammar) first has its own row masked to what its grammar allows; the mask
depends on that request's tokens alone, so batch invariance and seeded reproducibility hold for it too.
"""

from __future__ import annotations

import random
import torch

from llm.grammar.constraint import GrammarConstraint
from llm.params import SamplingParams


class RequestSampler:
    """One request's sampling state: its parameters, its random stream, the ids it must penalise, and its
    grammar's state when it has one."""

    def __init__(self, params: SamplingParams, stop_ids: frozenset[int], prompt_ids: list[int],
                 device: torch.device | str = "cpu", constraint: GrammarConstraint | None = None) -> None:
        self.params, self.constraint = params, constraint
        self.stop_ids = sorted(stop_ids)
        self.generator = None
        if not params.greedy:
            self.generator = torch.Generator(device=device)
            self.generator.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
        self.seen = set(prompt_ids) if params.repetition_penalty != 1 else set()

    def observe(self, token_id: int) -> None:
        if self.params.repetition_penalty != 1:
            self.seen.add(token_id)
        if self.constraint is not None:
            self.constraint.advance(token_id, self.stop_ids)

    def adjust(self, logits: torch.Tensor, num_generated: int) -> torch.Tensor:
        """Processors that also apply under greedy decoding: min-tokens masking, repetition penalty."""
        p = self.params
        if self.stop_ids and num_generated < p.min_tokens:
            logits[self.stop_ids] = float("-inf")
        if p.repetition_penalty != 1 and self.seen:
            ids = torch.tensor(sorted(self.seen), device=logits.device)
            picked = logits[ids]
            logits[ids] = torch.where(picked > 0, picked / p.repetition_penalty, picked * p.repetition_penalty)
        return logits

    def draw(self, logits: torch.Tensor) -> int:
        p = self.params
        logits = logits.float() / p.temperature
        if p.top_k:
            kth = torch.topk(logits, min(p.top_k, logits.shape[-1])).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop a token once the tokens before it already reach top_p; the best token always stays.
            drop = cumulative - sorted_logits.softmax(-1) >= p.top_p
            logits = logits.index_fill(0, order[drop], float("-inf"))
        probs = logits.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def sample(logits: torch.Tensor, samplers: list[RequestSampler], num_generated: list[int]) -> list[int]:
    """logits [S, V], one row per sampler -> one token id per row."""
    for i, s in enumerate(samplers):
        if s.constraint is not None:
            s.constraint.mask_(logits[i], s.stop_ids)
    needs_adjust = [i for i, s in enumerate(samplers)
                    if (s.stop_ids and num_generated[i] < s.params.min_tokens) or s.params.repetition_penalty != 1]
    for i in needs_adjust:
        logits[i] = samplers[i].adjust(logits[i], num_generated[i])
    tokens = logits.argmax(-1).tolist()
    for i, s in enumerate(samplers):
        if not s.params.greedy:
            tokens[i] = s.draw(logits[i])
    return tokens
