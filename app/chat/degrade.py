"""A chat request admitted at an overload level (app/degrade.py), degraded step by step: the small
model (`model`, in `prepare`, before the route), fewer visual tokens (`visual_tokens`, per answering
model, when its images are encoded). A step that cannot apply to the request is not taken, and only
the steps taken are reported."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from app.chat.capability import capability_problem
from app.degrade import SMALL_MODEL, VISUAL_TOKENS
from app.metrics import Metrics
from app.models.registry import ModelRegistry
from app.models.served import ServedModel
from app.settings import Settings
from vision.stage import parse_visual_tokens

if TYPE_CHECKING:
    from app.chat.service import PreparedChat


class Degrade:
    def __init__(self, settings: Settings, registry: ModelRegistry, metrics: Metrics | None = None) -> None:
        self.settings, self.metrics = settings, metrics
        self.tokens = parse_visual_tokens(settings.degrade_visual_tokens)
        self.small = registry.get(settings.router_small_model) if settings.router_small_model else None

    def model(self, prepared: "PreparedChat") -> "PreparedChat":
        """Level 2: the small model answers, when it can take the conversation."""
        small = self.small
        if prepared.degrade < SMALL_MODEL or small is None or prepared.target is small:
            return prepared
        if capability_problem(small, prepared.conversation, self.settings.max_images_per_request,
                              prepared.output) is not None:
            return prepared
        self._count("small_model", small.name)
        return replace(prepared, target=small, pinned=False, degraded=(f"model={small.name}",))

    def visual_tokens(self, prepared: "PreparedChat", served: ServedModel) -> tuple[object, tuple[str, ...]]:
        """Level 1: (the visual_tokens `served` encodes the images with, the step taken or ())."""
        encoder = served.model.encoder
        if (prepared.degrade < VISUAL_TOKENS or not prepared.conversation.images or encoder is None
                or not encoder.reducible_tokens):
            return prepared.req.visual_tokens, ()
        self._count("visual_tokens", served.name)
        return self.tokens, (f"visual_tokens={self.settings.degrade_visual_tokens}",)

    def _count(self, step: str, model: str) -> None:
        if self.metrics is not None:
            self.metrics.degraded.labels(step, model).inc()
