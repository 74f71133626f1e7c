"""Single-flight: concurrent calls for the same key share one run of the work.

When a popular image arrives in a burst, every request misses the cache at once; without this, each
would run the encoder for the same features. Here the first caller (the leader) runs `fn`; the others
block until it finishes and get its result, or its exception. Nothing is remembered after the flight
lands: caching the result is the caller's business (the feature cache stores it inside `fn`, before
the flight ends, so a caller that arrives after the flight finds it in the cache).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Flight(Generic[T]):
    leader_thread: int
    done: threading.Event = field(default_factory=threading.Event)
    result: T | None = None
    error: BaseException | None = None


class SingleFlight(Generic[T]):
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight[T]] = {}

    def run(self, key: str, fn: Callable[[], T]) -> tuple[T, bool]:
        """`fn()`'s result and whether this call ran it (False: it waited on another caller's run).
        If `fn` raises, the leader and every waiter raise that same exception."""
        me = threading.get_ident()
        with self._lock:
            flight = self._flights.get(key)
            leading = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight(leader_thread=me)
            elif flight.leader_thread == me:
                raise RuntimeError(f"single-flight: {key} asked for again while this thread computes it")
        if not leading:
            return self._wait(flight), False
        try:
            flight.result = fn()
        except BaseException as error:
            flight.error = error
            raise
        finally:
            with self._lock:
                del self._flights[key]
            flight.done.set()
        return flight.result, True

    @staticmethod
    def _wait(flight: _Flight[T]) -> T:
        flight.done.wait()
        if isinstance(flight.error, Exception):
            raise flight.error
        if flight.error is not None:  # KeyboardInterrupt, SystemExit: the leader's alone to raise
            raise RuntimeError("single-flight: the computing thread was interrupted") from flight.error
        return flight.result  # type: ignore[return-value]

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)
