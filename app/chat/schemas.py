"""Typed bodies of OpenAI's chat completions API (msgspec structs).

Requests: every parameter OpenAI documents is a field, so that one this server does not honour gets a
400 naming it (app/chat/params.py), and a field OpenAI does not document is refused by msgspec
(`forbid_unknown_fields`) rather than ignored. Responses carry every field OpenAI's schema marks
required, null where it allows null (`message.refusal`, `choices[].logprobs`), and leave out an optional
field with no value where the schema allows no null (`msgspec.UNSET`). tests/openai_contract.py holds the
contract these follow, field by field and parameter by parameter.
"""

from __future__ import annotations

from typing import Any, Literal, Union

import msgspec


class ImageURL(msgspec.Struct, forbid_unknown_fields=True):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class TextPart(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: str


class ImagePart(msgspec.Struct, tag="image_url", tag_field="type", forbid_unknown_fields=True):
    image_url: ImageURL


# Content parts OpenAI documents and the models here cannot read: typed, so that each is a 400 naming
# it (app/chat/conversation.py) rather than a decoding error about an unknown tag.
class AudioPart(msgspec.Struct, tag="input_audio", tag_field="type", forbid_unknown_fields=True):
    input_audio: dict[str, Any]


class FilePart(msgspec.Struct, tag="file", tag_field="type", forbid_unknown_fields=True):
    file: dict[str, Any]


class RefusalPart(msgspec.Struct, tag="refusal", tag_field="type", forbid_unknown_fields=True):
    refusal: str


ContentPart = Union[TextPart, ImagePart, AudioPart, FilePart, RefusalPart]


class ChatMessage(msgspec.Struct, forbid_unknown_fields=True):
    role: str  # system, developer, user, assistant (others get a 400 naming them: app/chat/conversation.py)
    content: str | list[ContentPart] | None = None
    name: str | None = None  # a participant's name: accepted, and not shown to the models served here
    refusal: str | None = None  # an earlier assistant reply's refusal: null (as this API returns it) only
    # An assistant message's calls ({"id", "type": "function", "function": {"name", "arguments"}}) and a
    # "tool" message's answer to one (app/chat/conversation.py checks them); function_call is deprecated.
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None


class ChatCompletionRequest(msgspec.Struct, forbid_unknown_fields=True):
    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None  # {"include_usage": true} adds a final usage chunk
    user: str | None = None  # the end user, for abuse monitoring: logged with the request id
    safety_identifier: str | None = None  # the same, OpenAI's newer name
    # Extensions (as vLLM accepts them): sampling controls OpenAI's schema lacks.
    top_k: int | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None  # the end token is held back until this many tokens were generated
    ignore_eos: bool | None = None  # generate max_tokens whatever the model says (benchmarks)
    # Per-request visual-token budget: a count (e.g. 16) or a ratio of the model's tokens (e.g. 0.25).
    visual_tokens: int | float | None = None
    # The prompt's and the completion's token ids in the response (vLLM's extension of the same name).
    return_token_ids: bool | None = None
    # The answer must be one of these strings / match this regex / follow this Lark grammar (vLLM's names;
    # app/chat/structured.py). One output format at a time, response_format and tools included.
    guided_choice: list[str] | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    # OpenAI parameters honoured only at their neutral value; anything else is a 400 naming them.
    n: int | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    modalities: list[str] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    parallel_tool_calls: bool | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: dict[str, Any] | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None


class FunctionCall(msgspec.Struct):
    name: str
    arguments: str  # JSON text


class MessageToolCall(msgspec.Struct):
    id: str
    function: FunctionCall
    type: str = "function"


class AssistantMessage(msgspec.Struct):
    content: str | None
    refusal: str | None = None  # required by the schema (nullable): the models here never refuse in words
    role: str = "assistant"
    tool_calls: list[MessageToolCall] | msgspec.UnsetType = msgspec.UNSET
    function_call: FunctionCall | msgspec.UnsetType = msgspec.UNSET  # answering the deprecated `functions`


class IncompleteDetails(msgspec.Struct):
    """mmserve's extension (the Responses API's name): a constrained answer (response_format, tools,
    guided_*) cut by max_tokens before its grammar was complete does not parse, and says so here."""

    reason: str  # "max_tokens"
    message: str


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: None = None  # required by the schema (nullable): logprobs are not offered
    incomplete_details: IncompleteDetails | msgspec.UnsetType = msgspec.UNSET


class ChoiceWithTokens(Choice, kw_only=True):
    token_ids: list[int]  # return_token_ids: the completion's ids (an end token excluded)


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    object: str = "chat.completion"


class ChatCompletionWithTokens(ChatCompletion, kw_only=True):
    prompt_token_ids: list[int]  # return_token_ids: the ids the model read, as its chat template built them


class FunctionDelta(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: FunctionDelta | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None
    function_call: FunctionDelta | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None
    logprobs: None = None
    incomplete_details: IncompleteDetails | msgspec.UnsetType = msgspec.UNSET


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    # Present only when the request set stream_options.include_usage: null, then the totals in the last chunk.
    usage: Usage | None | msgspec.UnsetType = msgspec.UNSET
    object: str = "chat.completion.chunk"
