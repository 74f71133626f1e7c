"""Who may call the admin API: the one function every admin route asks.

The key's `admin` scope (app/tenancy/principal.py `require_scope`: a 403 without it; on an open
server, with no key configured, everyone holds every scope). Returns the actor's id for logs and the
audit log: the key id, never the key (for the env/file keys of app/auth.py, their salted digest).
"""

from __future__ import annotations

from litestar import Request

from app.auth import api_key_of, tenant_of
from app.tenancy.principal import require_scope


def require_admin(request: Request) -> str:
    principal = require_scope(request, "admin")
    if principal.key_id:
        return principal.key_id
    key = api_key_of(request)
    return f"key:{tenant_of(key)[:16]}" if key else "anonymous"
