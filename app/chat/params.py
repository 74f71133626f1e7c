"""A chat request's parameters: the ones this server does not honour refused by name, the sampling
ones checked and turned into `SamplingParams` (with the answer's grammar, app/chat/structured.py).

The table below is the contract: each OpenAI parameter the server does not honour is accepted only at
its neutral value (absent, null, or what OpenAI does by default), anything else is a 400
`unsupported_parameter` naming it, never silence.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.chat.schemas import ChatCompletionRequest
from app.errors import bad_request
from llm.grammar.spec import GrammarSpec
from llm.params import InvalidParam, SamplingParams

MAX_STOP_SEQUENCES = 4  # OpenAI's limit


@dataclass(frozen=True, slots=True)
class Unsupported:
    name: str
    neutral: Callable[[Any], bool]  # the values that ask for nothing this server lacks
    why: str


def _none(v: Any) -> bool:
    return v is None


UNSUPPORTED = (
    Unsupported("n", lambda v: v in (None, 1), "n > 1 is not supported: ask for one choice per request"),
    Unsupported("frequency_penalty", lambda v: v in (None, 0), "use repetition_penalty (e.g. 1.1) instead"),
    Unsupported("presence_penalty", lambda v: v in (None, 0), "use repetition_penalty (e.g. 1.1) instead"),
    Unsupported("logprobs", lambda v: v in (None, False), "logprobs are not offered"),
    Unsupported("top_logprobs", lambda v: v in (None, 0), "logprobs are not offered"),
    Unsupported("logit_bias", lambda v: not v, "logit_bias is not offered"),
    Unsupported("modalities", lambda v: v is None or list(v) == ["text"], "only text output is offered"),
    Unsupported("audio", _none, "audio output is not offered"),
    Unsupported("store", lambda v: v in (None, False), "completions are not stored"),
    Unsupported("metadata", lambda v: not v, "completions are not stored, so they carry no metadata"),
    Unsupported("service_tier", lambda v: v in (None, "auto", "default"), "one service tier is offered"),
    Unsupported("prediction", _none, "predicted outputs are not offered"),
    # "none" asks for no reasoning, which is what the models here do.
    Unsupported("reasoning_effort", lambda v: v in (None, "none"), "the models served here do not reason in steps"),
    Unsupported("verbosity", lambda v: v in (None, "medium"), "the models served here have one verbosity"),
    Unsupported("web_search_options", _none, "web search is not offered"),
    Unsupported("prompt_cache_key", _none, "prompt caching is automatic here (by prefix), with no key"),
    # The prefix cache lives in memory, for as long as its blocks are not needed: no retention is promised.
    Unsupported("prompt_cache_retention", lambda v: v in (None, "in_memory", "in-memory"),
                "cached prefixes live in memory only, with no promised retention"),
    Unsupported("prompt_cache_options", lambda v: not v or v == {"mode": "implicit"},
                "prompt caching is automatic here (by prefix), with no breakpoints or promised lifetime"),
    Unsupported("moderation", _none, "moderation is not offered"),
)
# Honoured elsewhere: response_format, guided_* (app/chat/structured.py); tools, tool_choice and the deprecated
# functions / function_call mapped onto them (app/chat/tools.py), refused by a model without tool calling;
# parallel_tool_calls, whatever its value: an answer makes one call at most (Llama 3.2's template takes one).
STREAM_OPTIONS = ("include_usage", "include_obfuscation")


def reject_unsupported(req: ChatCompletionRequest) -> None:
    for p in UNSUPPORTED:
        value = getattr(req, p.name)
        if not p.neutral(value):
            raise bad_request(f"{p.name} is not supported by this server: {p.why}", param=p.name,
                           code="unsupported_parameter")
    options = req.stream_options or {}
    unknown = sorted(set(options) - set(STREAM_OPTIONS))
    if unknown:
        raise bad_request(f"stream_options.{unknown[0]} is not supported; supported: {', '.join(STREAM_OPTIONS)}",
                          param=f"stream_options.{unknown[0]}", code="unsupported_parameter")
    if options.get("include_obfuscation"):
        raise bad_request("stream_options.include_obfuscation is not supported: stream chunks carry no obfuscation "
                          "field", param="stream_options.include_obfuscation", code="unsupported_parameter")
    if req.stream_options and not req.stream:
        raise bad_request("stream_options is only allowed with stream: true", param="stream_options")


def sampling_params(req: ChatCompletionRequest, max_tokens: int, grammar: GrammarSpec | None = None) -> SamplingParams:
    """The request's sampling, its bounds checked by SamplingParams itself (a 400 naming the one out of
    range)."""
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > MAX_STOP_SEQUENCES:
        raise bad_request(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed", param="stop")
    try:
        return SamplingParams(max_tokens=max_tokens, temperature=0.0 if req.temperature is None else req.temperature,
                              top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
                              repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                              seed=req.seed, stop=tuple(stops), min_tokens=req.min_tokens or 0,
                              ignore_eos=bool(req.ignore_eos), grammar=grammar)
    except InvalidParam as e:
        raise bad_request(str(e), param=e.param) from None


def completion_budget(req: ChatCompletionRequest, prompt_tokens: int, context: int, default_max_tokens: int) -> int:
    """max_completion_tokens (or the older max_tokens), checked against the model's context; with no
    explicit limit a long conversation gets what room is left (as vLLM does), not a 400."""
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if requested is not None and requested < 1:
        raise bad_request(f"{param} must be at least 1, got {requested}", param=param)
    max_tokens = requested if requested is not None else max(1, min(default_max_tokens, context - prompt_tokens))
    if prompt_tokens + max_tokens > context:
        raise bad_request(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                       f"completion). Please reduce the length of the messages or the completion.",
                       param=param, code="context_length_exceeded")
    return max_tokens
