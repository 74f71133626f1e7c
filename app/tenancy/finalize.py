"""Where every request ends: `Finalizer.finish(record)` charges the key's quota and writes the audit
record, together, so no path (a chat answer, a stream, an error, a 401, a client gone mid-stream, a
batch line) can do one and forget the other. The middleware calls it before the response's last byte
leaves (a client that holds an answer holds its audit record and its charge); the batch worker calls it
for each line it answers.

A failing store is logged and never turns an answered request into an error: the answer was given.
"""

from __future__ import annotations

import logging
import sqlite3

from app.tenancy.audit import AuditWriter
from app.tenancy.quotas import QuotaStore
from app.tenancy.record import RequestRecord

log = logging.getLogger("mmserve")


class Finalizer:
    def __init__(self, quotas: QuotaStore | None, audit: AuditWriter) -> None:
        self.quotas, self.audit = quotas, audit

    def finish(self, record: RequestRecord) -> None:
        if record.finalized:
            return
        record.finalized = True
        if self.quotas is not None:
            try:
                self.quotas.charge(record.principal, record.tokens, len(record.images), record.pixels)
            except sqlite3.Error:
                log.exception("quota charge failed for key %s", record.principal.key_id or "-")
        try:
            self.audit.write(record.audit())
        except (OSError, ValueError):
            log.exception("audit write failed")
