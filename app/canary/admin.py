"""Who may call the admin API: the one function every admin route asks.

Until keys carry scopes (app/tenancy, the `admin` scope), an admin is whoever the key check lets in
(app/auth.py: any configured key; with no key configured the server is open, admin routes too).
Returns the actor's id for logs and the audit: the key's salted digest, never the key.
"""

from __future__ import annotations

from litestar import Request

from app.auth import api_key_of, tenant_of


def require_admin(request: Request) -> str:
    key = api_key_of(request)
    return f"key:{tenant_of(key)[:16]}" if key else "anonymous"
