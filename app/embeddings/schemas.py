"""Typed bodies of /v1/embeddings (OpenAI's shape) and /v1/classify (mmserve's zero-shot labels)."""

from __future__ import annotations

from typing import Literal

import msgspec

from app.chat.schemas import ImagePart, TextPart


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
