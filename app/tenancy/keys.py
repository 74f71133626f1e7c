"""API keys: the SQLite key store and the env/file keys, behind one `Keys.identify`.

Store keys are `mms-<32 random bytes, urlsafe base64>`, shown once when made. At rest only their
SHA-256 is kept: a key has 256 bits of entropy, so its digest cannot be brute-forced and needs no
pepper (a pepper protects low-entropy secrets such as passwords). A request's key is hashed and looked
up by that digest, so no comparison ever runs over a secret. A key's id (`key_<hex>`) is what logs,
usage and the audit name.

Revocation holds at once in every worker process: `identify` reads through to SQLite on each request
(one indexed SELECT on a WAL database: tens of microseconds), with no cache that could go stale.

Env/file keys (settings `api_keys`, `api_key_file`) still work as before: compared in constant time,
each its own tenant (`env_<digest prefix>`) holding every scope, with the settings' default limits.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path

import msgspec

from app.auth import load_api_keys
from app.settings import Settings
from app.tenancy.principal import SCOPES, Limits, Principal

KEY_PREFIX = "mms-"
SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY, digest TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL, scopes TEXT NOT NULL,
    models TEXT,            -- JSON list of model names, NULL = every model
    limits TEXT NOT NULL,   -- JSON object of Limits fields
    name TEXT NOT NULL DEFAULT '', created_at INTEGER NOT NULL, revoked_at INTEGER);
"""


def digest_of(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def default_limits(settings: Settings) -> Limits:
    return Limits(settings.quota_requests_per_minute, settings.quota_tokens_per_minute,
                  settings.quota_images_per_minute, settings.quota_pixels_per_minute,
                  settings.quota_requests_per_day, settings.quota_tokens_per_day,
                  settings.quota_images_per_day, settings.quota_pixels_per_day)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """A store key as `mmserve keys list` and GET /v1/admin/keys show it (never the key)."""

    id: str
    tenant: str
    scopes: list[str]
    models: list[str] | None
    limits: dict[str, int]
    name: str
    created_at: int
    revoked_at: int | None


def parse_scopes(scopes: list[str] | tuple[str, ...] | str) -> frozenset[str]:
    items = [s.strip() for s in (scopes.split(",") if isinstance(scopes, str) else scopes) if s.strip()]
    unknown = sorted(set(items) - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; scopes are {', '.join(SCOPES)}")
    if not items:
        raise ValueError(f"a key needs at least one scope of {', '.join(SCOPES)}")
    return frozenset(items)


def parse_limits(values: dict[str, int] | None, defaults: Limits) -> Limits:
    values = values or {}
    names = [f.name for f in fields(Limits)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        raise ValueError(f"unknown limit {unknown[0]!r}; limits are {', '.join(names)}")
    bad = [k for k, v in values.items() if not isinstance(v, int) or isinstance(v, bool)]
    if bad:
        raise ValueError(f"limit {bad[0]} must be an integer")
    merged = {n: values.get(n, getattr(defaults, n)) for n in names}
    return Limits(**merged)


class KeyStore:
    """The SQLite key store. One connection guarded by a lock: `identify` runs on the event loop."""

    def __init__(self, path: Path, busy_timeout_s: float = 10.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s)
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.executescript(SCHEMA)
        self._lock = threading.Lock()

    def close(self) -> None:
        self.conn.close()

    def add(self, tenant: str, scopes: frozenset[str], models: list[str] | None = None,
            limits: Limits = Limits(), name: str = "") -> tuple[str, KeyInfo]:
        """A new key: (the key, shown only now; its info)."""
        if not tenant or len(tenant) > 128:
            raise ValueError("a key's tenant must be 1 to 128 characters")
        key = KEY_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        key_id = f"key_{secrets.token_hex(8)}"
        limit_values = {f.name: getattr(limits, f.name) for f in fields(Limits)}
        with self._lock:
            self.conn.execute("INSERT INTO keys (id, digest, tenant, scopes, models, limits, name, created_at) "
                              "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                              (key_id, digest_of(key), tenant, ",".join(sorted(scopes)),
                               msgspec.json.encode(sorted(models)).decode() if models is not None else None,
                               msgspec.json.encode(limit_values).decode(), name, int(time.time())))
        info = self.get(key_id)
        assert info is not None
        return key, info

    def revoke(self, key_id: str) -> KeyInfo | None:
        """Revoked from the next request on, in every process; None when there is no such key."""
        with self._lock:
            self.conn.execute("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                              (int(time.time()), key_id))
        return self.get(key_id)

    def get(self, key_id: str) -> KeyInfo | None:
        with self._lock:
            row = self.conn.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
        return _info(row) if row else None

    def list(self, tenant: str | None = None) -> list[KeyInfo]:
        with self._lock:
            rows = self.conn.execute("SELECT * FROM keys WHERE ? IS NULL OR tenant = ? ORDER BY created_at, id",
                                     (tenant, tenant)).fetchall()
        return [_info(r) for r in rows]

    def has_keys(self) -> bool:
        """Any key ever made, revoked ones too: revoking the last key must not open the server."""
        with self._lock:
            return self.conn.execute("SELECT 1 FROM keys LIMIT 1").fetchone() is not None

    def principal(self, key: str) -> Principal | None:
        """The principal of a presented key; None when unknown or revoked."""
        with self._lock:
            row = self.conn.execute("SELECT * FROM keys WHERE digest = ? AND revoked_at IS NULL",
                                    (digest_of(key),)).fetchone()
        return _principal(_info(row)) if row else None

    def principal_by_id(self, key_id: str) -> Principal | None:
        """A live key's principal by id (a batch line runs as the key that made the batch)."""
        info = self.get(key_id)
        return _principal(info) if info is not None and info.revoked_at is None else None


def _info(row: tuple) -> KeyInfo:
    key_id, _digest, tenant, scopes, models, limits, name, created_at, revoked_at = row
    return KeyInfo(key_id, tenant, scopes.split(","), msgspec.json.decode(models) if models else None,
                   msgspec.json.decode(limits), name, created_at, revoked_at)


def _principal(info: KeyInfo) -> Principal:
    return Principal(info.id, info.tenant, frozenset(info.scopes),
                     frozenset(info.models) if info.models is not None else None, Limits(**info.limits))


class Keys:
    """Every key source together: the env/file keys and the store."""

    def __init__(self, env_keys: frozenset[str], store: KeyStore | None, limits: Limits,
                 unavailable: bool = False) -> None:
        """`unavailable`: the key store exists but cannot be read; every key check fails (503)."""
        self.unavailable = unavailable
        self._env = [(k.encode(), Principal(f"env_{digest_of(k)[:16]}", f"env_{digest_of(k)[:16]}",
                                            limits=limits)) for k in sorted(env_keys)]
        self._env_by_id = {p.key_id: p for _, p in self._env}
        self.store = store
        self._open_check = (0.0, False)  # (when, answer): has_active_keys, re-read at most once a second

    @classmethod
    def from_settings(cls, settings: Settings, store: KeyStore | None, unavailable: bool = False) -> "Keys":
        return cls(load_api_keys(settings), store, default_limits(settings), unavailable)

    @property
    def enabled(self) -> bool:
        """Keys are required once any exists: env/file keys, or any key the store ever held (revoked
        ones too, so revoking the last key never opens the server). A server still open when another
        process adds the first key closes within a second; once closed it stays closed."""
        if self._env or self.unavailable:
            return True
        if self.store is None:
            return False
        when, closed = self._open_check
        now = time.monotonic()
        if not closed and now - when > 1.0:
            self._open_check = (now, self.store.has_keys())
        return self._open_check[1]

    def identify(self, authorization: str | None) -> Principal | None:
        scheme, _, presented = (authorization or "").strip().partition(" ")
        presented = presented.strip()
        if scheme.lower() != "bearer" or not presented:
            return None
        if presented.startswith(KEY_PREFIX) and self.store is not None:
            return self.store.principal(presented)
        candidate, match = presented.encode(), None
        for raw, principal in self._env:  # no early exit: the time taken says nothing about which key was close
            if hmac.compare_digest(candidate, raw):
                match = principal
        return match

    def by_id(self, key_id: str) -> Principal | None:
        if key_id in self._env_by_id:
            return self._env_by_id[key_id]
        return self.store.principal_by_id(key_id) if self.store is not None else None
