"""GET /v1/usage (a key's own usage; any key's with the admin scope) and the admin API for keys:
GET/POST /v1/admin/keys, POST /v1/admin/keys/{key_id}/revoke — what `mmserve keys` does, live."""

from __future__ import annotations

import msgspec
from litestar import Controller, Request, get, post
from litestar.di import NamedDependency
from litestar.params import FromPath, JSONBody, Parameter

from app.errors import APIError, bad_request
from app.tenancy.keys import Keys, KeyInfo, parse_limits, parse_scopes
from app.tenancy.principal import Limits, principal_of, require_scope
from app.tenancy.quotas import QuotaStore, Usage, limits_dict


class UsageWindow(msgspec.Struct):
    requests: int
    tokens: int
    images: int
    pixels: int


class UsageReport(msgspec.Struct):
    object: str
    key_id: str
    tenant: str
    limits: dict[str, int]  # 0 = unlimited
    minute: UsageWindow  # this minute (UTC)
    day: UsageWindow  # this UTC day


class CreateKeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    tenant: str
    scopes: list[str]
    models: list[str] | None = None  # the model names this key may use; null = every model
    limits: dict[str, int] | None = None  # Limits fields; those left out take the server's defaults
    name: str = ""


class KeyObject(msgspec.Struct):
    object: str
    id: str
    tenant: str
    scopes: list[str]
    models: list[str] | None
    limits: dict[str, int]
    name: str
    created_at: int
    revoked_at: int | None
    key: str | None = None  # only in the answer that created it


class KeyList(msgspec.Struct):
    object: str
    data: list[KeyObject]


def _window(usage: Usage) -> UsageWindow:
    return UsageWindow(usage.requests, usage.tokens, usage.images, usage.pixels)


def _key_object(info: KeyInfo, key: str | None = None) -> KeyObject:
    return KeyObject("api_key", info.id, info.tenant, info.scopes, info.models, info.limits, info.name,
                     info.created_at, info.revoked_at, key)


def _store(keys: Keys):
    if keys.store is None:
        raise APIError(503, "the key store is unavailable", type="server_error", code="key_store_unavailable")
    return keys.store


class UsageController(Controller):
    path = "/v1/usage"
    tags = ["usage"]

    @get(summary="Usage of this API key this minute and this UTC day, and its limits (key_id: another key's, "
                 "admin scope)")
    async def usage(self, request: Request, keys: NamedDependency[Keys], quotas: NamedDependency[QuotaStore | None],
                    key_id: str | None = Parameter(default=None, description="another key's id (admin scope)"),
                    ) -> UsageReport:
        principal = principal_of(request)
        if key_id is not None and key_id != principal.key_id:
            require_scope(request, "admin")
            principal = keys.by_id(key_id)
            if principal is None:
                raise APIError(404, f"no live API key with id {key_id!r}", param="key_id", code="key_not_found")
        used = quotas.usage(principal.key_id) if quotas is not None and principal.key_id else {}
        return UsageReport("usage", principal.key_id, principal.tenant, limits_dict(principal.limits),
                           _window(used.get("minute", Usage())), _window(used.get("day", Usage())))


class AdminKeysController(Controller):
    path = "/v1/admin/keys"
    tags = ["admin"]
    opt = {"scope": "admin"}

    @get(summary="Every key in the store (never the keys themselves), optionally of one tenant")
    async def list_keys(self, keys: NamedDependency[Keys],
                        tenant: str | None = Parameter(default=None, description="only this tenant's keys"),
                        ) -> KeyList:
        return KeyList("list", [_key_object(info) for info in _store(keys).list(tenant)])

    @post(status_code=200, summary="Make a key; the answer is the only time the key is shown")
    async def create(self, data: JSONBody[CreateKeyRequest], keys: NamedDependency[Keys],
                     settings_limits: NamedDependency[Limits]) -> KeyObject:
        try:
            scopes = parse_scopes(data.scopes)
            limits = parse_limits(data.limits, settings_limits)
            key, info = _store(keys).add(data.tenant, scopes, data.models, limits, data.name)
        except ValueError as e:
            raise bad_request(str(e)) from None
        return _key_object(info, key)

    @post("/{key_id:str}/revoke", status_code=200, summary="Revoke a key: refused from its next request on, "
                                                            "in every worker")
    async def revoke(self, key_id: FromPath[str], keys: NamedDependency[Keys]) -> KeyObject:
        info = _store(keys).revoke(key_id)
        if info is None:
            raise APIError(404, f"no API key with id {key_id!r}", param="key_id", code="key_not_found")
        return _key_object(info)
