"""Typed request and response bodies of the OpenAI-compatible API (msgspec structs)."""

from __future__ import annotations

from typing import Literal, Union

import msgspec


class ImageURL(msgspec.Struct):
    url: str
    detail: str | None = None


class TextPart(msgspec.Struct, tag="text", tag_field="type"):
    text: str


class ImagePart(msgspec.Struct, tag="image_url", tag_field="type"):
    image_url: ImageURL


ContentPart = Union[TextPart, ImagePart]


class ChatMessage(msgspec.Struct):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(msgspec.Struct):
    messages: list[ChatMessage]
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: dict | None = None  # {"include_usage": true} adds a final usage chunk
    # Extensions (as vLLM accepts them): sampling controls OpenAI's schema lacks.
    top_k: int | None = None
    repetition_penalty: float | None = None
    # Per-request visual-token budget: a count (e.g. 16) or a ratio of the model's tokens (e.g. 0.25).
    visual_tokens: int | float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    # Accepted in the schema so that a request using them gets a clear 400, not silence.
    n: int | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None
    logprobs: bool | None = None
    user: str | None = None


class AssistantMessage(msgspec.Struct):
    content: str
    role: str = "assistant"


class Choice(msgspec.Struct):
    index: int
    message: AssistantMessage
    finish_reason: str


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


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    finish_reason: str | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class EmbeddingRequest(msgspec.Struct):
    # A string, or a list of: strings (a `data:` URL string is an image), text parts, image_url parts.
    input: str | list[str | TextPart | ImagePart]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes
    dimensions: int | None = None
    user: str | None = None


class Embedding(msgspec.Struct):
    index: int
    embedding: list[float] | str
    object: str = "embedding"


class EmbeddingUsage(msgspec.Struct):
    prompt_tokens: int  # text tokens the text tower saw, start and end tokens included; images count 0
    total_tokens: int


class EmbeddingList(msgspec.Struct):
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage
    object: str = "list"


class ClassifyRequest(msgspec.Struct):
    image: str  # a data: URL
    labels: list[str] | None = None  # default: the model's label set
    model: str | None = None


class LabelScore(msgspec.Struct):
    label: str
    score: float


class Classification(msgspec.Struct):
    model: str
    labels: list[LabelScore]  # best first; scores are a softmax over the labels
    object: str = "classification"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "mmserve"
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail
