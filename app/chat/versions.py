"""The chat side of canary versions (app/canary/): which version of the routed model answers a
request, and the request's outcome for that version's window."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING

from app.canary.control import CanaryControl, Pick, counts_as_error
from app.canary.split import sticky_key
from app.chat.capability import capability_problem
from app.models.served import ServedModel
from app.settings import Settings

if TYPE_CHECKING:
    from app.chat.service import PreparedChat


class Versions:
    def __init__(self, canary: CanaryControl | None, settings: Settings) -> None:
        self.canary, self.settings = canary, settings

    def pick(self, prepared: "PreparedChat", served: ServedModel, tenant: str | None) -> Pick | None:
        """The version of `served`'s name that answers, None when it has no canary. A canary that cannot
        take the conversation (another family, other limits) leaves it to the stable version."""
        if self.canary is None or served.name not in self.canary.names():
            return None
        key = sticky_key(prepared.conversation, prepared.req.user, tenant, self.settings.canary_stickiness)
        pick = self.canary.pick(served.name, key)

        def able(model: ServedModel) -> bool:
            return capability_problem(model, prepared.conversation, self.settings.max_images_per_request,
                                      prepared.output) is None

        if pick.role == "canary" and not able(pick.served):
            return Pick(served, "stable")
        if pick.shadow is not None and not able(pick.shadow):
            return replace(pick, shadow=None)
        return pick

    def observe(self, served: ServedModel | None, role: str | None, started: float,
                error: BaseException | None = None) -> None:
        """A finished request of a model with a canary, for its version's window (client errors and
        hang-ups say nothing about the version)."""
        if self.canary is None or served is None or not role:
            return
        failed = counts_as_error(error)
        if failed is not None:
            self.canary.observe(served, role, not failed, time.perf_counter() - started)
