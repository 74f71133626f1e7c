"""GET /v1/models, GET /v1/models/{id}: the served models, their aliases and the routed alias."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.params import FromPath

from app.errors import APIError
from app.models.registry import ModelRegistry
from app.models.schemas import ModelCard, ModelList


class ModelsController(Controller):
    path = "/v1/models"
    tags = ["models"]

    @get(summary="The models this server serves (and its routed alias)")
    async def list_models(self, registry: NamedDependency[ModelRegistry]) -> ModelList:
        return ModelList(registry.cards())

    @get("/{model_id:path}", summary="One model, by its name, an alias or the routed alias")
    async def retrieve(self, model_id: FromPath[str], registry: NamedDependency[ModelRegistry]) -> ModelCard:
        card = registry.card(model_id.lstrip("/"))
        if card is None:
            raise APIError(404, f"The model {model_id.lstrip('/')!r} does not exist; served: "
                           f"{', '.join(registry.public_names())}", type="invalid_request_error", param="model",
                           code="model_not_found")
        return card
