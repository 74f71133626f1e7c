"""From an OpenAI chat request to a completion: validation, conversation -> turns, inference off the
event loop. The controller stays a thin adapter over this."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid

from anyio import to_thread

from app.errors import APIError
from app.runtime import ModelRuntime
from app.schemas import (AssistantMessage, ChatCompletion, ChatCompletionRequest, ChatMessage, Choice, ImagePart,
                         TextPart, Usage)
from app.settings import Settings
from llm.chat_format import CAPTION_QUESTION, Turn
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
    if req.stream:
        raise _bad("stream=true is not supported yet; send stream=false", "stream", "unsupported_parameter")
    if req.temperature is not None and req.temperature != 0 and not 0 <= req.temperature <= 2:
        raise _bad(f"temperature must be in [0, 2], got {req.temperature}", "temperature")
    if req.temperature not in (None, 0, 0.0):
        raise _bad("temperature > 0 is not supported yet: this server decodes greedily (send 0 or omit it)",
                   "temperature", "unsupported_parameter")
    if req.top_p is not None and req.top_p != 1:
        raise _bad("top_p < 1 is not supported yet: this server decodes greedily", "top_p", "unsupported_parameter")


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


def _truncate_at_stop(text: str, stop: str | list[str] | None) -> tuple[str, bool]:
    stops = [stop] if isinstance(stop, str) else (stop or [])
    cut = min((text.find(s) for s in stops if s and s in text), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


class ChatService:
    def __init__(self, runtime: ModelRuntime, settings: Settings) -> None:
        self.runtime = runtime
        self.settings = settings
        # One forward at a time: torch already spreads one forward over every core.
        self._compute = threading.Lock()

    def _run(self, image_source: str, prompt: list[int], max_tokens: int):
        image = load_image(image_source, self.settings.intake_limits)
        with self._compute:
            features = self.runtime.encode_images([image])
            return self.runtime.complete(features, [prompt], max_tokens)[0]

    async def complete(self, req: ChatCompletionRequest) -> ChatCompletion:
        reject_unsupported(req)
        if req.model is not None and req.model != self.runtime.name:
            raise APIError(404, f"model {req.model!r} not found; this server serves {self.runtime.name!r}",
                           type="not_found_error", param="model", code="model_not_found")
        if not req.messages:
            raise _bad("messages must not be empty", "messages")
        if req.stop is not None and len([req.stop] if isinstance(req.stop, str) else req.stop) > 4:
            raise _bad("at most 4 stop sequences are allowed", "stop")
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
        try:
            done = await asyncio.wait_for(to_thread.run_sync(self._run, images[0], prompt, max_tokens),
                                          self.settings.request_timeout_s)
        except TimeoutError:
            raise APIError(504, f"the request took longer than {self.settings.request_timeout_s} s",
                           type="timeout_error", code="timeout") from None
        text, stopped = _truncate_at_stop(done.text, req.stop)
        return ChatCompletion(
            id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=self.runtime.name,
            choices=[Choice(0, AssistantMessage(text), "stop" if stopped else done.finish_reason)],
            usage=Usage(done.prompt_tokens, done.completion_tokens, done.prompt_tokens + done.completion_tokens))
