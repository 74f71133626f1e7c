"""The engine: scheduler + model runner + detokenizer, one step at a time (single-threaded).

    out = scheduler.schedule(); sampled = runner.run(out); finished = scheduler.update(out, sampled)

plus, per request, incremental detokenization and stop strings. `llm.async_engine.AsyncEngine` runs
this loop in its own thread for the server; the CLI and the benchmarks call `generate` directly.

A request with a grammar (SamplingParams.grammar) is parked until its grammar is compiled, on the
compiler's own thread (llm/grammar/compiler.py), and joins the scheduler's queue then: the step never
waits for a compile. Its grammar state rides on its sampler in the model runner.
"""

from __future__ import annotations

import hashlib
import uuid
from collections import abc
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass

import torch

from llm.cross_plan import ImageSpan
from llm.grammar.compiler import GrammarCompiler
from llm.grammar.constraint import GrammarConstraint
from llm.grammar.spec import GrammarError, Vocabulary
from llm.kv_cache import resolve_kv_dtype
from llm.model_runner import ModelRunner
from llm.packed_linear import pack_linears
from llm.params import SamplingParams
from llm.scheduler import Scheduler, SchedulerConfig
from llm.sequence import Sequence
from llm.loading.tokenizers import TextTokenizer


@dataclass(frozen=True, slots=True)
class EngineConfig:
    block_size: int = 16
    kv_cache_bytes: int = 256 << 20  # the self-attention KV pool, preallocated
    cross_cache_bytes: int = 256 << 20  # the image K/V pool, preallocated; kept for reuse
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    kv_cache_dtype: str = "auto"  # both K/V pools: auto (the model's dtype), float32, bfloat16, int8 (llm/kv_cache.py)
    pack_weights: bool = True  # fp32 on CPU: oneDNN-packed linear weights (llm/packed_linear.py)
    compile_decode: bool = False  # decode-only steps through torch.compile (llm/model_runner.py)
    grammar_cache_entries: int = 256  # compiled grammars kept (llm/grammar/compiler.py)

    def __post_init__(self) -> None:
        for name in ("block_size", "kv_cache_bytes", "max_num_seqs", "max_num_batched_tokens", "grammar_cache_entries"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine setting {name} must be positive, got {getattr(self, name)}")
        if self.cross_cache_bytes < 0:
            raise ValueError("engine setting cross_cache_bytes must be >= 0")
        resolve_kv_dtype(self.kv_cache_dtype, torch.float32)  # raises for an unknown name


def tensor_digest(tokens: torch.Tensor) -> str:
    """A content digest for visual tokens that did not come through the vision stage's cache."""
    t = tokens.detach().to("cpu").contiguous()
    return hashlib.sha256(str((t.dtype, tuple(t.shape))).encode() + t.view(torch.uint8).numpy().tobytes()).hexdigest()


@dataclass(frozen=True, slots=True)
class ImageInput:
    """The visual tokens a request cross-attends to, named by the digest of the features (the vision
    stage's cache key): the same digest must always mean the same tokens."""

    digest: str
    tokens: torch.Tensor  # [N, width]
    attended_tokens: int | None = None  # text at/after the image sees tokens[:attended_tokens]; None: all

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if self.attended_tokens is not None and not 0 < self.attended_tokens <= n:
            raise ValueError(f"attended_tokens must be in 1..{n} (the image's tokens), got {self.attended_tokens}")

    @classmethod
    def from_features(cls, features, digest: str | None = None) -> "ImageInput":
        """From vision ImageFeatures; the digest defaults to one of the tokens' bytes."""
        return cls(digest or tensor_digest(features.tokens), features.tokens, features.attended_tokens)

    @property
    def span(self) -> ImageSpan:
        n = self.tokens.shape[0]
        return ImageSpan(n, n if self.attended_tokens is None else self.attended_tokens)


Images = ImageInput | abc.Sequence[ImageInput] | None  # what a request cross-attends to: one, several (in prompt order), none


def image_run(images: Images) -> tuple[str | None, torch.Tensor | None, tuple[ImageSpan, ...]]:
    """A request's images as the model runner takes them: one run of tokens end to end, named by one
    digest (an image's own digest when it is alone, so its K/V are shared with every request showing
    it; a digest of the digests for several), and each image's span. (None, None, ()) for none."""
    images = (images,) if isinstance(images, ImageInput) else tuple(images or ())
    if not images:
        return None, None, ()
    if len(images) == 1:
        return images[0].digest, images[0].tokens, (images[0].span,)
    digest = hashlib.sha256("|".join(i.digest for i in images).encode()).hexdigest()
    return digest, torch.cat([i.tokens for i in images]), tuple(i.span for i in images)


@dataclass(frozen=True, slots=True)
class RequestOutput:
    request_id: str
    delta_text: str  # new text since the last output of this request
    text: str  # all text so far (final when finished)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" once finished
    token_ids: tuple[int, ...]  # all generated ids so far, a stop id excluded
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens whose K/V came from the prefix cache
    error: Exception | None = None  # the request failed (finish_reason "abort"): e.g. a GrammarError


class IncrementalDetokenizer:
    """Text deltas from a growing list of token ids, with stop strings.

    Text that might still turn into a stop string (a suffix that is a prefix of one) or that ends in a
    half-decoded character is held back until the next token settles it, so a stop string is never
    streamed and then retracted."""

    def __init__(self, tokenizer: TextTokenizer | None, stop: tuple[str, ...]) -> None:
        self.tokenizer, self.stop = tokenizer, stop
        self.emitted = ""

    def update(self, output_ids: list[int], final: bool) -> tuple[str, str, bool]:
        """-> (delta, full text, hit a stop string). No tokenizer: token ids only, no text."""
        if self.tokenizer is None:
            return "", "", False
        text = self.tokenizer.decode(output_ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        hit = cut >= 0
        if hit:
            text = text[:cut]
        safe = len(text)
        if not (hit or final):
            safe -= max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            if text[:safe].endswith("\ufffd"):
                safe -= 1
        if not text.startswith(self.emitted) or safe < len(self.emitted):
            return "", text, hit  # the tokenizer re-spelled earlier text; the final `text` is authoritative
        delta = text[len(self.emitted):safe]
        self.emitted += delta
        return delta, text, hit


@dataclass
class _Live:
    seq: Sequence
    detokenizer: IncrementalDetokenizer
    stop_ids: frozenset[int]


class Engine:
    def __init__(self, model: torch.nn.Module, tokenizer: TextTokenizer | None, stop_ids: tuple[int, ...],
                 config: EngineConfig = EngineConfig(), vocabulary: Vocabulary | None = None) -> None:
        """`vocabulary`: the tokens' surface forms, declared by the model's family; None: grammars are refused."""
        self.model, self.tokenizer, self.config = model, tokenizer, config
        if config.pack_weights:
            pack_linears(model)  # in place: the engine owns the model from here on
        self.stop_ids = frozenset(stop_ids)  # the model's own end-of-turn ids
        kv_dtype = resolve_kv_dtype(config.kv_cache_dtype, next(model.parameters()).dtype)
        num_blocks = ModelRunner.blocks_for_budget(model, config.kv_cache_bytes, config.block_size, kv_dtype)
        self.scheduler = Scheduler(SchedulerConfig(
            num_blocks=num_blocks, max_model_len=model.context_length, block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=max(config.max_num_batched_tokens, config.max_num_seqs)))
        self.runner = ModelRunner(model, num_blocks, config.block_size, config.cross_cache_bytes, kv_dtype,
                                  compile_decode=config.compile_decode)
        self._live: dict[str, _Live] = {}
        self.grammars = (GrammarCompiler.for_vocabulary(vocabulary, config.grammar_cache_entries)
                         if vocabulary is not None else None)
        self._parked: dict[str, tuple[list[int], Images, SamplingParams, Future]] = {}  # grammar compiling

    @property
    def context_length(self) -> int:
        return self.model.context_length

    def add_request(self, request_id: str, prompt_ids: list[int], images: Images, params: SamplingParams) -> None:
        """`images`: one ImageInput, several in prompt order, or None for a text-only request (families
        that can). Raises llm.scheduler.PromptRejected for a prompt that can never run, ValueError for
        images the model cannot take, GrammarError for a grammar already known bad (one still compiling
        fails later, as an output whose `error` is set)."""
        if params.grammar is None:
            return self._admit(request_id, prompt_ids, images, params, None)
        if self.grammars is None:
            raise GrammarError("this model declares no token surfaces, so it cannot follow a grammar")
        if request_id in self._live or request_id in self._parked:
            raise ValueError(f"request id {request_id!r} is already in use")
        future = self.grammars.submit(params.grammar)
        if future.done():
            return self._admit(request_id, prompt_ids, images, params, self._constraint(future))
        self._parked[request_id] = (prompt_ids, images, params, future)

    def _constraint(self, compiled: Future) -> GrammarConstraint:
        return GrammarConstraint(compiled.result().matcher(), len(self.grammars.backend.vocabulary.surfaces))

    def _admit(self, request_id: str, prompt_ids: list[int], images: Images, params: SamplingParams,
               constraint: GrammarConstraint | None) -> None:
        digest, tokens, spans = image_run(images)
        stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.stop_ids)
        seq = Sequence(request_id, tuple(prompt_ids), extra_key=digest or "", params=params, stop_ids=stop_ids)
        self.runner.add_request(request_id, list(prompt_ids), digest, tokens, spans, params, stop_ids, constraint)
        try:
            self.scheduler.add(seq)
        except Exception:
            self.runner.release(request_id)
            raise
        self._live[request_id] = _Live(seq, IncrementalDetokenizer(self.tokenizer, params.stop), stop_ids)

    def abort(self, request_id: str) -> bool:
        """Drop a request now: its KV blocks and its hold on the image K/V go back at once."""
        if self._parked.pop(request_id, None) is not None:
            return True
        self._live.pop(request_id, None)
        self.runner.release(request_id)
        return self.scheduler.abort(request_id)

    @property
    def has_unfinished(self) -> bool:
        return not self.scheduler.is_idle or bool(self._parked)

    def _admit_compiled(self) -> list[RequestOutput]:
        """Parked requests whose grammar is ready join the queue; those whose grammar failed end, failed.
        With nothing else to run, wait a moment for a compile rather than spin."""
        if self.scheduler.is_idle and self._parked:
            wait([f for *_, f in self._parked.values()], timeout=0.01, return_when=FIRST_COMPLETED)
        failed = []
        for request_id, (prompt_ids, images, params, future) in list(self._parked.items()):
            if not future.done():
                continue
            del self._parked[request_id]
            try:
                self._admit(request_id, prompt_ids, images, params, self._constraint(future))
            except Exception as e:  # noqa: BLE001 - GrammarError, PromptRejected...: this request's alone
                failed.append(RequestOutput(request_id, "", "", True, "abort", (), len(prompt_ids), 0, 0, e))
        return failed

    def step(self) -> list[RequestOutput]:
        outputs = self._admit_compiled()
        out = self.scheduler.schedule()
        sampled = self.runner.run(out)
        finished = {seq.request_id for seq in self.scheduler.update(out, sampled)}
        for request_id in sampled:
            live = self._live.get(request_id)
            if live is None:
                continue
            seq = live.seq
            done = request_id in finished
            delta, text, hit_stop = live.detokenizer.update(seq.output_token_ids, final=done)
            reason = seq.finish_reason if done else None
            if hit_stop and not done:
                self.scheduler.abort(request_id)
                done, reason = True, "stop"
            completion = seq.num_output_tokens + (reason == "stop" and not hit_stop)  # the stop id counts
            failure = self.runner.grammar_failure(request_id) if done else ""
            error = GrammarError(f"the output cannot go on under its grammar: {failure}") if failure else None
            outputs.append(RequestOutput(request_id, delta, text, done, "abort" if error else reason,
                                         tuple(seq.output_token_ids), seq.num_prompt_tokens, completion,
                                         seq.num_cached_tokens, error))
            if done:
                del self._live[request_id]
                self.runner.release(request_id)
        return outputs

    def generate(self, requests: list[tuple[list[int], Images, SamplingParams]]) -> list[RequestOutput]:
        """Run a batch of requests to completion; the final output of each, in order."""
        ids = [f"generate-{uuid.uuid4().hex}" for _ in requests]
        for request_id, (prompt, image, params) in zip(ids, requests):
            self.add_request(request_id, prompt, image, params)
        final: dict[str, RequestOutput] = {}
        while self.has_unfinished:
            for o in self.step():
                if o.finished:
                    final[o.request_id] = o
        return [final[i] for i in ids]

    def stats(self) -> dict:
        bm = self.scheduler.block_manager
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_total": self.scheduler.config.num_blocks, "kv_blocks_used": bm.num_used_blocks,
                "kv_usage": bm.usage, "kv_pool_bytes": self.runner.kv_pool_bytes,
                "cross_kv_entries": len(self.runner.cross_pool), "cross_kv_bytes": self.runner.cross_pool.bytes,
                "cross_kv_hits": self.runner.cross_pool.hits, "cross_kv_misses": self.runner.cross_pool.misses,
                "grammar_parked": len(self._parked), **(self.grammars.stats() if self.grammars else {})}
