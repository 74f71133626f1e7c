"""A batch line's tenancy: it runs as the key that made the batch — that key's quota is checked and
charged, and the line gets its own audit record (kind "batch_line"), closed by the same
`Finalizer.finish` that ends every HTTP request.

The worker records the line's answer first and finishes its record after, so a process killed in
between leaves the line answered once and at most that one record and charge missing (the reverse
order would charge and audit a rerun line twice).
"""

from __future__ import annotations

import sqlite3

from app.auth import Refusal
from app.tenancy.finalize import Finalizer
from app.tenancy.keys import Keys
from app.tenancy.principal import ANONYMOUS, Principal
from app.tenancy.quotas import QuotaStore
from app.tenancy.record import RequestRecord

LINE_ROUTE = "/v1/chat/completions"  # the one endpoint batches run


class LineAccounting:
    def __init__(self, keys: Keys | None = None, quotas: QuotaStore | None = None,
                 finalizer: Finalizer | None = None) -> None:
        self.keys, self.quotas, self.finalizer = keys, quotas, finalizer

    def principal(self, key_id: str) -> Principal | None:
        """The batch's key; None when it was revoked since (its remaining lines are refused)."""
        if not key_id or self.keys is None:
            return ANONYMOUS
        return self.keys.by_id(key_id)

    def start(self, key_id: str, batch_id: str, custom_id: str, request_id: str) -> tuple[RequestRecord, Refusal | None]:
        record = RequestRecord("batch_line", request_id, "POST", LINE_ROUTE, route=LINE_ROUTE, batch_id=batch_id,
                               custom_id=custom_id)
        principal = self.principal(key_id)
        if principal is None:
            record.principal = Principal(key_id, "")
            return record, Refusal(401, "the API key that made this batch was revoked", "invalid_request_error",
                                   "invalid_api_key", "unauthenticated", 0)
        record.principal = principal
        if self.quotas is not None:
            try:
                return record, self.quotas.admit(principal)
            except sqlite3.Error as e:
                return record, Refusal(503, f"the usage store is unavailable: {e}", "server_error",
                                       "usage_store_unavailable", "usage_store_unavailable", 5)
        return record, None

    def finish(self, record: RequestRecord, status: int) -> None:
        record.status = status
        if self.finalizer is not None:
            self.finalizer.finish(record)
