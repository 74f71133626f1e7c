"""Typed bodies of /v1/embeddings (OpenAI's shape) and /v1/classify (mmserve's zero-shot labels)."""

from __future__ import annotations

from typing import Literal

import msgspec

from app.chat.schemas import ImagePart, TextPart


class EmbeddingRequest(msgspec.Struct, forbid_unknown_fields=True):
    # A string, or a list of: strings (a `data:` URL string is an image), text parts, image_url parts.
    # OpenAI's token-id inputs (an int, a list of ints) are typed so that each is a 400 naming it.
    input: str | list[str | TextPart | ImagePart | int | list[int]]
    model: str | None = None
    encoding_format: Literal["float", "base64"] = "float"  # base64: little-endian float32 bytes
    dimensions: int | None = None  # honoured when it is the model's own width (no truncation is offered)
    user: str | None = None  # the end user, for abuse monitoring: logged with the request id


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


class ClassifyRequest(msgspec.Struct, forbid_unknown_fields=True):
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
