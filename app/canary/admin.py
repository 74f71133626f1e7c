"""Who may call the admin API: the one function every admin route asks.

The key's `admin` scope (app/tenancy/principal.py `require_scope`: a 403 without it; on an open
server, with no key configured, everyone holds every scope). Returns the actor's id for logs and the
audit log: the key id, never the key.
"""

from __future__ import annotations

from litestar import Request

from app.tenancy.principal import require_scope


def require_admin(request: Request) -> str:
    return require_scope(request, "admin").key_id or "anonymous"
