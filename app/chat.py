"""From an OpenAI chat request to a completion or a stream of chunks: validation, conversation ->
turns, the image through the vision stage, generation on the engine. The controller stays a thin
adapter over this.

Leaving a generation early — the deadline passes, the client disconnects, the task is cancelled —
closes the engine stream, which aborts the request and frees its KV blocks."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import msgspec
from anyio import to_thread

from app.errors import APIError
from app.metrics import Metrics
from app.runtime import ModelRuntime
from app.schemas import (AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, ChatMessage,
                         Choice, ChunkChoice, Delta, ErrorBody, ErrorDetail, ImagePart, TextPart, Usage)
from app.settings import Settings
from llm.async_engine import AsyncEngine
from llm.chat_format import CAPTION_QUESTION, Turn
from llm.engine import ImageInput, RequestOutput
from llm.generate import tensor_digest
from llm.sampling import SamplingParams
from llm.scheduler import PromptRejected
from vision.intake import load_image


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


def _visual_tokens(value: int | float | None) -> int | float | None:
    if value is None:
        return None
    if isinstance(value, int) and value < 1 or isinstance(value, float) and not 0 < value <= 1:
        raise _bad(f"visual_tokens must be a count >= 1 or a ratio in (0, 1], got {value}", "visual_tokens")
    return value


@dataclass(frozen=True)
class PreparedChat:
    """A validated request, ready for the engine."""

    prompt: list[int]
    image_source: str
    params: SamplingParams
    visual_tokens: int | float | None


def _sse(payload: msgspec.Struct | dict) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"


UsageHook = Callable[[int], None]  # called once with a finished request's total tokens (quota charging)


class ChatService:
    def __init__(self, runtime: ModelRuntime, engine: AsyncEngine, settings: Settings,
                 metrics: Metrics | None = None) -> None:
        self.runtime = runtime
        self.engine = engine
        self.settings = settings
        self.metrics = metrics
        # One image encode at a time: torch already spreads one forward over every core.
        self._encode = threading.Lock()

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
        return PreparedChat(prompt, images[0], sampling_params(req, max_tokens), _visual_tokens(req.visual_tokens))

    # -- the image ---------------------------------------------------------------------------------
    def _encode_image(self, source: str) -> ImageInput:
        image = load_image(source, self.settings.intake_limits)
        with self._encode:
            features = self.runtime.encode_images([image])[0]
        return ImageInput(tensor_digest(features.tokens), features.tokens)

    async def image_input(self, prepared: PreparedChat) -> ImageInput:
        return await to_thread.run_sync(self._encode_image, prepared.image_source)

    # -- generation --------------------------------------------------------------------------------
    async def _outputs(self, prepared: PreparedChat, image: ImageInput) -> AsyncIterator[RequestOutput]:
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

    async def complete(self, req: ChatCompletionRequest, on_usage: UsageHook | None = None) -> ChatCompletion:
        prepared = self.prepare(req)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                image = await self.image_input(prepared)
                final = None
                async for out in self._outputs(prepared, image):
                    final = out
        except TimeoutError:
            raise self._timeout() from None
        if on_usage is not None:
            on_usage(final.prompt_tokens + final.completion_tokens)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.runtime.name,
            choices=[Choice(0, AssistantMessage(final.text), final.finish_reason)],
            usage=Usage(final.prompt_tokens, final.completion_tokens, final.prompt_tokens + final.completion_tokens))

    async def start_stream(self, req: ChatCompletionRequest,
                           on_usage: UsageHook | None = None) -> AsyncIterator[bytes]:
        """Validate and encode the image now (errors become a 4xx before the first byte), then return
        the server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
        prepared = self.prepare(req)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                image = await self.image_input(prepared)
        except TimeoutError:
            raise self._timeout() from None
        return self._events(prepared, image, include_usage, deadline, on_usage)

    async def _events(self, prepared: PreparedChat, image: ImageInput, include_usage: bool,
                      deadline: float, on_usage: UsageHook | None) -> AsyncIterator[bytes]:
        chunk_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.runtime.name

        def chunk(delta: Delta, finish: str | None = None, usage: Usage | None = None, choices=True) -> bytes:
            return _sse(ChatCompletionChunk(chunk_id, created, model,
                                            [ChunkChoice(0, delta, finish)] if choices else [], usage))

        yield chunk(Delta(role="assistant", content=""))
        final = None
        try:
            async with asyncio.timeout_at(deadline):
                async for out in self._outputs(prepared, image):
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
