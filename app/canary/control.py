"""The live canary state of each model served in two versions: the weight, the mode, the rollback.

    pick = control.pick("demo", sticky)     # (worker thread) who answers, and where a shadow copy goes
    control.observe(served, role, ok, s)   # (event loop) an outcome; may roll the canary back
    control.update("demo", weight=0.2, mode="split", by=actor)   control.rollback("demo", reason, by=actor)

A rollback sets the weight to 0 at once (the next request resolved goes to stable) and says who and
why; setting a weight again re-arms the canary with an empty window. Every change is logged, counted
(mmserve_canary_weight, mmserve_rollbacks_total) and handed to `on_event` (the audit log).
One lock: `pick` and `observe` run on worker threads and on the event loop, admin calls on the loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from app.canary.policy import CanaryPolicy
from app.canary.split import point
from app.canary.window import Margins, OutcomeWindow, verdict
from app.errors import APIError
from app.metrics import Metrics
from app.models.registry import ModelRegistry
from app.models.served import ServedModel
from app.settings import Settings
from llm.scheduler import PromptRejected
from vision.intake import ImageError

log = logging.getLogger("mmserve")
CanaryEvent = dict  # {"event": "canary_update" | "canary_rollback", "model", "version", "by", ...}: the audit log


def counts_as_error(error: BaseException | None) -> bool | None:
    """Whether a request's end counts against its version: None for what says nothing about it (the
    client's own mistakes, 4xx, and hang-ups), True for server errors (5xx, timeouts, exceptions)."""
    if error is None:
        return False
    if isinstance(error, (asyncio.CancelledError, GeneratorExit, ImageError, PromptRejected)):
        return None
    if isinstance(error, APIError):
        return True if error.status >= 500 else None
    return True


@dataclass(frozen=True, slots=True)
class Pick:
    served: ServedModel  # the version that answers
    role: str  # "stable" or "canary"
    shadow: ServedModel | None = None  # where a copy goes (shadow mode), discarded


@dataclass(frozen=True, slots=True)
class Rollback:
    at: float  # wall-clock time
    by: str  # "auto" or the admin's key id
    reason: str


class _Canary:
    def __init__(self, stable: ServedModel, canary: ServedModel, policy: CanaryPolicy, settings: Settings) -> None:
        self.stable, self.canary = stable, canary
        self.weight, self.mode = policy.weight, policy.mode
        self.rollback: Rollback | None = None
        self.windows = {role: OutcomeWindow(settings.canary_window_s, settings.canary_window_max_samples)
                        for role in ("stable", "canary")}


class CanaryControl:
    def __init__(self, registry: ModelRegistry, policies: list[CanaryPolicy], settings: Settings,
                 metrics: Metrics | None = None, clock: Callable[[], float] = time.monotonic,
                 on_event: Callable[[CanaryEvent], None] | None = None) -> None:
        self.settings, self.metrics, self.clock, self.on_event = settings, metrics, clock, on_event
        self.margins = Margins(settings.canary_min_samples, settings.canary_max_error_rate_delta,
                               settings.canary_max_p95_ratio, settings.canary_p95_slack_s)
        by_name = {p.name: p for p in policies}
        self._lock = threading.Lock()
        self._canaries: dict[str, _Canary] = {}
        for name, canary in registry.canaries.items():
            policy = by_name.pop(name, CanaryPolicy(name))
            if policy.version and policy.version != canary.version:
                raise ValueError(f"canary {name}: version {policy.version!r} is not served; the canary version of "
                                 f"{name} is {canary.version!r}")
            self._canaries[name] = _Canary(registry.get(name), canary, policy, settings)
            self._set_weight_metric(name)
        if by_name:
            raise ValueError(f"canary settings for {', '.join(sorted(by_name))}: no model of that name is served in "
                             f"two versions (--model NAME@VERSION=DIR twice, or two [[model]] tables)")

    def names(self) -> list[str]:
        return list(self._canaries)

    # -- per request -------------------------------------------------------------------------------
    def pick(self, name: str, sticky: str) -> Pick | None:
        """None: `name` has no canary (serve it as usual)."""
        state = self._canaries.get(name)
        if state is None:
            return None
        with self._lock:
            weight, mode = state.weight, state.mode
        hit = weight > 0 and point(name, sticky) < weight
        if mode == "split":
            return Pick(state.canary, "canary") if hit else Pick(state.stable, "stable")
        return Pick(state.stable, "stable", state.canary if hit else None)

    def observe(self, served: ServedModel, role: str, ok: bool, latency_s: float) -> None:
        """One finished request of a model with a canary (`role`: stable, canary or shadow)."""
        state = self._canaries.get(served.name)
        if state is None:
            return
        if self.metrics is not None:
            self.metrics.canary_requests.labels(served.name, served.version, role, "ok" if ok else "error").inc()
        now = self.clock()
        with self._lock:
            if state.rollback is not None and role != "stable":
                return  # stragglers of a rolled-back canary: the verdict is in
            state.windows["stable" if role == "stable" else "canary"].add(now, ok, latency_s)
            if role == "stable" or not self.settings.canary_auto_rollback:
                return
            why = verdict(state.windows["canary"].stats(now), state.windows["stable"].stats(now), self.margins)
        if why is not None:
            self.rollback(served.name, why, by="auto")

    # -- admin ---------------------------------------------------------------------------------------
    def _state(self, name: str) -> _Canary:
        state = self._canaries.get(name)
        if state is None:
            served = ", ".join(self._canaries) or "none"
            raise APIError(404, f"model {name!r} has no canary version; models with one: {served}",
                           param="name", code="canary_not_found")
        return state

    def update(self, name: str, weight: float | None = None, mode: str | None = None, by: str = "") -> dict:
        state = self._state(name)
        with self._lock:
            before = (state.weight, state.mode)
            if weight is not None:
                state.weight = weight
            if mode is not None:
                state.mode = mode
            if state.rollback is not None and state.weight > 0:  # re-armed: a fresh window
                state.rollback = None
                state.windows["canary"].clear()
        log.warning("canary %s: weight %g -> %g, mode %s -> %s (by %s)", name, before[0], state.weight,
                    before[1], state.mode, by)
        self._set_weight_metric(name)
        self._emit({"event": "canary_update", "model": name, "version": state.canary.version, "by": by,
                    "weight": state.weight, "mode": state.mode, "previous": {"weight": before[0], "mode": before[1]}})
        return self.status(name)

    def rollback(self, name: str, reason: str, by: str) -> dict:
        """Weight 0 at once; what is in flight finishes on the version it started on."""
        state = self._state(name)
        with self._lock:
            if by == "auto" and state.rollback is not None:
                return self.status(name)  # two verdicts raced: one rollback
            previous = state.weight
            state.weight = 0.0
            state.rollback = Rollback(time.time(), by, reason)
        log.warning("canary %s@%s rolled back (by %s): %s", name, state.canary.version, by, reason)
        if self.metrics is not None:
            self.metrics.rollbacks.labels(name, "auto" if by == "auto" else "admin").inc()
        self._set_weight_metric(name)
        self._emit({"event": "canary_rollback", "model": name, "version": state.canary.version, "by": by,
                    "reason": reason, "previous": {"weight": previous}})
        return self.status(name)

    def status(self, name: str) -> dict:
        state = self._state(name)
        now = self.clock()
        with self._lock:
            rollback = state.rollback
            return {"model": name, "stable": state.stable.version, "canary": state.canary.version,
                    "weight": state.weight, "mode": state.mode,
                    "state": "rolled_back" if rollback else "active" if state.weight > 0 else "off",
                    "rollback": None if rollback is None else {"at": rollback.at, "by": rollback.by,
                                                               "reason": rollback.reason},
                    "window": {role: w.stats(now).summary() for role, w in state.windows.items()}}

    def _set_weight_metric(self, name: str) -> None:
        if self.metrics is not None:
            self.metrics.canary_weight.labels(name).set(self._canaries[name].weight)

    def _emit(self, event: CanaryEvent) -> None:
        if self.on_event is not None:
            self.on_event(event)
