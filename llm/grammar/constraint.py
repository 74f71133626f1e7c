"""One request's grammar state as the sampler uses it (llm/sampling.py): mask that request's logits row
to the tokens the grammar allows next, and move on by the token sampled.

The request's stop ids are its end of text: allowed exactly when the text so far is complete
(`accepting`), so an output only ends where the grammar may end, and always can once it is complete.
When the grammar allows nothing at all (a vocabulary that can spell a prefix but no continuation),
the stop ids are let through so the request ends, and `failure` says why: the engine reports the
request as failed rather than returning broken text as if it were whole.
"""

from __future__ import annotations

import numpy as np
import torch

from llm.grammar.backend import GrammarMatcher


class GrammarConstraint:
    def __init__(self, matcher: GrammarMatcher, num_tokens: int) -> None:
        self.matcher = matcher
        self.num_tokens = num_tokens  # the vocabulary's surfaces; logits rows past them are never allowed
        self.failure = ""

    def allowed(self, width: int, stop_ids: list[int]) -> torch.Tensor:
        """[width] bool: the tokens the grammar allows next, stop ids when the text may end here."""
        # (a tokenizer may also have more tokens than the model has logits rows: Mllama's <|image|>)
        bits = np.unpackbits(self.matcher.allowed_bits().view(np.uint8), bitorder="little")[: min(self.num_tokens, width)]
        allowed = torch.zeros(width, dtype=torch.bool)
        allowed[: bits.size] = torch.from_numpy(bits.astype(bool))
        stops = torch.tensor(stop_ids, dtype=torch.long)
        allowed[stops] = self.matcher.accepting()
        if not allowed.any():
            self.failure = self.matcher.error() or "the model's vocabulary has no token to continue the grammar"
            allowed[stops] = True
        return allowed

    def mask_(self, logits: torch.Tensor, stop_ids: list[int]) -> torch.Tensor:
        """logits [V], in place: -inf wherever the grammar forbids."""
        allowed = self.allowed(logits.shape[-1], stop_ids).to(logits.device)
        return logits.masked_fill_(~allowed, float("-inf"))

    def advance(self, token_id: int, stop_ids: list[int]) -> None:
        """A stop id ends the request: nothing to advance."""
        if token_id in stop_ids or self.failure:
            return
        if not self.matcher.advance(token_id):
            self.failure = self.matcher.error() or f"token {token_id} was not allowed by the grammar"
