"""The grammar library behind llm/grammar/backend.py: llguidance (guidance-ai's Rust crate, the engine of
vLLM's and SGLang's "guidance" backends).

Why this one: it has no dependencies; it names what it cannot do (a JSON schema keyword it does not
implement is an error naming the keyword, where xgrammar 0.2.9 silently drops `uniqueItems`, `not` or an
unknown `format`); one Lark grammar can hold a JSON schema (`%json {...}`), which is how a tool call
(a fixed prefix, then arguments matching the function's schema) is written; and it needs no per-grammar
precomputation over the vocabulary (a schema compiles in ~1 ms, a mask costs tens of microseconds),
which suits a CPU shared with the model.

Every kind is built as one Lark grammar, so that a vocabulary whose text drops a leading space
(`Vocabulary.drops_leading_space`) gets an optional space in front of any of them. JSON is generated
in llm/grammar/spec.py's JSON_STYLE (no free whitespace).
"""

from __future__ import annotations

import json
import re

import llguidance
import numpy as np

from llm.grammar.spec import JSON_STYLE, GrammarError, GrammarSpec, Vocabulary, json_rule
_START = re.compile(r"(?m)^(\s*)start(\s*):")


class _Surfaces:
    """The vocabulary as llguidance's TokenizerWrapper reads it: control tokens as 0xFF + a name, one
    extra control token at the end that the library uses as its end-of-text marker (ours are the
    request's stop ids, handled in llm/grammar/constraint.py), and a greedy longest-match encoder (the
    library tokenizes only the few bytes a grammar forces, and never for what is sampled)."""

    def __init__(self, vocabulary: Vocabulary) -> None:
        n = len(vocabulary.surfaces)
        self.tokens = [b"\xff<ctl%d>" % i if s is None else s for i, s in enumerate(vocabulary.surfaces)]
        self.tokens.append(b"\xff<end>")
        self.special_token_ids = [*vocabulary.control_ids, n]
        self.eos_token_id, self.bos_token_id = n, None
        self._by_surface = {s: i for i, s in enumerate(vocabulary.surfaces) if s}
        self._longest = max((len(s) for s in self._by_surface), default=1)

    def __call__(self, text: bytes | str) -> list[int]:
        data = text.encode() if isinstance(text, str) else text
        ids, at = [], 0
        while at < len(data):
            for k in range(min(self._longest, len(data) - at), 0, -1):
                token = self._by_surface.get(data[at:at + k])
                if token is not None:
                    ids.append(token)
                    at += k
                    break
            else:
                at += 1  # a byte no token spells: skipped (the grammar can never force it)
        return ids


class LLGuidanceMatcher:
    def __init__(self, matcher: llguidance.LLMatcher, num_words: int) -> None:
        self._m, self._words = matcher, num_words

    def allowed_bits(self) -> np.ndarray:
        return np.frombuffer(self._m.compute_bitmask(), dtype=np.uint32)[: self._words]

    def accepting(self) -> bool:
        return self._m.is_accepting()

    def advance(self, token_id: int) -> bool:
        return self._m.consume_token(token_id)

    def error(self) -> str:
        return self._m.get_error() if self._m.is_error() else ""

    def copy(self) -> "LLGuidanceMatcher":
        return LLGuidanceMatcher(self._m.deep_copy(), self._words)


class LLGuidanceGrammar:
    def __init__(self, template: llguidance.LLMatcher, num_words: int) -> None:
        self._template, self._words = template, num_words

    def matcher(self) -> LLGuidanceMatcher:
        return LLGuidanceMatcher(self._template.deep_copy(), self._words)


class LLGuidanceBackend:
    def __init__(self, vocabulary: Vocabulary) -> None:
        self.vocabulary = vocabulary
        self.name = f"llguidance {llguidance.__version__}"
        surfaces = _Surfaces(vocabulary)
        self._tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(surfaces))
        self._words = -(-len(vocabulary.surfaces) // 32)
        singles = {s for s in vocabulary.surfaces if s is not None and len(s) == 1}
        self.byte_complete = len(singles) == 256

    def compile(self, spec: GrammarSpec) -> LLGuidanceGrammar:
        lark = self._lark(spec)
        matcher = llguidance.LLMatcher(self._tokenizer, llguidance.LLMatcher.grammar_from_lark(lark), log_level=0)
        if matcher.is_error():
            raise GrammarError(f"invalid {spec.describe()} grammar: {matcher.get_error().strip()}")
        return LLGuidanceGrammar(matcher, self._words)

    def _lark(self, spec: GrammarSpec) -> str:
        if spec.kind in ("json_schema", "json_object"):
            schema = json.loads(spec.source) if spec.kind == "json_schema" else {"type": "object"}
            if not isinstance(schema, dict):
                raise GrammarError("a JSON schema must be a JSON object")
            checked = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=JSON_STYLE)
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(checked)
            if failed:  # checked alone, so that the message names the schema's keyword, not our wrapper
                raise GrammarError(f"unsupported or invalid JSON schema: {messages[0].strip()}")
            body = json_rule(schema)
        elif spec.kind == "regex":
            failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
                llguidance.LLMatcher.grammar_from_regex(spec.source))
            if failed:
                raise GrammarError(f"invalid regex: {messages[0].strip()}")
            body = "/" + llguidance.regex_to_lark(spec.source) + "/"
        elif spec.kind == "choice":
            options = json.loads(spec.source)
            if not options or not all(isinstance(o, str) and o for o in options):
                raise GrammarError("a choice needs at least one option, each a non-empty string")
            body = " | ".join(json.dumps(o) for o in options)
        else:  # lark: the grammar's own start rule, renamed so that the wrapper can stand in front
            if not _START.search(spec.source):
                raise GrammarError("a Lark grammar needs a `start` rule")
            return (_START.sub(r"\1mmserve_body\2:", spec.source) + "\nstart: " +
                    ('" "? ' if self.vocabulary.drops_leading_space else "") + "mmserve_body\n")
        lead = '" "? ' if self.vocabulary.drops_leading_space else ""
        return f"start: {lead}mmserve_body\nmmserve_body: {body}\n"
