"""The interface a grammar library is used through, so that another can replace the one chosen
(llm/grammar/llguidance_backend.py). Three small roles:

    backend = LLGuidanceBackend(vocabulary)     # once per model: the vocabulary as the library holds it
    compiled = backend.compile(spec)            # per grammar (cached by llm/grammar/compiler.py); GrammarError
    matcher = compiled.matcher()                # per request: where it is in the grammar

A matcher answers which tokens may come next and moves on by the token sampled. No torch here: the
allowed set travels as a packed bitmask (bit i of the little-endian 32-bit words = token i), which
llm/grammar/constraint.py turns into the logits mask.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from llm.grammar.spec import GrammarSpec, Vocabulary


class GrammarMatcher(Protocol):
    def allowed_bits(self) -> np.ndarray:
        """uint32 words, bit i set when token i may come next (the vocabulary's surfaces only)."""

    def accepting(self) -> bool:
        """The text so far is a complete sentence of the grammar: the output may end here."""

    def advance(self, token_id: int) -> bool:
        """Move on by one sampled token; False when the token was not allowed (the matcher is then in error)."""

    def error(self) -> str:
        """Why the matcher is in error; "" when it is not."""

    def copy(self) -> "GrammarMatcher":
        """An independent matcher in the same state."""


class CompiledGrammar(Protocol):
    def matcher(self) -> GrammarMatcher:
        """A fresh matcher at the grammar's start."""


class GrammarBackend(Protocol):
    name: str  # the library, with its version (what the benchmark reports)
    vocabulary: Vocabulary
    byte_complete: bool  # every single byte is some token's surface: any text can be spelled

    def compile(self, spec: GrammarSpec) -> CompiledGrammar:
        """Raises GrammarError naming the problem (an unsupported keyword, a bad regex...)."""
