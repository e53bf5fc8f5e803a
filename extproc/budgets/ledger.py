"""The budget ledger in Redis: one Lua call to reserve, one to settle.

`RedisLedger` holds a request's worst case on every counter it touches in one atomic
script (all or nothing), then replaces the holds with the real amounts. Both calls are
keyed by the gateway's request id, so a replayed reserve holds once and a repeated settle
charges once. Holds that are never settled (process killed, stream lost) expire and are
returned by `sweep`. Works on a single Redis and on Redis Cluster: every key of a request
carries the same hash tag (`policy.hash_tag`).

Redis errors are mapped once, here, to `LedgerUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis, RedisCluster

from extproc.budgets.policy import CounterGroup
from extproc.config import RedisSettings

__all__ = [
    "BudgetLedger",
    "LedgerUnavailable",
    "RedisLedger",
    "Reservation",
    "ReserveResult",
    "redis_client",
]

_SCRIPTS: Final = resources.files("extproc.budgets") / "lua"


MAX_CONNECTIONS: Final = 64
"""Redis calls in flight per replica (so connections per node). Requests beyond it wait
for a free slot within the Redis timeout instead of failing at once."""


def redis_client(settings: RedisSettings) -> Any:
    """An asyncio client for `settings`: Redis, or RedisCluster when `cluster: true`."""
    timeout_s = settings.timeout_ms / 1000
    if settings.cluster:
        return RedisCluster.from_url(settings.url, socket_timeout=timeout_s,
                                     socket_connect_timeout=timeout_s,
                                     max_connections=MAX_CONNECTIONS)
    pool = BlockingConnectionPool.from_url(settings.url, socket_timeout=timeout_s,
                                           socket_connect_timeout=timeout_s,
                                           max_connections=MAX_CONNECTIONS, timeout=timeout_s)
    return Redis(connection_pool=pool)


class LedgerUnavailable(Exception):
    """Redis could not be reached or answered with an error; the message is safe to log."""


@dataclass(frozen=True, slots=True)
class Reservation:
    request_id: str
    tag: str
    groups: tuple[CounterGroup, ...]

    @property
    def record_key(self) -> str:
        return f"asc:{self.tag}:res:{self.request_id}"

    @property
    def holds_key(self) -> str:
        return holds_key(self.tag)


def holds_key(tag: str) -> str:
    return f"asc:{tag}:holds"


@dataclass(frozen=True, slots=True)
class ReserveResult:
    held: bool
    replay: bool = False
    denied: CounterGroup | None = None
    remaining: tuple[int, ...] = ()
    """Per group, what is left after this hold (same order as the groups)."""


class BudgetLedger(Protocol):
    async def reserve(self, reservation: Reservation) -> ReserveResult: ...

    async def settle(self, reservation: Reservation, actual: Sequence[int], *,
                     released: bool = False) -> int: ...

    async def sweep(self, tag: str, limit: int = 100) -> int: ...


class RedisLedger:
    def __init__(self, client: Any, *, hold_ttl_s: float = 600.0) -> None:
        """`client`: a redis.asyncio Redis or RedisCluster (decode_responses off or on)."""
        self._client = client
        self._slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self._hold_ttl_ms = int(hold_ttl_s * 1000)
        self._reserve = client.register_script((_SCRIPTS / "reserve.lua").read_text())
        self._settle = client.register_script((_SCRIPTS / "settle.lua").read_text())
        self._sweep = client.register_script((_SCRIPTS / "sweep.lua").read_text())
        self._loaded = False
        self._loading = asyncio.Lock()

    async def _load_scripts(self) -> None:
        """SCRIPT LOAD once (on every primary of a cluster) before the first EVALSHA.

        Without it, a burst of first calls all take redis-py's NOSCRIPT fallback at once,
        which on RedisCluster intermittently fails inside redis-py (measured: 1 of 3 cold
        bursts of 200). Later NOSCRIPTs (a Redis restart) still use that fallback.
        """
        async with self._loading:
            if self._loaded:
                return
            for script in (self._reserve, self._settle, self._sweep):
                await self._client.script_load(script.script)
            self._loaded = True

    async def reserve(self, reservation: Reservation) -> ReserveResult:
        keys: list[str] = [reservation.record_key, reservation.holds_key]
        args: list[int] = [self._hold_ttl_ms, int(time.time() * 1000), len(reservation.groups)]
        for group in reservation.groups:
            keys.extend(group.keys)
            args.extend((len(group.keys), group.limit, group.amount, group.ttl_s))
        reply = await self._call(self._reserve, keys, args)
        status = int(reply[0])
        if status == 2:
            return ReserveResult(held=True, replay=True)
        if status == 0:
            return ReserveResult(held=False, denied=reservation.groups[int(reply[1]) - 1])
        return ReserveResult(held=True, remaining=tuple(int(v) for v in reply[1:]))

    async def settle(self, reservation: Reservation, actual: Sequence[int], *,
                     released: bool = False) -> int:
        """Charge `actual` (one amount per group); returns 1 settled, 2 late, 0 no-op."""
        if len(actual) != len(reservation.groups) or any(a < 0 for a in actual):
            raise ValueError("one non-negative actual amount per group is required")
        state = "released" if released else "settled"
        reply = await self._call(self._settle, [reservation.record_key, reservation.holds_key],
                                 [state, *actual])
        return int(reply)

    async def sweep(self, tag: str, limit: int = 100) -> int:
        reply = await self._call(self._sweep, [holds_key(tag)], [int(time.time() * 1000), limit])
        return int(reply)

    async def _call(self, script: Any, keys: list[str], args: Sequence[object]) -> Any:
        try:
            if not self._loaded:
                await self._load_scripts()
            async with self._slots:
                return await script(keys=keys, args=list(args))
        except (redis_errors.RedisError, OSError) as exc:
            raise LedgerUnavailable(f"redis: {type(exc).__name__}") from None
