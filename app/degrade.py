"""Degradation under overload, before refusal: the admission middleware counts the model requests
waiting ahead of one that arrives, and the request is admitted at a level:

    0  as asked
    1  >= degrade_visual_tokens_waiting ahead: its images get `degrade_visual_tokens` (fewer visual
       tokens: a shorter cross-attention and a smaller image K/V) on models whose tokens can be reduced
    2  >= degrade_small_model_waiting ahead: also answered by `router_small_model` (when one is set,
       served and able to take the conversation)
       past max_queued_requests waiting: 429, as before (app/admission.py)

A setting of 0 turns its step off. Each step a request took is named in its `x-mmserve-degraded`
response header ("visual_tokens=0.25", "model=small") and counted in mmserve_degraded_requests_total.
The router's policy labels still run on a degraded request (on the zero-shot model's full features).
"""

from __future__ import annotations

from litestar.types import Scope

from app.settings import Settings

DEGRADED_HEADER = "x-mmserve-degraded"
DEGRADE_STATE = "mmserve_degrade"  # where the admission middleware leaves the level (scope state)
VISUAL_TOKENS, SMALL_MODEL = 1, 2


def degrade_level(settings: Settings, waiting_ahead: int) -> int:
    small, visual = settings.degrade_small_model_waiting, settings.degrade_visual_tokens_waiting
    if small and waiting_ahead >= small:
        return SMALL_MODEL
    if visual and waiting_ahead >= visual:
        return VISUAL_TOKENS
    return 0


def set_request_degrade(scope: Scope, level: int) -> None:
    scope.setdefault("state", {})[DEGRADE_STATE] = level


def request_degrade(scope: Scope) -> int:
    return scope.get("state", {}).get(DEGRADE_STATE, 0)
