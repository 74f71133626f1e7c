"""From an OpenAI chat request to a completion or a stream of chunks, over the served models.

    prepare  (on the loop)   parameters, the model named (or the routed alias), the conversation, the
                             limits and the named model's capabilities: every 4xx a request can earn
                             before any work
    resolve  (worker thread) the staged router's decision (zero-shot features of the images), then the
                             answering model's prompt ids, completion budget, sampling parameters and
                             its own visual tokens of each image (its vision stage and feature cache)
    generate (engine thread) the answering model's engine, streamed back

A model served in two versions (app/canary/): `resolve` picks the version after the route (sticky
split, or the stable version with a shadow copy to the canary); the request keeps that version to its
end, and its outcome (error or latency) goes to the canary's window. Under overload the admission
middleware hands a degradation level (app/degrade.py): fewer visual tokens, then the small model.

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

from app.canary.control import CanaryControl
from app.canary.shadow import ShadowRunner
from app.chat.versions import Versions
from app.chat.capability import capability_problem
from app.chat.answer import StreamedAnswer, final_message, incomplete
from app.chat.conversation import Conversation, parse_messages
from app.chat.params import completion_budget, reject_unsupported, sampling_params
from app.chat.structured import OutputPlan, output_plan
from app.chat.tools import tool_plan
from app.chat.schemas import (ChatCompletion, ChatCompletionChunk, ChatCompletionRequest,
                              ChatCompletionWithTokens, Choice, ChoiceWithTokens, ChunkChoice, Delta, Usage)
from app.errors import APIError, ErrorBody, ErrorDetail, bad_request
from app.chat.degrade import Degrade
from app.metrics import Metrics
from app.models.families.base import PromptedMemory, PromptError
from app.models.registry import ROUTED, ModelRegistry
from app.models.served import ServedModel
from app.request_id import current_id
from app.routing.staged import RouteDecision, StagedRouter
from app.settings import Settings
from app.tenancy.record import UsageObserver
from llm.engine import ImageInput, RequestOutput
from llm.grammar.spec import GrammarError, GrammarSpec, VocabularyError
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
    pinned: bool = False  # the request named NAME@VERSION: that version, no canary split
    degrade: int = 0  # the overload level it was admitted at (app/degrade.py)
    degraded: tuple[str, ...] = ()  # the degradation steps taken so far ("model=small")


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
    role: str = ""  # a model with a canary: "stable" or "canary" (the split's pick)
    shadow: ServedModel | None = None  # the canary version a copy goes to (shadow mode)
    degraded: tuple[str, ...] = ()  # the degradation steps taken ("visual_tokens=0.25", "model=small")
    seen_images: tuple[tuple[str, int], ...] = ()  # (image sha256, pixels) of each image, for quotas and the audit

    @property
    def route(self) -> str:
        return self.decision.route if self.decision is not None else f"decoder:{self.model}"

    @property
    def version(self) -> str:
        return self.served.version if self.served is not None else ""


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
                 metrics: Metrics | None = None, canary: CanaryControl | None = None) -> None:
        self.registry, self.router, self.settings, self.metrics = registry, router, settings, metrics
        self.versions = Versions(canary, settings)
        self.shadows = ShadowRunner(settings.canary_shadow_max_in_flight, canary)
        self.degrade = Degrade(settings, registry, metrics)
        zero_shot = router.zero_shot_model if router.zero_shot is not None else None
        self.zero_shot_model = registry.get(zero_shot) if zero_shot else None

    # -- validation (on the loop) ------------------------------------------------------------------
    def prepare(self, req: ChatCompletionRequest, degrade: int = 0) -> PreparedChat:
        reject_unsupported(req)
        target = self.registry.resolve(req.model)
        pinned = self.registry.pinned(req.model) is not None
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
            return self.degrade.model(PreparedChat(req, conversation, None, output, degrade=degrade))
        problem = capability_problem(target, conversation, self.settings.max_images_per_request, output)
        if problem is not None:
            raise problem
        return self.degrade.model(PreparedChat(req, conversation, target, output, pinned, degrade))

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
    def _resolve(self, prepared: PreparedChat, tenant: str | None, started: float) -> Routed:
        target = prepared.target
        seen: dict = {}  # (model, image, visual_tokens) -> its vision result: the router's lookups serve the decoder
        decision = self._decide(prepared, tenant, seen)
        if decision.finished:
            answering = decision.model or (target.name if target is not None else self.registry.routed_alias)
            return Routed(answering, decision, degraded=prepared.degraded, seen_images=_seen_images(seen))
        served = target if prepared.pinned else self.registry.get(decision.model)
        pick = None if prepared.pinned else self.versions.pick(prepared, served, tenant)
        if pick is None:
            return self._inputs(prepared, decision, served, tenant, seen)
        try:
            routed = self._inputs(prepared, decision, pick.served, tenant, seen)
        except Exception as e:  # the version's own vision stage or template failed
            self.versions.observe(pick.served, pick.role, started, e)
            raise
        return replace(routed, role=pick.role, shadow=pick.shadow)

    def _inputs(self, prepared: PreparedChat, decision: RouteDecision, served: ServedModel, tenant: str | None,
                seen: dict) -> Routed:
        """What `served` needs to answer: prompt ids, sampling parameters, its own visual tokens."""
        conversation = prepared.conversation
        try:
            prompt = served.model.chat_prompt(conversation)
        except PromptError as e:
            raise bad_request(str(e), param="messages", code="unsupported_prompt") from None
        max_tokens = completion_budget(prepared.req, len(prompt), served.model.context_length,
                                       self.settings.default_max_tokens)
        params = sampling_params(prepared.req, max_tokens, self._grammar(served, prepared.output))
        visual_tokens, step = self.degrade.visual_tokens(prepared, served)
        images = tuple(self._image(served, source, visual_tokens, tenant, seen) for source in conversation.images)
        if isinstance(served.model, PromptedMemory):
            try:
                images = served.model.memory(images, conversation)
            except PromptError as e:
                raise bad_request(str(e), param="messages", code="unsupported_prompt") from None
        return Routed(served.name, decision, served, tuple(prompt), params, images, prepared.output,
                      seen_images=_seen_images(seen), degraded=prepared.degraded + step)

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
            self.metrics.record_feature_cache(served.label, "hot", result.source == "hot")
            if result.source != "hot":
                self.metrics.record_feature_cache(served.label, "disk", result.source == "disk")
        return result

    def _image(self, served: ServedModel, source: str, visual_tokens, tenant: str | None, seen: dict) -> ImageInput:
        result = self._features(served, source, visual_tokens, tenant, seen)
        return ImageInput(result.key, result.features.tokens, result.features.attended_tokens)

    async def resolve(self, prepared: PreparedChat, tenant: str | None, started: float | None = None) -> Routed:
        started = time.perf_counter() if started is None else started
        routed = await to_thread.run_sync(self._resolve, prepared, tenant, started)
        if routed.shadow is not None:
            self.shadows.start(routed.shadow, self._shadow_copy(prepared, routed, tenant))
        return routed

    async def _shadow_copy(self, prepared: PreparedChat, primary: Routed, tenant: str | None) -> None:
        """The canary answers a copy of the request; the answer is counted and dropped."""
        async with asyncio.timeout(self.settings.request_timeout_s):
            routed = await to_thread.run_sync(self._inputs, prepared, primary.decision, primary.shadow, tenant, {})
            async for _ in self._outputs(prepared, routed):
                pass

    # -- generation --------------------------------------------------------------------------------
    def _observe_route(self, observer: UsageObserver | None, routed: Routed) -> None:
        if observer is None:
            return
        served = routed.served or self.registry.get(routed.model)
        decision = routed.decision
        reason = decision.reason if decision is not None else ""
        if routed.degraded:  # served degraded under overload: the audit says how
            reason = "; ".join(filter(None, (reason, f"degraded: {', '.join(routed.degraded)}")))
        observer.routed(routed.model, served.version if served is not None else "", routed.route, reason)
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
        timer = self.metrics.generation_timer(routed.served.label) if self.metrics else None
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
                       tenant: str | None = None, degrade: int = 0) -> tuple[ChatCompletion, Routed]:
        """`observer` hears the route, the images, the first token and the token counts (quotas, audit);
        `degrade`: the overload level the request was admitted at (app/degrade.py)."""
        prepared = self.prepare(req, degrade)
        started, routed = time.perf_counter(), None
        try:
            async with asyncio.timeout(self.settings.request_timeout_s):
                routed = await self.resolve(prepared, tenant, started)
                self._observe_route(observer, routed)
                final = None
                async for out in self._outputs(prepared, routed, observer):
                    final = out
        except TimeoutError:
            error = self._timeout()
            self.versions.observe(routed and routed.served, routed and routed.role, started, error)
            raise error from None
        except BaseException as e:
            self.versions.observe(routed and routed.served, routed and routed.role, started, e)
            raise
        self.versions.observe(routed.served, routed.role, started)
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
                           tenant: str | None = None, degrade: int = 0) -> tuple[AsyncIterator[bytes], Routed]:
        """Validate, get the images' features and route now (errors become a 4xx before the first
        byte); -> (the server-sent events in OpenAI's chunk format ending with `data: [DONE]`, the route)."""
        prepared = self.prepare(req, degrade)
        include_usage = bool((req.stream_options or {}).get("include_usage"))
        deadline = asyncio.get_running_loop().time() + self.settings.request_timeout_s
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline):
                routed = await self.resolve(prepared, tenant, started)
        except TimeoutError:
            raise self._timeout() from None
        self._observe_route(observer, routed)
        return self._events(prepared, routed, include_usage, deadline, observer, started), routed

    async def _events(self, prepared: PreparedChat, routed: Routed, include_usage: bool,
                      deadline: float, observer: UsageObserver | None, started: float) -> AsyncIterator[bytes]:
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
            self.versions.observe(routed.served, routed.role, started, self._timeout())
            yield self._error_event(self._timeout(), model, observer)
        except APIError as e:
            self.versions.observe(routed.served, routed.role, started, e)
            yield self._error_event(e, model, observer)
        except Exception as e:  # the engine failed: the status line is gone, the stream just ends
            self.versions.observe(routed.served, routed.role, started, e)
            raise
        else:
            self.versions.observe(routed.served, routed.role, started)
        finally:  # also when the client goes away mid-stream: the tokens spent so far are counted
            if observer is not None and final is not None:
                observer.finished(final.prompt_tokens, final.completion_tokens, final.finish_reason)
        if include_usage and final is not None:
            yield chunk(Delta(), usage=Usage(final.prompt_tokens, final.completion_tokens,
                                             final.prompt_tokens + final.completion_tokens), choices=False)
        yield b"data: [DONE]\n\n"
