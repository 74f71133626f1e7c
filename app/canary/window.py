"""Each version's recent outcomes over a sliding window, and the verdict: does the canary do worse than
the stable version by more than the configured margins? Plain bookkeeping, no clock of its own.

    canary error rate  > stable error rate + canary_max_error_rate_delta           -> roll back
    canary p95 latency > stable p95 x canary_max_p95_ratio + canary_p95_slack_s      -> roll back

Only once the canary has `canary_min_samples` outcomes in the window; the latency test also needs as
many from the stable version (with fewer, its error rate counts as 0 and latency is not compared).
Latency is of the requests that succeeded: a failure's latency says nothing about speed.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class WindowStats:
    samples: int
    errors: int
    p95_s: float | None  # of the successes; None without any

    @property
    def error_rate(self) -> float:
        return self.errors / self.samples if self.samples else 0.0

    def summary(self) -> dict:
        return {"samples": self.samples, "errors": self.errors, "error_rate": round(self.error_rate, 4),
                "p95_s": None if self.p95_s is None else round(self.p95_s, 4)}


class OutcomeWindow:
    def __init__(self, window_s: float, max_samples: int) -> None:
        self.window_s = window_s
        self._outcomes: deque[tuple[float, bool, float]] = deque(maxlen=max_samples)  # (when, ok, latency)

    def add(self, now: float, ok: bool, latency_s: float) -> None:
        self._outcomes.append((now, ok, latency_s))

    def clear(self) -> None:
        self._outcomes.clear()

    def stats(self, now: float) -> WindowStats:
        while self._outcomes and self._outcomes[0][0] < now - self.window_s:
            self._outcomes.popleft()
        latencies = sorted(latency for _, ok, latency in self._outcomes if ok)
        errors = sum(1 for _, ok, _ in self._outcomes if not ok)
        return WindowStats(len(self._outcomes), errors, p95(latencies))


def p95(ordered: list[float]) -> float | None:
    """The nearest-rank 95th percentile of sorted values."""
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)] if ordered else None


@dataclass(frozen=True, slots=True)
class Margins:
    min_samples: int
    max_error_rate_delta: float
    max_p95_ratio: float
    p95_slack_s: float


def verdict(canary: WindowStats, stable: WindowStats, margins: Margins) -> str | None:
    """Why the canary must go, in words, or None."""
    if canary.samples < margins.min_samples:
        return None
    baseline = stable.error_rate if stable.samples >= margins.min_samples else 0.0
    if canary.error_rate > baseline + margins.max_error_rate_delta:
        return (f"error rate {canary.error_rate:.1%} over {canary.samples} requests, stable {baseline:.1%} "
                f"(+{margins.max_error_rate_delta:.1%} allowed)")
    if stable.samples >= margins.min_samples and canary.p95_s is not None and stable.p95_s is not None:
        bound = stable.p95_s * margins.max_p95_ratio + margins.p95_slack_s
        if canary.p95_s > bound:
            return (f"p95 latency {canary.p95_s:.3f} s over {canary.samples} requests, stable {stable.p95_s:.3f} s "
                    f"(at most {bound:.3f} s allowed)")
    return None
