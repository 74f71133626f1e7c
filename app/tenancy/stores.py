"""The tenancy stores a server opens at start, from the settings: keys, quotas, the audit log.

A data directory that cannot be written (read-only, a file in the way) must not take chat down, as
with batches: a store that cannot be opened is logged and left out — except the key store when its
database exists but cannot be read, which would open a closed server: then every key check fails
(503) until it can be read.
"""

from __future__ import annotations

import logging
import sqlite3
from dataclasses import dataclass

from app.settings import Settings
from app.tenancy.audit import NO_AUDIT, AuditWriter, open_audit_log
from app.tenancy.keys import Keys, KeyStore
from app.tenancy.quotas import QuotaStore

log = logging.getLogger("mmserve")


@dataclass(frozen=True)
class TenancyStores:
    keys: Keys
    quotas: QuotaStore | None
    audit: AuditWriter


def open_stores(settings: Settings) -> TenancyStores:
    store, unreadable = None, False
    try:
        store = KeyStore(settings.keys_db_path)
    except (OSError, sqlite3.Error) as e:
        unreadable = settings.keys_db_path.exists()
        log.error("key store at %s is unavailable: %s%s", settings.keys_db_path, e,
                  "; every request is refused until it can be read" if unreadable else "")
    keys = Keys.from_settings(settings, store, unavailable=unreadable)
    quotas = None
    try:
        quotas = QuotaStore(settings.usage_db_path)
    except (OSError, sqlite3.Error) as e:
        log.error("usage store at %s is unavailable: %s; quotas are not counted", settings.usage_db_path, e)
    audit = NO_AUDIT
    try:
        audit = open_audit_log(settings)
    except OSError as e:
        log.error("audit log at %s is unavailable: %s; no audit records are written", settings.audit_log_path, e)
    return TenancyStores(keys, quotas, audit)
