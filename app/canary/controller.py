"""The canary admin API (no restart; takes effect for the next request resolved):

    GET  /v1/admin/canaries                       every model served in two versions, its state
    GET  /v1/admin/models/{name}/canary           one model's state and both versions' windows
    PUT  /v1/admin/models/{name}/canary           {"weight": 0.2, "mode": "split" | "shadow"}
    POST /v1/admin/models/{name}/rollback         {"reason": "..."} (optional): weight 0 at once
"""

from __future__ import annotations

import msgspec
from litestar import Controller, Request, get, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody

from app.canary.admin import require_admin
from app.canary.control import CanaryControl
from app.canary.policy import MODES
from app.errors import bad_request


class WindowSummary(msgspec.Struct):
    samples: int
    errors: int
    error_rate: float
    p95_s: float | None


class RollbackInfo(msgspec.Struct):
    at: float  # unix time
    by: str  # "auto" or the admin's key id
    reason: str


class CanaryStatus(msgspec.Struct):
    model: str
    stable: str  # the stable version's label
    canary: str  # the canary version's label
    weight: float
    mode: str  # split | shadow
    state: str  # active | off | rolled_back
    rollback: RollbackInfo | None
    window: dict[str, WindowSummary]  # "stable", "canary": outcomes in the sliding window


class CanaryList(msgspec.Struct):
    data: list[CanaryStatus]
    object: str = "list"


class CanaryUpdate(msgspec.Struct, forbid_unknown_fields=True):
    weight: float | None = None
    mode: str | None = None


class RollbackRequest(msgspec.Struct, forbid_unknown_fields=True):
    reason: str = ""


def _status(raw: dict) -> CanaryStatus:
    return msgspec.convert(raw, CanaryStatus)


class CanaryController(Controller):
    path = "/v1/admin"
    tags = ["admin"]

    @get("/canaries", summary="Every model served in two versions, with its canary state")
    async def list_canaries(self, canary: NamedDependency[CanaryControl], request: Request) -> CanaryList:
        require_admin(request)
        return CanaryList([_status(canary.status(name)) for name in canary.names()])

    @get("/models/{name:str}/canary", summary="A model's canary: weight, mode, state, both versions' windows")
    async def get_canary(self, name: FromPath[str], canary: NamedDependency[CanaryControl],
                         request: Request) -> CanaryStatus:
        require_admin(request)
        return _status(canary.status(name))

    @put("/models/{name:str}/canary", summary="Set the canary's weight and/or mode, at once")
    async def set_canary(self, name: FromPath[str], data: JSONBody[CanaryUpdate],
                         canary: NamedDependency[CanaryControl], request: Request) -> CanaryStatus:
        actor = require_admin(request)
        if data.weight is None and data.mode is None:
            raise bad_request("nothing to change: send weight (0..1) and/or mode (split or shadow)", param="weight")
        if data.weight is not None and not 0 <= data.weight <= 1:
            raise bad_request(f"weight must be in [0, 1], got {data.weight}", param="weight", code="invalid_weight")
        if data.mode is not None and data.mode not in MODES:
            raise bad_request(f"mode must be split or shadow, got {data.mode!r}", param="mode", code="invalid_mode")
        return _status(canary.update(name, data.weight, data.mode, by=actor))

    @post("/models/{name:str}/rollback", status_code=200, summary="Roll the canary back: weight 0 at once")
    async def rollback(self, name: FromPath[str], canary: NamedDependency[CanaryControl], request: Request,
                       data: JSONBody[RollbackRequest | None] = None) -> CanaryStatus:
        actor = require_admin(request)
        reason = (data.reason if data is not None else "") or "rolled back by an admin"
        return _status(canary.rollback(name, reason, by=actor))
