"""The served models by name: each model's name and aliases, the default model (a request that names
none), and the routed alias (a request the staged router assigns, `router_alias`, "auto" by default).

    target = registry.resolve(req.model)   # a ServedModel, or ROUTED; APIError 404 for an unknown name

Names and aliases are checked at start: one name for one model, never the routed alias.

Versions: two entries may share a name with different versions. The first is the stable version,
the one every name, alias, route and card means; the second is its canary, which only the canary
split (app/canary/) or a request naming `NAME@VERSION` reaches. Every model answers to
`NAME@VERSION`. The two versions of a name keep apart where they hold state of their own: engine
metrics and the feature cache's disk tier go by `label` (`NAME@VERSION` for both, NAME otherwise).
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
        self.routed_alias = routed_alias
        self.models: list[ServedModel] = []  # one per name: the stable version
        self.canaries: dict[str, ServedModel] = {}  # name -> its second version
        for model in models:
            stable = next((m for m in self.models if m.name == model.name), None)
            if stable is None:
                self.models.append(model)
                continue
            if model.name in self.canaries:
                raise ValueError(f"model {model.name!r} has more than two versions; serve a stable and a canary")
            if model.version == stable.version:
                raise ValueError(f"model name {model.name!r} is used twice with the same version {model.version!r}; "
                                 f"give each version its own label (--model NAME@VERSION=DIR, or version = ...)")
            if model.aliases:
                raise ValueError(f"model {model.name}@{model.version}: a canary version answers to its stable "
                                 f"version's aliases; give aliases on the first entry only")
            self.canaries[model.name] = model
            stable.label, model.label = f"{stable.name}@{stable.version}", f"{model.name}@{model.version}"
        self._by_version = {f"{m.name}@{m.version}": m for m in self.versions()}
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

    def versions(self) -> list[ServedModel]:
        """Every served model, canary versions too (what the lifespan starts and stops)."""
        return [*self.models, *self.canaries.values()]

    def pinned(self, name: str | None) -> ServedModel | None:
        """The one version a `NAME@VERSION` request names (no split), else None."""
        return self._by_version.get(name) if name else None

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def public_names(self) -> list[str]:
        return [*self._by_name, *([self.routed_alias] if self.routed_alias else [])]

    def get(self, name: str) -> ServedModel | None:
        """A name or alias: its stable version; `NAME@VERSION`: that version."""
        return self._by_name.get(name) or self._by_version.get(name)

    def resolve(self, name: str | None) -> ServedModel | Routed:
        """The model a request names (None: the default model)."""
        name = self.default if name is None else name
        if name == self.routed_alias:
            return ROUTED
        model = self.get(name)
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
        model = self.get(name)
        return model.card() if model is not None else None

    def _routed_card(self) -> ModelCard:
        return model_card(self.routed_alias, self.created, family="router", routed_to=self.names())
