"""What one request asks of generation: its length, its sampling, its stops, its grammar. Plain data, no
torch: the scheduler (its length and stop rules), the model runner's sampler (llm/sampling.py), the
engine's detokenizer (stop strings) and grammar compiler (llm/grammar), and the HTTP layer all read this
one object."""

from __future__ import annotations

from dataclasses import dataclass

from llm.grammar.spec import GrammarSpec


class InvalidParam(ValueError):
    """A generation parameter out of its range; `param` names it (the HTTP layer's 400 says which)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class SamplingParams:
    max_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0  # HF semantics: divides positive logits of seen tokens, multiplies negative
    seed: int | None = None
    stop: tuple[str, ...] = ()  # stop strings: the text ends before the first one
    stop_token_ids: tuple[int, ...] = ()  # added to the model's own end-of-turn ids
    min_tokens: int = 0  # stop ids are masked out until this many tokens were generated
    ignore_eos: bool = False  # benchmarks: always generate max_tokens
    grammar: GrammarSpec | None = None  # the output must be a sentence of this grammar (llm/grammar)

    def __post_init__(self) -> None:
        checks = (("max_tokens", self.max_tokens >= 1, "at least 1"),
                  ("temperature", 0 <= self.temperature <= 2, "in [0, 2]"),
                  ("top_k", self.top_k >= 0, ">= 0 (0 turns it off)"),
                  ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
                  ("repetition_penalty", 0 < self.repetition_penalty <= 10, "in (0, 10]"),
                  ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, f"in [0, max_tokens = {self.max_tokens}]"))
        for name, ok, rule in checks:
            if not ok:
                raise InvalidParam(name, f"{name} must be {rule}, got {getattr(self, name)}")
        # A grammar decides where the output may end: it must be free to end there, and only there.
        if self.grammar is not None and self.min_tokens:
            raise InvalidParam("min_tokens", "min_tokens cannot be combined with a grammar (response_format, tools "
                                             "or guided_*): the grammar decides where the output ends")
        if self.grammar is not None and self.ignore_eos:
            raise InvalidParam("ignore_eos", "ignore_eos cannot be combined with a grammar (response_format, tools "
                                             "or guided_*): the grammar decides where the output ends")
        object.__setattr__(self, "stop", tuple(s for s in self.stop if s))
        object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
