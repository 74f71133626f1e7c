"""Tenants, scopes, persisted quotas and the audit log (issue 14, items 1-3).

    principal.py  who a request runs for (Principal), `require_scope`, the scope guard
    keys.py       the SQLite key store (hashed keys) and the env/file keys
    quotas.py     per-key usage per UTC day and minute in SQLite, shared by a host's workers
    audit.py      the append-only, hash-chained JSONL audit log and its verifier
    record.py     what a request leaves for its audit record (RequestRecord)
    finalize.py   the one function where every request ends: quota charged, audit written
    middleware.py the key check on every path (unknown and tricked ones too)
    controller.py /v1/usage and the admin API for keys
"""
