"""Prometheus metrics of one app, on its own `CollectorRegistry` (never the process-global one, so a
process can build many apps, as the tests do). `create_app` makes one `Metrics` and passes it down.

Every metric carries a `model` label: the served model a request was answered by (the handler names it
in the scope, `set_request_model`), "" for requests no model answered (a 401, a 404 path, /health).

HTTP side, kept by `MetricsMiddleware` (outermost, so it also sees the 401/429s of the guards):
  mmserve_request_duration_seconds{route,method,status,model}  histogram; route is the path template
  mmserve_requests_total{route,status,model}
  mmserve_request_failures_total{type,code,model}         error responses, by their OpenAI error type/code
  mmserve_requests_in_flight{model}                        (model "": not known until the body is read)
  mmserve_admission_active / mmserve_admission_queue_depth{model}   model requests processing / waiting
  mmserve_rejected_requests_total{reason,model}           overloaded, rate_limited, quota_exceeded, unauthenticated

Engine and chat side, per served model (functions below):
  mmserve_time_to_first_token_seconds, mmserve_inter_token_latency_seconds   `generation_timer(model)`
  mmserve_generated_tokens_total          `observe_engine_step(model, ...)`; tokens/s = rate()
  mmserve_running_requests, mmserve_waiting_requests, mmserve_kv_cache_usage_ratio   `bind_engine(model, stats)`
  mmserve_feature_cache_{hits,misses}_total{tier}   `record_feature_cache(model, tier, hit)`
  mmserve_router_decisions_total{route}            `record_route(model, route)`: model = who answered
  mmserve_oom_events_total                         `record_oom(model)`

A model served in two versions (app/canary/) keeps the public name in `model` wherever a request is
counted, and adds the version where it matters; the engine-bound metrics above, one series per engine,
name the version in `model` itself (`NAME@VERSION`, ServedModel.label):
  mmserve_canary_requests_total{model,version,role,outcome}   role stable|canary|shadow, outcome ok|error
  mmserve_canary_weight{model}                                the canary's share now (0 after a rollback)
  mmserve_rollbacks_total{model,trigger}                      trigger auto|admin
  mmserve_degraded_requests_total{step,model}                 step visual_tokens|small_model (app/degrade.py)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence

import msgspec
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
INTER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)
CLIENT_CLOSED = 499  # nginx's status for a request the client abandoned before any answer
CONTENT_TYPE = CONTENT_TYPE_LATEST


class _ErrorDetail(msgspec.Struct):
    type: str = "unknown"
    code: str | None = None


class _ErrorBody(msgspec.Struct):
    error: _ErrorDetail


class GenerationTimer:
    """Time to first token and inter-token latency of one generation: call `tokens(n)` whenever `n` new
    tokens arrive. When one delivery carries several tokens, each gets an equal share of the gap."""

    def __init__(self, metrics: "Metrics", model: str, clock: Callable[[], float] = time.perf_counter) -> None:
        self._ttft = metrics.time_to_first_token.labels(model)
        self._itl = metrics.inter_token_latency.labels(model)
        self._clock = clock
        self._start = clock()
        self._last: float | None = None

    def tokens(self, n: int = 1) -> None:
        if n <= 0:
            return
        now = self._clock()
        if self._last is None:
            self._ttft.observe(now - self._start)
        else:
            gap = (now - self._last) / n
            for _ in range(n):
                self._itl.observe(gap)
        self._last = now


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self.request_latency = Histogram("mmserve_request_duration_seconds", "HTTP request latency",
                                         ["route", "method", "status", *m], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("mmserve_requests", "HTTP requests answered", ["route", "status", *m], registry=r)
        self.failures = Counter("mmserve_request_failures", "Error responses by OpenAI error type and code",
                                ["type", "code", *m], registry=r)
        self.in_flight = Gauge("mmserve_requests_in_flight", "HTTP requests being served", m, registry=r)
        self.admission_active = Gauge("mmserve_admission_active", "Model requests holding a slot", m, registry=r)
        self.queue_depth = Gauge("mmserve_admission_queue_depth", "Model requests waiting for a slot", m,
                                 registry=r)
        self.rejections = Counter("mmserve_rejected_requests", "Requests refused by a guard", ["reason", *m],
                                  registry=r)
        self.time_to_first_token = Histogram("mmserve_time_to_first_token_seconds", "Time to the first token", m,
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("mmserve_inter_token_latency_seconds", "Time between tokens", m,
                                             buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.generated_tokens = Counter("mmserve_generated_tokens", "Tokens generated", m, registry=r)
        self.running_requests = Gauge("mmserve_running_requests", "Sequences the engine decodes", m, registry=r)
        self.waiting_requests = Gauge("mmserve_waiting_requests", "Sequences waiting in the engine", m, registry=r)
        self.kv_cache_usage = Gauge("mmserve_kv_cache_usage_ratio", "Share of KV-pool blocks in use", m, registry=r)
        self.feature_cache_hits = Counter("mmserve_feature_cache_hits", "Feature-cache hits", ["tier", *m],
                                          registry=r)
        self.feature_cache_misses = Counter("mmserve_feature_cache_misses", "Feature-cache misses", ["tier", *m],
                                            registry=r)
        self.router_decisions = Counter("mmserve_router_decisions", "Requests by the route that answered",
                                        ["route", *m], registry=r)
        self.oom_events = Counter("mmserve_oom_events", "Out-of-memory events", m, registry=r)
        self.canary_requests = Counter("mmserve_canary_requests", "Requests of a model with a canary, by version",
                                       [*m, "version", "role", "outcome"], registry=r)
        self.canary_weight = Gauge("mmserve_canary_weight", "The canary version's share of requests", m, registry=r)
        self.rollbacks = Counter("mmserve_rollbacks", "Canary rollbacks", [*m, "trigger"], registry=r)
        self.degraded = Counter("mmserve_degraded_requests", "Requests served degraded under overload",
                                ["step", *m], registry=r)
        self.in_flight_now = 0  # the same count as a plain int: the SIGTERM drain waits for 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- for the engine and the chat path ----------------------------------------------------------
    def bind_engine(self, model: str, stats: Callable[[], Mapping[str, float]]) -> None:
        """Read running/waiting/KV usage from `stats()` (Engine.stats) at scrape time: always current,
        even after an abort while the engine is idle and no step runs."""
        last: dict[str, float] = {}

        def reader(key: str) -> Callable[[], float]:
            def read() -> float:
                try:
                    last[key] = float(stats()[key])
                except Exception:  # noqa: BLE001 - a torn read mid-step keeps the last value; a scrape never fails
                    pass
                return last.get(key, 0.0)
            return read

        self.running_requests.labels(model).set_function(reader("running"))
        self.waiting_requests.labels(model).set_function(reader("waiting"))
        self.kv_cache_usage.labels(model).set_function(reader("kv_usage"))

    def observe_engine_step(self, model: str, outputs: Sequence[object]) -> None:
        """An engine's `on_step` hook: each output of a step carries one newly sampled token."""
        if outputs:
            self.generated_tokens.labels(model).inc(len(outputs))

    def generation_timer(self, model: str) -> GenerationTimer:
        return GenerationTimer(self, model)

    def record_feature_cache(self, model: str, tier: str, hit: bool) -> None:
        (self.feature_cache_hits if hit else self.feature_cache_misses).labels(tier, model).inc()

    def record_route(self, model: str, route: str) -> None:
        self.router_decisions.labels(route, model).inc()

    def record_oom(self, model: str) -> None:
        self.oom_events.labels(model).inc()

    def record_failure(self, type: str, code: str | None = None, model: str = "") -> None:
        """For errors the status line cannot carry (an error event inside a started stream)."""
        self.failures.labels(type, code or "", model).inc()

    def watch_admission(self, active: Callable[[], int], waiting: Callable[[], int]) -> None:
        """Admission is shared by every model: its slots are counted under model ""."""
        self.admission_active.labels("").set_function(active)
        self.queue_depth.labels("").set_function(waiting)


class MetricsMiddleware:
    """Latency, status and in-flight count of every routed HTTP request; the failure type is read from
    the OpenAI-shaped error body, whoever wrote it (a handler, an exception handler, a guard)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        status = 500  # what litestar's outermost handler answers for an exception that escapes us
        error_seen = False

        async def observing_send(message: Message) -> None:
            nonlocal status, error_seen
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and status >= 400 and not error_seen:
                error_seen = True
                self._record_error(message.get("body", b""), request_model(scope))
            await send(message)

        start = time.perf_counter()
        in_flight = m.in_flight.labels("")  # the model is not known until the handler reads the body
        in_flight.inc()
        m.in_flight_now += 1
        try:
            await self.app(scope, receive, observing_send)
        except asyncio.CancelledError:
            if not error_seen and status == 500:
                status = CLIENT_CLOSED
            raise
        finally:
            m.in_flight_now -= 1
            in_flight.dec()
            route = scope.get("path_template") or scope["path"]
            model = request_model(scope)
            m.request_latency.labels(route, scope["method"], str(status), model).observe(time.perf_counter() - start)
            m.requests.labels(route, str(status), model).inc()
            if status == 500 and not error_seen:
                m.record_failure("server_error", model=model)

    def _record_error(self, body: bytes, model: str) -> None:
        try:
            detail = msgspec.json.decode(body, type=_ErrorBody).error
        except msgspec.DecodeError:  # not one of ours: still a failure
            detail = _ErrorDetail()
        self.metrics.record_failure(detail.type, detail.code, model)


MODEL_STATE = "mmserve_model"  # where a handler names the served model that answers (scope state)


def set_request_model(scope: Scope, model: str) -> None:
    scope.setdefault("state", {})[MODEL_STATE] = model


def request_model(scope: Scope) -> str:
    return scope.get("state", {}).get(MODEL_STATE, "")
