"""One call in flight per key: concurrent callers asking for the same thing share it.

A cache that expires under load would otherwise send every waiting request to the backend
at once (a KMS unwrap, a Redis read). The shared call runs as its own task and callers
await it through `asyncio.shield`, so a caller that is cancelled (its client left) leaves
the call running for the others. A failure is handed to every caller of that flight and
not remembered: the next caller starts a new flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

__all__ = ["SingleFlight"]

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    __slots__ = ("_flights",)

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> V:
        """`await call()`, or the result of the flight already running for `key`."""
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(call())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(flight)

    def forget(self, key: K) -> None:
        """The next caller starts a new flight (the running one still answers its callers)."""
        self._flights.pop(key, None)

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    def _landed(self, key: K, flight: asyncio.Future[V]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # handed to every caller; mark it retrieved for asyncio
