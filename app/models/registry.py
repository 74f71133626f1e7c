"""The served models by name: each model's name and aliases, the default model (a request that names
none), and the routed alias (a request the staged router assigns, `router_alias`, "auto" by default).

    target = registry.resolve(req.model)   # a ServedModel, or ROUTED; APIError 404 for an unknown name

Names and aliases are checked at start: one name for one model, never the routed alias.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from app.errors import APIError
from app.models.schemas import ModelCard, model_card
from app.models.served import ServedModel


class Routed:
    """The request named the routed alias: the staged router picks the model."""

    def __repr__(self) -> str:
        return "ROUTED"


ROUTED = Routed()


class ModelRegistry:
    def __init__(self, models: list[ServedModel], routed_alias: str = "auto", default: str = "") -> None:
        if not models:
            raise ValueError("no models to serve")
        self.models = list(models)
        self.routed_alias = routed_alias
        self._by_name: dict[str, ServedModel] = {}
        for model in self.models:
            for name in (model.name, *model.aliases):
                if name in self._by_name:
                    raise ValueError(f"model name {name!r} is used twice ({self._by_name[name].name} and {model.name})")
                if name == routed_alias:
                    raise ValueError(f"model name {name!r} is the routed alias (setting router_alias)")
                self._by_name[name] = model
        if default and default != routed_alias and default not in self._by_name:
            raise ValueError(f"setting default_model={default!r} names no served model; served: "
                             f"{', '.join(self.names())}")
        self.default = default or self.models[0].name
        self.created = int(time.time())

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self.models)

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def public_names(self) -> list[str]:
        return [*self._by_name, *([self.routed_alias] if self.routed_alias else [])]

    def get(self, name: str) -> ServedModel | None:
        return self._by_name.get(name)

    def resolve(self, name: str | None) -> ServedModel | Routed:
        """The model a request names (None: the default model)."""
        name = self.default if name is None else name
        if name == self.routed_alias:
            return ROUTED
        model = self._by_name.get(name)
        if model is None:
            raise APIError(404, f"The model {name!r} does not exist; served: {', '.join(self.public_names())}",
                           param="model", code="model_not_found")
        return model

    # -- /v1/models --------------------------------------------------------------------------------
    def cards(self) -> list[ModelCard]:
        """Each model, then the routed alias when it has models to choose between (with one it still
        resolves, to that one, but is not worth listing)."""
        cards = [m.card() for m in self.models]
        if self.routed_alias and len(self.models) > 1:
            cards.append(self._routed_card())
        return cards

    def card(self, name: str) -> ModelCard | None:
        if name == self.routed_alias:
            return self._routed_card()
        model = self._by_name.get(name)
        return model.card() if model is not None else None

    def _routed_card(self) -> ModelCard:
        return model_card(self.routed_alias, self.created, family="router", routed_to=self.names())
