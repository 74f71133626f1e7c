"""OpenAI's Model object (id, object, created, owned_by), with what mmserve adds about each model."""

from __future__ import annotations

import msgspec


class ModelCard(msgspec.Struct, omit_defaults=True, kw_only=True):
    id: str
    created: int
    # OpenAI requires both: without defaults, so omit_defaults never drops them
    owned_by: str
    object: str
    # mmserve's additions (ignored by OpenAI clients), left out when empty
    family: str = ""
    version: str = ""
    aliases: list[str] = []
    capabilities: list[str] = []
    context_length: int = 0
    routed_to: list[str] = []  # a routed alias: the models its rules choose among


def model_card(id: str, created: int, **extra) -> ModelCard:
    return ModelCard(id=id, created=created, owned_by="mmserve", object="model", **extra)


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"
