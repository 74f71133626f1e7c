"""From an OpenAI chat request to a completion or a stream of chunks, over the served models.

    prepare  (on the loop)   parameters, the model named (or the routed alias), the conversation, the
                             limits and the named model's capabilities: every 4xx a request can earn
                             before any work
    resolve  (worker thread) the staged router's decision (zero-shot features of the images), then the
                             answering model's prompt ids, completion budget, sampling parameters and
                             its own visual tokens of each image (its vision stage and feature cache)
    generate (engine thread) the answering model's engine, streamed back

The controller stays a thin adapter over this. Leaving a generation early (the deadline passes, the
client disconnects, the task is cancelled) closes the engine stream, which aborts the request and
frees its KV blocks."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

import msgspec
from anyio import to_thread

from app.chat.answer import StreamedAnswer, final_message, incomplete
from app.chat.conversation import Conversation, parse_messages
from app.chat.params import completion_budget, reject_unsupported, sampling_params
from app.chat.structured import OutputPlan, output_plan
from app.chat.tools import tool_plan
from app.chat.schemas import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                              ChatCompletionWithTokens, Choice, ChoiceWithTokens, ChunkChoice, Delta, Usage)
from app.errors import APIError, ErrorBody, ErrorDetail, bad_request
from app.metrics import Metrics
from app.models.families.base import PromptError
from app.models.registry import ROUTED, ModelRegistry
from app.models.served import ServedModel
from app.request_id import current_id
from app.routing.staged import RouteDecision, StagedRouter
from app.settings import Settings
from app.tenancy.record import UsageObserver
from llm.engine import ImageInput, RequestOutput
from llm.grammar.spec import GrammarError, GrammarSpec, VocabularyError
from llm.loading.chat_format import CAPTION_QUESTION
from llm.params import SamplingParams
from llm.scheduler import PromptRejected
from vision.stage import VisualTokensError


@dataclass(frozen=True)
class PreparedChat:
    """A request past every check that needs no model work."""

    req: ChatCompletionRequest
    conversation: Conversation
    target: ServedModel | None  # None: the routed alias, the router picks
    output: OutputPlan = OutputPlan()  # the answer's format: response_format, guided_*, tools


@dataclass(frozen=True)
class Routed:
    """What answers, and with what: the engine's inputs, or the router's finished answer."""

    model: str  # the served model that answers (for a policy refusal, the one asked)
    decision: RouteDecision | None
    served: ServedModel | None = None  # None when the router answered
    prompt: tuple[int, ...] = ()
    params: SamplingParams | None = None
    images: tuple[ImageInput, ...] = ()
    output: OutputPlan | None = None
    seen_images: tuple[tuple[str, int], ...] = ()  # (image sha256, pixels) of each image, for quotas and the audit

    @property
    def route(self) -> str:
        return self.decision.route if self.decision is not None else f"decoder:{self.model}"


def capability_problem(model: ServedModel, conversation: Conversation, max_images: int,
                       output: OutputPlan = OutputPlan()) -> APIError | None:
    """Why `model` cannot take the conversation or give the answer's format (a 400 naming the limit), or None."""
    caps, n = model.capabilities, len(conversation.images)
    tool_use = (output.tools.param if output.tools is not None else None) or conversation.tool_use
    if tool_use and not caps.tools:
        legacy = " (functions is deprecated: use tools)" if tool_use == "functions" else ""
        return bad_request(f"{tool_use}: model {model.name!r} does not call tools (its family declares no tool-call "
                           f"format){legacy}", param=tool_use, code="unsupported_parameter")
    if output.grammar is not None and not caps.structured_output:
        return bad_request(f"{output.param}: model {model.name!r} cannot constrain its output (its tokenizer declares "
                           f"no token surface forms)", param=output.param, code="unsupported_parameter")
    if n > max_images:
        return bad_request(f"the conversation has {n} images; this server accepts at most {max_images} "
                        f"(setting max_images_per_request)", param="messages", code="too_many_images")
    if n > caps.max_images:
        return bad_request(f"the conversation has {n} images; model {model.name!r} takes at most "
                        f"{caps.max_images} per conversation", param="messages", code="too_many_images")
    if n == 0 and not caps.text_only:
        return bad_request(f"no image in the conversation: model {model.name!r} needs one (add an image_url "
                        f"content part with a data: URL)", param="messages", code="missing_image")
    if not caps.questions and not conversation.is_caption_request(CAPTION_QUESTION):
        return bad_request(f"model {model.name!r} only captions images: send one user message with one image and "
                        f"no text (or {CAPTION_QUESTION!r})", param="messages", code="unsupported_prompt")
    return None


def grammar_error(e: GrammarError, model: str, param: str | None) -> APIError:
    """A 400 naming the field that asked for the grammar; a vocabulary that cannot write it is the
    model's limit (unsupported_parameter), anything else a bad grammar."""
    code = "unsupported_parameter" if isinstance(e, VocabularyError) else "invalid_grammar"
    return bad_request(f"{param}: model {model!r}: {e}", param=param, code=code)


def _seen_images(seen: dict) -> tuple[tuple[str, int], ...]:
    return tuple({r.image_digest: r.pixels for r in seen.values()}.items())


def _sse(payload: msgspec.Struct | dict) -> bytes:
    return b"data: " + msgspec.json.encode(payload) + b"\n\n"




class ChatService:
    def __init__(self, registry: ModelRegistry, router: StagedRouter, settings: Settings,
                 metrics: Metrics | None = None) -> None:
        self.registry, self.router, self.settings, self.metrics = registry, router, settings, metrics
        zero_shot = router.zero_shot_model if router.zero_shot is not None else None
        self.zero_shot_model = registry.get(zero_shot) if zero_shot else None

    # -- validation (on the loop) ------------------------------------------------------------------
    def prepare(self, req: ChatCompletionRequest) -> PreparedChat:
        reject_unsupported(req)
        target = self.registry.resolve(req.model)
        tools = tool_plan(req)
        output = output_plan(req, tools)
        conversation = parse_messages(req.messages)
        if tools is not None:
            conversation = replace(conversation, tools=tuple(f.as_tool() for f in tools.functions))
        if target is ROUTED:
            if not self.candidates(conversation, output):
                problems = [str(capability_problem(m, conversation, self.settings.max_images_per_request, output))
                            for m in self.registry]
                raise bad_request(f"no served model can take this conversation: {'; '.join(problems)}",
                               param="messages", code="no_capable_model")
            return PreparedChat(req, conversation, None, output)
        problem = capability_problem(target, conversation, self.settings.max_images_per_request, output)
        if problem is not None:
            raise problem
        return PreparedChat(req, conversation, target, output)

    def metrics_label(self, name: str | None) -> str:
        """The `model` label of a request that names `name`: a served model's own name, the routed
        alias, or "" (never the client's string: an unknown name must not mint a time series)."""
        name = self.registry.default if name is None else name
        if name == self.registry.routed_alias:
            return name
        served = self.registry.get(name)
        return served.name if served is not None else ""

    def candidates(self, conversation: Conversation, output: OutputPlan = OutputPlan()) -> list[str]:
        limit = self.settings.max_images_per_request
        return [m.name for m in self.registry if capability_problem(m, conversation, limit, output) is None]

    # -- the route and the model's inputs (worker thread) ------------------------------------------
    def _resolve(self, prepared: PreparedChat, tenant: str | None) -> Routed:
        conversation, target = prepared.conversation, prepared.target
        seen: dict = {}  # (model, image, visual_tokens) -> its vision result: the router's lookups serve the decoder
        decision = self._decide(prepared, tenant, seen)
        if decision.finished:
            answering = decision.model or (target.name if target is not None else self.registry.routed_alias)
            return Routed(answering, decision, seen_images=_seen_images(seen))
        served = self.registry.get(decision.model)
        try:
            prompt = served.model.chat_prompt(conversation)
        except PromptError as e:
            raise bad_request(str(e), param="messages", code="unsupported_prompt") from None
        max_tokens = completion_budget(prepared.req, len(prompt), served.model.context_length,
                                       self.settings.default_max_tokens)
        params = sampling_params(prepared.req, max_tokens, self._grammar(served, prepared.output))
        images = tuple(self._image(served, source, prepared.req.visual_tokens, tenant, seen)
                       for source in conversation.images)
        return Routed(served.name, decision, served, tuple(prompt), params, images, prepared.output,
                      _seen_images(seen))

    def _grammar(self, served: ServedModel, output: OutputPlan) -> GrammarSpec | None:
        """The answer's grammar for this model, compiled now (here, off the loop and the engine thread,
        so that a bad one is a 400 before any work; the engine finds it in the cache)."""
        tools = output.tools
        grammar = output.grammar or (served.model.tool_format.grammar(tools) if tools is not None else None)
        if grammar is not None:
            try:
                served.engine.grammars.get(grammar, timeout=self.settings.request_timeout_s)
            except GrammarError as e:
                raise grammar_error(e, served.name, output.param) from None
        return grammar

    def _decide(self, prepared: PreparedChat, tenant: str | None, seen: dict) -> RouteDecision:
        """The staged router over the images as the zero-shot model sees them (when one is served)."""
        conversation, target = prepared.conversation, prepared.target
        zero_shot = self.zero_shot_model
        features = []
        if zero_shot is not None and conversation.images:
            features = [self._features(zero_shot, source, None, tenant, seen).features for source in conversation.images]
        candidates = self.candidates(conversation, prepared.output) if target is None else [target.name]
        # stage 1 answers with a label, which no answer format asked for
        stage1 = not prepared.output.constrained and (target is None or (zero_shot is not None and target is zero_shot))
        decision = self.router.decide(features, conversation.question, candidates, stage1=stage1)
        if self.metrics is not None:
            self.metrics.record_route(decision.model or (target.name if target else ""), decision.route)
        return decision

    def _features(self, served: ServedModel, source: str, visual_tokens, tenant: str | None, seen: dict):
        key = (served.name, source, visual_tokens)
        if key in seen:
            return seen[key]
        try:
            result = seen[key] = served.vision.features(source, visual_tokens, tenant)
        except VisualTokensError as e:
            raise bad_request(str(e), param="visual_tokens", code=e.code) from None
        if self.metrics is not None:
            self.metrics.record_feature_cache(served.name, "hot", result.source == "hot")
            if result.source != "hot":
                self.metrics.record_feature_cache(served.name, "disk", result.source == "disk")
        return result

    def _image(self, served: ServedModel, source: str, visual_tokens, tenant: str | None, seen: dict) -> ImageInput:
        result = self._features(served, source, visual_tokens, tenant, seen)
        return ImageInput(result.key, result.features.tokens, result.features.attended_tokens)

    async def resolve(self, prepared: PreparedChat, tenant: str | None) -> Routed:
        return await to_thread.run_sync(self._resolve, prepared, tenant)

    # -- generation --------------------------------------------------------------------------------
    def _observe_route(self, observer: UsageObserver | None, routed: Routed) -> None:
        if observer is None:
            return
        served = routed.served or self.registry.get(routed.model)
        decision = routed.decision
        observer.routed(routed.model, served.version if served is not None else "", routed.route,
                        decision.reason if decision is not None else "")
        for digest, pixels in routed.seen_images:
            observer.image(digest, pixels)

    async def _outputs(self, prepared: PreparedChat, routed: Routed,
                       observer: UsageObserver | None = None) -> AsyncIterator[RequestOutput]:
        if routed.served is None:  # the router answered: no decoder
            if observer is not None:
                observer.first_token()
            yield self._router_answer(prepared, routed)
            return
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        timer = self.metrics.generation_timer(routed.model) if self.metrics else None
        emitted = 0
        images = list(routed.images) or None
        try:
            async for out in routed.served.engine.generate(request_id, list(routed.prompt), images, routed.params):
                if out.completion_tokens > emitted:
                    if observer is not None and not emitted:
                        observer.first_token()
                    if timer is not None:
                        timer.tokens(out.completion_tokens - emitted)
                    emitted = out.completion_tokens
                yield out
        except PromptRejected as e:
            raise bad_request(str(e), param="messages", code="context_length_exceeded") from None
        except GrammarError as e:  # could not go on under its grammar mid-answer
            raise grammar_error(e, routed.model, routed.output.param if routed.output else None) from None
        except ValueError as e:  # the family refused the images the prompt places (e.g. a template without them)
            raise bad_request(str(e), param="messages", code="unsupported_prompt") from None

    def _router_answer(self, prepared: PreparedChat, routed: Routed) -> RequestOutput:
        answer = routed.decision.answer
        served = self.registry.get(routed.model)
        prompt_tokens = completion = 0
        if served is not None:
            try:
                prompt_tokens = len(served.model.chat_prompt(prepared.conversation))
            except PromptError:
                pass
            completion = len(served.model.tokenizer.encode(answer)) + 1  # and the end token
        return RequestOutput(routed.route, answer, answer, True, "stop", (), prompt_tokens, completion, 0)

    def _error_event(self, e: APIError, model: str, observer: UsageObserver | None = None) -> bytes:
        """An error after the stream started: the status line is long gone, so it travels as an event
        (and the metrics middleware and the audit, which saw a 200, hear of it here)."""
        if self.metrics is not None:
            self.metrics.record_failure(e.type, e.code, model)
        if observer is not None:
            observer.failed(e.code)
        return _sse(ErrorBody(ErrorDetail(e.message, e.type, e.param, e.code), current_id()))

    def _timeout(self) -> APIError:
        return APIError(504, f"the request took longer than {self.settings.request_timeout_s} s",
                        type="timeout_error", code="timeout")

    async def complete(self, req: ChatCompletionRequest, observer: UsageObserver | None = None,
                       tenant: str | None = None) -> tuple[ChatCompletion, Routed]:
        """`observer` hears the route, the images, the first token and the token counts (quotas, audit)."""
        prepared = self.prepare(req)
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                routed = await self.resolve(prepared, tenant)
                self._observe_route(observer, routed)
                final = None
                async for out in self._outputs(prepared, routed, observer):
                    final = out
        except TimeoutError:
            raise self._timeout() from None
        if observer is not None:
            observer.finished(final.prompt_tokens, final.completion_tokens, final.finish_reason)
        common = dict(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=routed.model,
                      usage=Usage(final.prompt_tokens, final.completion_tokens,
                                  final.prompt_tokens + final.completion_tokens))
        message, finish = final_message(routed.output, self._tool_format(routed), final)
        cut = incomplete(routed.output, final)
        if req.return_token_ids:
            choice = ChoiceWithTokens(0, message, finish, incomplete_details=cut, token_ids=list(final.token_ids))
            return ChatCompletionWithTokens(choices=[choice], prompt_token_ids=list(routed.prompt), **common), routed
        return ChatCompletion(choices=[Choice(0, message, finish, incomplete_details=cut)], **common), routed

    @staticmethod
    def _tool_format(routed: Routed):
        return routed.served.model.tool_format if routed.served is not None else None

    async def start_stream(self, req: ChatCompletionRequest, observer: UsageObserver | None = None,
                           tenant: str | None = None) -> tuple[AsyncIterator[bytes], Routed]:
        """Validate, get the images' features and route now (errors become a 4xx before the first
        byte); -> (the server-sent events in OpenAI's chunk format ending with `data: [DONE]`, the route)."""
        prepared = self.prepare(req)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                routed = await self.resolve(prepared, tenant)
        except TimeoutError:
            raise self._timeout() from None
        self._observe_route(observer, routed)
        return self._events(prepared, routed, include_usage, deadline, observer), routed

    async def _events(self, prepared: PreparedChat, routed: Routed, include_usage: bool,
                      deadline: float, observer: UsageObserver | None) -> AsyncIterator[bytes]:
        chunk_id, created, model = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), routed.model

        def chunk(delta: Delta, finish: str | None = None, usage: Usage | None = None, choices=True,
                  cut=msgspec.UNSET) -> bytes:
            # With include_usage every chunk carries `usage` (null until the last); without, none does.
            return _sse(ChatCompletionChunk(chunk_id, created, model,
                                            [ChunkChoice(0, delta, finish, incomplete_details=cut)] if choices else [],
                                            usage if include_usage else msgspec.UNSET))

        yield chunk(Delta(role="assistant", content=""))
        final = None
        answer = StreamedAnswer(routed.output, self._tool_format(routed))
        try:
            async with asyncio.timeout_at(deadline):
                async for out in self._outputs(prepared, routed, observer):
                    final = out
                    for delta in answer.deltas(out):
                        yield chunk(delta)
                    if out.finished:
                        yield chunk(Delta(), answer.finish_reason(out), cut=incomplete(routed.output, out))
        except TimeoutError:
            yield self._error_event(self._timeout(), model, observer)
        except APIError as e:
            yield self._error_event(e, model, observer)
        finally:  # also when the client goes away mid-stream: the tokens spent so far are counted
            if observer is not None and final is not None:
                observer.finished(final.prompt_tokens, final.completion_tokens, final.finish_reason)
        if include_usage and final is not None:
            yield chunk(Delta(), usage=Usage(final.prompt_tokens, final.completion_tokens,
                                             final.prompt_tokens + final.completion_tokens), choices=False)
        yield b"data: [DONE]\n\n"
