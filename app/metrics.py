"""Prometheus metrics of one app, on its own `CollectorRegistry` (never the process-global one, so a
process can build many apps, as the tests do). `create_app` makes one `Metrics` and passes it down.

HTTP side, kept by `MetricsMiddleware` (outermost, so it also sees the 401/429s of the guards):
  mmserve_request_duration_seconds{route,method,status}  histogram; route is the path template
  mmserve_requests_total{route,status}
  mmserve_request_failures_total{type,code}               error responses, by their OpenAI error type/code
  mmserve_requests_in_flight
  mmserve_admission_active / mmserve_admission_queue_depth   model requests processing / waiting
  mmserve_rejected_requests_total{reason}                 overloaded, rate_limited, quota_exceeded, unauthenticated

Engine and chat side, for the engine and the chat path to update (functions below):
  mmserve_time_to_first_token_seconds, mmserve_inter_token_latency_seconds   `generation_timer()`
  mmserve_generated_tokens_total          `observe_engine_step` (AsyncEngine's on_step); tokens/s = rate()
  mmserve_running_requests, mmserve_waiting_requests, mmserve_kv_cache_usage_ratio   `bind_engine(stats)`
  mmserve_feature_cache_{hits,misses}_total{tier}   `record_feature_cache(tier, hit)`
  mmserve_router_decisions_total{route}            `record_route(route)`
  mmserve_oom_events_total                         `record_oom()`
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

    def __init__(self, metrics: "Metrics", clock: Callable[[], float] = time.perf_counter) -> None:
        self._metrics, self._clock = metrics, clock
        self._start = clock()
        self._last: float | None = None

    def tokens(self, n: int = 1) -> None:
        if n <= 0:
            return
        now = self._clock()
        if self._last is None:
            self._metrics.time_to_first_token.observe(now - self._start)
        else:
            gap = (now - self._last) / n
            for _ in range(n):
                self._metrics.inter_token_latency.observe(gap)
        self._last = now


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.request_latency = Histogram("mmserve_request_duration_seconds", "HTTP request latency",
                                         ["route", "method", "status"], buckets=LATENCY_BUCKETS, registry=r)
        self.requests = Counter("mmserve_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.failures = Counter("mmserve_request_failures", "Error responses by OpenAI error type and code",
                                ["type", "code"], registry=r)
        self.in_flight = Gauge("mmserve_requests_in_flight", "HTTP requests being served", registry=r)
        self.admission_active = Gauge("mmserve_admission_active", "Model requests holding a slot", registry=r)
        self.queue_depth = Gauge("mmserve_admission_queue_depth", "Model requests waiting for a slot", registry=r)
        self.rejections = Counter("mmserve_rejected_requests", "Requests refused by a guard", ["reason"], registry=r)
        self.time_to_first_token = Histogram("mmserve_time_to_first_token_seconds", "Time to the first token",
                                             buckets=TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("mmserve_inter_token_latency_seconds", "Time between tokens",
                                             buckets=INTER_TOKEN_BUCKETS, registry=r)
        self.generated_tokens = Counter("mmserve_generated_tokens", "Tokens generated", registry=r)
        self.running_requests = Gauge("mmserve_running_requests", "Sequences the engine decodes", registry=r)
        self.waiting_requests = Gauge("mmserve_waiting_requests", "Sequences waiting in the engine", registry=r)
        self.kv_cache_usage = Gauge("mmserve_kv_cache_usage_ratio", "Share of KV-pool blocks in use", registry=r)
        self.feature_cache_hits = Counter("mmserve_feature_cache_hits", "Feature-cache hits", ["tier"], registry=r)
        self.feature_cache_misses = Counter("mmserve_feature_cache_misses", "Feature-cache misses", ["tier"],
                                            registry=r)
        self.router_decisions = Counter("mmserve_router_decisions", "Requests by the route that answered",
                                        ["route"], registry=r)
        self.oom_events = Counter("mmserve_oom_events", "Out-of-memory events", registry=r)
        self.in_flight_now = 0  # the same count as a plain int: the SIGTERM drain waits for 0

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- for the engine and the chat path ----------------------------------------------------------
    def bind_engine(self, stats: Callable[[], Mapping[str, float]]) -> None:
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

        self.running_requests.set_function(reader("running"))
        self.waiting_requests.set_function(reader("waiting"))
        self.kv_cache_usage.set_function(reader("kv_usage"))

    def observe_engine_step(self, _engine: object, outputs: Sequence[object]) -> None:
        """AsyncEngine's `on_step` hook: each output of a step carries one newly sampled token."""
        if outputs:
            self.generated_tokens.inc(len(outputs))

    def generation_timer(self) -> GenerationTimer:
        return GenerationTimer(self)

    def record_feature_cache(self, tier: str, hit: bool) -> None:
        (self.feature_cache_hits if hit else self.feature_cache_misses).labels(tier).inc()

    def record_route(self, route: str) -> None:
        self.router_decisions.labels(route).inc()

    def record_oom(self) -> None:
        self.oom_events.inc()

    def record_failure(self, type: str, code: str | None = None) -> None:
        """For errors the status line cannot carry (an error event inside a started stream)."""
        self.failures.labels(type, code or "").inc()

    def watch_admission(self, active: Callable[[], int], waiting: Callable[[], int]) -> None:
        self.admission_active.set_function(active)
        self.queue_depth.set_function(waiting)


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
                self._record_error(message.get("body", b""))
            await send(message)

        start = time.perf_counter()
        m.in_flight.inc()
        m.in_flight_now += 1
        try:
            await self.app(scope, receive, observing_send)
        except asyncio.CancelledError:
            if not error_seen and status == 500:
                status = CLIENT_CLOSED
            raise
        finally:
            m.in_flight_now -= 1
            m.in_flight.dec()
            route = scope.get("path_template") or scope["path"]
            m.request_latency.labels(route, scope["method"], str(status)).observe(time.perf_counter() - start)
            m.requests.labels(route, str(status)).inc()
            if status == 500 and not error_seen:
                m.record_failure("server_error")

    def _record_error(self, body: bytes) -> None:
        try:
            detail = msgspec.json.decode(body, type=_ErrorBody).error
        except msgspec.DecodeError:  # not one of ours: still a failure
            detail = _ErrorDetail()
        self.metrics.record_failure(detail.type, detail.code)
