"""Single-flight: one load per key at a time, run in its own thread and shared by every caller asking meanwhile.

Each caller waits at most its own ``wait_s`` (then ``FlightTimeout``) while the load goes on for the others and for
what it fills; a failed load hands its exception to every waiter. A new thread starts with an empty context, so a
caller's ``pymongo.timeout`` never reaches the load.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class FlightTimeout(TimeoutError):
    """The caller's wait ran out before the shared load finished (the load goes on)."""

    def __init__(self, key: object, wait_s: float | None) -> None:
        super().__init__(f"the shared load of {key!r} did not finish within {wait_s:.3g} s (it goes on)")
        self.key = key
        self.wait_s = wait_s


@dataclass
class _Flight(Generic[T]):
    done: threading.Event = field(default_factory=threading.Event)
    value: T | None = None
    error: BaseException | None = None


class SingleFlight(Generic[K, T]):
    """Loads keyed on ``K``; ``started`` counts the loads begun (one per key per flight)."""

    def __init__(self, name: str = "single-flight") -> None:
        self.name = name
        self.started = 0
        self._lock = threading.Lock()
        self._flights: dict[K, _Flight[T]] = {}

    def run(self, key: K, load: Callable[[], T], wait_s: float | None) -> T:
        """``load()``'s value, from the flight already under way for ``key`` or from a new one; ``FlightTimeout``
        after ``wait_s`` seconds (``None``: no limit), the load's own exception if it failed."""
        flight = self._join(key, load)
        if not flight.done.wait(None if wait_s is None else max(0.0, wait_s)):
            raise FlightTimeout(key, wait_s)
        if flight.error is not None:
            raise flight.error
        return flight.value  # type: ignore[return-value]

    def in_flight(self) -> int:
        with self._lock:
            return len(self._flights)

    def _join(self, key: K, load: Callable[[], T]) -> _Flight[T]:
        with self._lock:
            flight = self._flights.get(key)
            if flight is not None:
                return flight
            flight = self._flights[key] = _Flight()
            self.started += 1
        thread = threading.Thread(target=self._fly, args=(key, flight, load), name=f"{self.name}-load", daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: this flight fails now rather than never ending
            self._land(key, flight, exc)
        return flight

    def _fly(self, key: K, flight: _Flight[T], load: Callable[[], T]) -> None:
        try:
            flight.value = load()
        except BaseException as exc:  # handed to every waiter; the thread itself ends quietly
            self._land(key, flight, exc)
        else:
            self._land(key, flight, None)

    def _land(self, key: K, flight: _Flight[T], error: BaseException | None) -> None:
        flight.error = error
        with self._lock:
            if self._flights.get(key) is flight:
                del self._flights[key]
        flight.done.set()
