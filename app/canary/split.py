"""Which version a request gets, sticky: the same conversation (or end user, or key) always lands on the
same side of the split, and raising the weight only moves requests from stable to canary, never back.

The sticky key is, in order: the request's `user` field (the client's name for its end user); with
`canary_stickiness = "key"`, the API key alone; otherwise the API key with the conversation's first user
message (its text and image sources), which a conversation's later turns repeat. A hash of it puts the
request at a point in [0, 1); the canary takes the points below its weight.
"""

from __future__ import annotations

import hashlib

from app.chat.conversation import Conversation, ImageRef


def sticky_key(conversation: Conversation, user: str | None, tenant: str | None, stickiness: str) -> str:
    """`tenant`: the key's salt (app/auth.py `tenant_of`), None when keys are off."""
    if user:
        return f"user\0{user}"
    if stickiness == "key" and tenant:
        return f"key\0{tenant}"
    first = next((m for m in conversation.messages if m.role == "user"), None)
    parts = [] if first is None else [p if isinstance(p, str) else conversation.images[p.index]
                                      for p in first.parts if isinstance(p, (str, ImageRef))]
    return "\0".join(["conversation", tenant or "", *parts])


def point(name: str, key: str) -> float:
    """Where `key` falls in [0, 1) for model `name` (each name splits its traffic independently)."""
    digest = hashlib.sha256(f"{name}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
