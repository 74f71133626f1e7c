"""Grammars compiled off the engine thread and kept, by grammar and vocabulary.

    compiler = GrammarCompiler(backend)
    future = compiler.submit(spec)       # from any thread; a cached grammar comes back done
    compiled = compiler.get(spec)        # blocking (the HTTP layer's worker thread): GrammarError now

One worker thread compiles (the CPU is shared with the model; a schema takes about a millisecond). A
failed compile is cached too, so the same bad schema costs nothing the second time. The cache holds
`max_entries` grammars, least recently used out first.

Before a grammar is cached it is checked against the vocabulary: the first step must allow a token or
the end (a JSON schema on a vocabulary of bare words allows nothing), and on a vocabulary that cannot
spell every byte a bounded search must find some token path to a complete sentence, or prove there is
none. Either failure is a GrammarError naming the vocabulary's limit.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from llm.grammar.backend import CompiledGrammar, GrammarBackend, GrammarMatcher
from llm.grammar.spec import GrammarError, GrammarSpec, Vocabulary, VocabularyError

SEARCH_NODES = 2000  # matcher states the feasibility search may visit
SEARCH_DEPTH = 64  # tokens along one path


def allowed_ids(matcher: GrammarMatcher, num_tokens: int) -> np.ndarray:
    bits = np.unpackbits(matcher.allowed_bits().view(np.uint8), bitorder="little")
    return np.flatnonzero(bits[:num_tokens])


def reaches_end(matcher: GrammarMatcher, num_tokens: int, nodes: list[int], depth: int = SEARCH_DEPTH) -> bool | None:
    """True: some token path completes the grammar; False: none does; None: the budget ran out first."""
    if matcher.accepting():
        return True
    if depth == 0 or nodes[0] <= 0:
        return None
    unknown = False
    for token in allowed_ids(matcher, num_tokens):
        nodes[0] -= 1
        child = matcher.copy()
        if not child.advance(int(token)):
            continue
        found = reaches_end(child, num_tokens, nodes, depth - 1)
        if found:
            return True
        unknown |= found is None
        if nodes[0] <= 0:
            return None
    return None if unknown else False


class GrammarCompiler:
    def __init__(self, backend: GrammarBackend, max_entries: int = 256) -> None:
        self.backend, self.max_entries = backend, max_entries
        self._cache: OrderedDict[tuple[str, GrammarSpec], Future] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmserve-grammar")
        self.hits = self.misses = 0
        self.compile_seconds: list[float] = []  # one per compile, in order (the benchmark's p50)

    @classmethod
    def for_vocabulary(cls, vocabulary: Vocabulary, max_entries: int = 256) -> "GrammarCompiler":
        """The library chosen (the one line to change for another)."""
        from llm.grammar.llguidance_backend import LLGuidanceBackend  # noqa: PLC0415 - the adapter, loaded on use

        return cls(LLGuidanceBackend(vocabulary), max_entries)

    def submit(self, spec: GrammarSpec) -> Future:
        """The compiled grammar (a Future; its exception a GrammarError), compiled once per spec."""
        key = (self.backend.vocabulary.digest, spec)
        with self._lock:
            future = self._cache.get(key)
            if future is not None:
                self._cache.move_to_end(key)
                self.hits += 1
                return future
            self.misses += 1
            future = self._cache[key] = self._pool.submit(self._compile, spec)
            while len(self._cache) > self.max_entries:
                self._cache.popitem(last=False)
            return future

    def get(self, spec: GrammarSpec, timeout: float | None = None) -> CompiledGrammar:
        return self.submit(spec).result(timeout)

    def stats(self) -> dict:
        return {"grammar_cache_entries": len(self._cache), "grammar_cache_hits": self.hits,
                "grammar_cache_misses": self.misses}

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _compile(self, spec: GrammarSpec) -> CompiledGrammar:
        start = time.perf_counter()
        try:
            compiled = self.backend.compile(spec)
            self._check_expressible(spec, compiled.matcher())
            return compiled
        except GrammarError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the library raises, the request gets a 400, not a crash
            raise GrammarError(f"the {spec.describe()} grammar could not be compiled: {e}") from e
        finally:
            self.compile_seconds.append(time.perf_counter() - start)

    def _check_expressible(self, spec: GrammarSpec, matcher: GrammarMatcher) -> None:
        n = len(self.backend.vocabulary.surfaces)
        if not matcher.accepting() and not allowed_ids(matcher, n).size:
            raise VocabularyError(f"the model's vocabulary cannot write the first character the {spec.describe()} "
                               f"grammar needs")
        if not self.backend.byte_complete and reaches_end(matcher, n, [SEARCH_NODES]) is False:
            raise VocabularyError(f"the model's vocabulary cannot write any text the {spec.describe()} grammar "
                               f"accepts")
