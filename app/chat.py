"""From an OpenAI chat request to a completion or a stream of chunks: validation, conversation ->
turns, the image through the vision stage, generation on the engine. The controller stays a thin
adapter over this.

Leaving a generation early — the deadline passes, the client disconnects, the task is cancelled —
closes the engine stream, which aborts the request and frees its KV blocks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
from anyio import to_thread

from app.errors import APIError
from app.metrics import Metrics
from app.router import RouteDecision, StagedRouter, route_turns
from app.runtime import ModelRuntime
from app.schemas import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage,
                         Choice, ChunkChoice, Delta, ErrorBody, ErrorDetail, ImagePart, TextPart, Usage)
from app.settings import Settings
from llm.async_engine import AsyncEngine
from llm.chat_format import CAPTION_QUESTION, Turn
from llm.engine import ImageInput, RequestOutput
from llm.sampling import SamplingParams
from llm.scheduler import PromptRejected
from vision.stage import VisionStage, VisualTokensError


def _bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def reject_unsupported(req: ChatCompletionRequest) -> None:
    if req.n is not None and req.n != 1:
        raise _bad("n > 1 is not supported: ask for one choice per request", "n", "unsupported_parameter")
    if req.tools:
        raise _bad("tools are not supported by this model", "tools", "unsupported_parameter")
    if req.tool_choice not in (None, "none"):
        raise _bad("tool_choice is not supported by this model", "tool_choice", "unsupported_parameter")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise _bad("only response_format type 'text' is supported", "response_format", "unsupported_parameter")
    if req.logprobs:
        raise _bad("logprobs are not supported yet", "logprobs", "unsupported_parameter")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(req, name) not in (None, 0, 0.0):
            raise _bad(f"{name} is not supported; use repetition_penalty (e.g. 1.1) instead", name,
                       "unsupported_parameter")


def sampling_params(req: ChatCompletionRequest, max_tokens: int) -> SamplingParams:
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4:
        raise _bad("at most 4 stop sequences are allowed", "stop")
    checks = [("temperature", req.temperature, lambda v: 0 <= v <= 2, "in [0, 2]"),
              ("top_p", req.top_p, lambda v: 0 < v <= 1, "in (0, 1]"),
              ("top_k", req.top_k, lambda v: v >= 0, ">= 0 (0 turns it off)"),
              ("repetition_penalty", req.repetition_penalty, lambda v: 0 < v <= 10, "in (0, 10]")]
    for name, value, ok, rule in checks:
        if value is not None and not ok(value):
            raise _bad(f"{name} must be {rule}, got {value}", name)
    return SamplingParams(max_tokens=max_tokens, temperature=req.temperature or 0.0,
                          top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p,
                          repetition_penalty=req.repetition_penalty or 1.0, seed=req.seed, stop=tuple(stops))


def _parts(message: ChatMessage) -> list:
    if message.content is None:
        return []
    if isinstance(message.content, str):
        return [TextPart(message.content)]
    return list(message.content)


def conversation(messages: list[ChatMessage], max_images: int) -> tuple[list[Turn], list[str]]:
    """OpenAI messages -> (turns, image sources). System and developer messages carry no meaning for
    the models served here and are skipped."""
    turns: list[Turn] = []
    images: list[str] = []
    pending: str | None = None
    for i, message in enumerate(messages):
        parts = _parts(message)
        text = " ".join(p.text for p in parts if isinstance(p, TextPart)).strip()
        if message.role == "user":
            if pending is not None:
                raise _bad(f"messages[{i}]: two user messages in a row; put an assistant reply between them",
                           "messages")
            images += [p.image_url.url for p in parts if isinstance(p, ImagePart)]
            pending = text or CAPTION_QUESTION  # an image with no text asks for a caption
        elif message.role == "assistant":
            if pending is None:
                raise _bad(f"messages[{i}]: an assistant message must follow a user message", "messages")
            if any(isinstance(p, ImagePart) for p in parts):
                raise _bad(f"messages[{i}]: assistant messages cannot hold images", "messages")
            turns.append(Turn(pending, text))
            pending = None
    if pending is None:
        raise _bad("the last message must be a user message", "messages")
    turns.append(Turn(pending))
    if not images:
        raise _bad("no image in the conversation: add an image_url content part with a data: URL", "messages",
                   "missing_image")
    if len(images) > max_images:
        raise _bad(f"the conversation has {len(images)} images; this server accepts at most {max_images}",
                   "messages", "too_many_images")
    return turns, images


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, ready for the engine."""

    prompt: list[int]
    turns: list[Turn]
    image_source: str
    params: SamplingParams
    visual_tokens: int | float | None


@dataclass(frozen=True)
class Routed:
    """The request's image as the engine takes it, and what the staged router decided."""

    image: ImageInput
    decision: RouteDecision | None

    @property
    def route(self) -> str:
        return self.decision.route if self.decision is not None else "decoder"


def _sse(payload: msgspec.Struct | dict) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


UsageHook = Callable[[int], None]  # called once with a finished request's total tokens (quota charging)


class ChatService:
    def __init__(self, runtime: ModelRuntime, engine: AsyncEngine, vision: VisionStage, settings: Settings,
                 metrics: Metrics | None = None, router: StagedRouter | None = None) -> None:
        self.runtime = runtime
        self.engine = engine
        self.vision = vision
        self.settings = settings
        self.metrics = metrics
        self.router = router

    # -- validation --------------------------------------------------------------------------------
    def prepare(self, req: ChatCompletionRequest) -> PreparedChat:
        reject_unsupported(req)
        if req.model is not None and req.model != self.runtime.name:
            raise APIError(404, f"model {req.model!r} not found; this server serves {self.runtime.name!r}",
                           type="not_found_error", param="model", code="model_not_found")
        if not req.messages:
            raise _bad("messages must not be empty", "messages")
        turns, images = conversation(req.messages, self.settings.max_images_per_request)
        try:
            prompt = self.runtime.prompt_ids(turns)
        except ValueError as e:
            raise _bad(str(e), "messages", "unsupported_prompt") from None
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        if requested is not None and requested < 1:
            raise _bad(f"{param} must be at least 1, got {requested}", param)
        context = self.runtime.context_length
        # With no explicit limit, a long conversation gets what room is left (as vLLM does), not a 400.
        max_tokens = requested if requested is not None else max(
            1, min(self.settings.default_max_tokens, context - len(prompt)))
        if len(prompt) + max_tokens > context:
            raise _bad(f"This model's maximum context length is {context} tokens. However, you requested "
                       f"{len(prompt) + max_tokens} tokens ({len(prompt)} in the messages, {max_tokens} in the "
                       f"completion). Please reduce the length of the messages or the completion.",
                       param, "context_length_exceeded")
        return PreparedChat(prompt, turns, images[0], sampling_params(req, max_tokens), req.visual_tokens)

    # -- the image and the route ---------------------------------------------------------------------
    def _resolve(self, prepared: PreparedChat, tenant: str | None) -> Routed:
        """Blocking (run off the loop): features from the vision stage's cache or encoder, then the
        staged router's decision."""
        try:
            result = self.vision.features(prepared.image_source, prepared.visual_tokens, tenant)
        except VisualTokensError as e:
            raise _bad(str(e), "visual_tokens", e.code) from None
        if self.metrics is not None:
            self.metrics.record_feature_cache("hot", result.source == "hot")
            if result.source != "hot":
                self.metrics.record_feature_cache("disk", result.source == "disk")
        decision = None
        if self.router is not None:
            decision = route_turns(self.router, result.features, prepared.turns)
            if self.metrics is not None:
                self.metrics.record_route(decision.route)
        return Routed(ImageInput(result.key, result.features.tokens), decision)

    async def resolve(self, prepared: PreparedChat, tenant: str | None) -> Routed:
        return await to_thread.run_sync(self._resolve, prepared, tenant)

    # -- generation --------------------------------------------------------------------------------
    async def _outputs(self, prepared: PreparedChat, routed: Routed) -> AsyncIterator[RequestOutput]:
        decision = routed.decision
        if decision is not None and decision.finished:  # stage 1 answered: no decoder
            completion = len(self.runtime.tokenizer.encode(decision.answer)) + 1  # and the end token
            yield RequestOutput("stage1", decision.answer, decision.answer, True, "stop", (), len(prepared.prompt),
                                completion, 0)
            return
        image = routed.image
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        timer = self.metrics.generation_timer() if self.metrics else None
        emitted = 0
        try:
            async for out in self.engine.generate(request_id, prepared.prompt, image, prepared.params):
                if timer is not None and out.completion_tokens > emitted:
                    timer.tokens(out.completion_tokens - emitted)
                    emitted = out.completion_tokens
                yield out
        except PromptRejected as e:
            raise _bad(str(e), "messages", "context_length_exceeded") from None

    def _error_event(self, e: APIError) -> bytes:
        """An error after the stream started: the status line is long gone, so it travels as an event
        (and the metrics middleware, which saw a 200, hears of it here)."""
        if self.metrics is not None:
            self.metrics.record_failure(e.type, e.code)
        return _sse(ErrorBody(ErrorDetail(e.message, e.type, e.param, e.code)))

    def _timeout(self) -> APIError:
        return APIError(504, f"the request took longer than {self.settings.request_timeout_s} s",
                        type="timeout_error", code="timeout")

    async def complete(self, req: ChatCompletionRequest, on_usage: UsageHook | None = None,
                       tenant: str | None = None) -> tuple[ChatCompletion, str]:
        """-> (the completion, the route that answered it)."""
        prepared = self.prepare(req)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                routed = await self.resolve(prepared, tenant)
                final = None
                async for out in self._outputs(prepared, routed):
                    final = out
        except TimeoutError:
            raise self._timeout() from None
        if on_usage is not None:
            on_usage(final.prompt_tokens + final.completion_tokens)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.runtime.name,
            choices=[Choice(0, AssistantMessage(final.text), final.finish_reason)],
            usage=Usage(final.prompt_tokens, final.completion_tokens, final.prompt_tokens + final.completion_tokens)
        ), routed.route

    async def start_stream(self, req: ChatCompletionRequest, on_usage: UsageHook | None = None,
                           tenant: str | None = None) -> tuple[AsyncIterator[bytes], str]:
        """Validate, get the image's features and route now (errors become a 4xx before the first
        byte); -> (the server-sent events in OpenAI's chunk format ending with `data: [DONE]`, the route)."""
        prepared = self.prepare(req)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                routed = await self.resolve(prepared, tenant)
        except TimeoutError:
            raise self._timeout() from None
        return self._events(prepared, routed, include_usage, deadline, on_usage), routed.route

    async def _events(self, prepared: PreparedChat, routed: Routed, include_usage: bool,
                      deadline: float, on_usage: UsageHook | None) -> AsyncIterator[bytes]:
        chunk_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.runtime.name

        def chunk(delta: Delta, finish: str | None = None, usage: Usage | None = None, choices=True) -> bytes:
            return _sse(ChatCompletionChunk(chunk_id, created, model,
                                            [ChunkChoice(0, delta, finish)] if choices else [], usage))

        yield chunk(Delta(role="assistant", content=""))
        final = None
        try:
            async with asyncio.timeout_at(deadline):
                async for out in self._outputs(prepared, routed):
                    final = out
                    if out.delta_text or out.finished:
                        yield chunk(Delta(content=out.delta_text) if out.delta_text else Delta(), out.finish_reason)
        except TimeoutError:
            yield self._error_event(self._timeout())
        except APIError as e:
            yield self._error_event(e)
        if on_usage is not None and final is not None:
            on_usage(final.prompt_tokens + final.completion_tokens)
        if include_usage and final is not None:
            yield chunk(Delta(), usage=Usage(final.prompt_tokens, final.completion_tokens,
                                             final.prompt_tokens + final.completion_tokens), choices=False)
        yield b"data: [DONE]\n\n"
