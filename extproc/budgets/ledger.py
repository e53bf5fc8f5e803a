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
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from extproc.budgets.policy import CounterGroup
from extproc.config import RedisSettings

__all__ = [
    "BudgetLedger",
    "LedgerOverloaded",
    "LedgerUnavailable",
    "RedisLedger",
    "Reservation",
    "ReserveResult",
    "SettleResult",
    "redis_client",
]

_SCRIPTS: Final = resources.files("extproc.budgets") / "lua"


MAX_CONNECTIONS: Final = 64
"""Ledger calls in flight per process: the ledger's one gate (`RedisLedger._call`). A call
beyond it waits for a free slot for at most `redis.queue_timeout_ms`."""
POOL_HEADROOM: Final = 32
"""Connections beyond the ledger's gate for the other users of the client (keyring records,
key pool health), so the pool itself never holds a ledger call back."""


def redis_client(settings: RedisSettings) -> Any:
    """An asyncio client for `settings`: Redis, or RedisCluster when `cluster: true`.

    `redis.timeout_ms` bounds Redis I/O only (connect, socket reads and writes): a timeout
    there says something about Redis. Waiting for a connection is bounded separately by
    `redis.queue_timeout_ms`, so a burst that queues is slowed down, not failed.
    """
    io_s = settings.timeout_ms / 1000
    size = MAX_CONNECTIONS + POOL_HEADROOM
    if settings.cluster:
        return RedisCluster.from_url(settings.url, socket_timeout=io_s,
                                     socket_connect_timeout=io_s, max_connections=size,
                                     retry=_retry())
    pool = BlockingConnectionPool.from_url(settings.url, socket_timeout=io_s,
                                           socket_connect_timeout=io_s, max_connections=size,
                                           timeout=settings.queue_timeout_ms / 1000,
                                           retry=_retry())
    return Redis(connection_pool=pool)


def _retry() -> Retry:
    """One immediate retry, on a broken connection only (a reset pooled socket, a cluster
    node that moved). redis-py's default - three tries with backoff of up to seconds -
    would hold a request for seconds while Redis is down, instead of failing fast. Every
    ledger script is idempotent by request id, so a retried call never applies twice."""
    return Retry(NoBackoff(), 1, supported_errors=(redis_errors.ConnectionError,))


RECORD_GRACE_MS: Final = 86_400_000
"""A reservation record outlives its hold by this much, so a late settle still finds it
(reserve.lua uses the same figure)."""


class LedgerUnavailable(Exception):
    """Redis could not be reached, timed out on I/O or answered with an error; the message
    is safe to log. The budget breaker counts it as a Redis failure."""


class LedgerOverloaded(LedgerUnavailable):
    """This process had no free Redis connection within `redis.queue_timeout_ms`: the
    call was never sent. Shed (503), but not a Redis failure for the breaker."""


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
class SettleResult:
    status: int
    """1 settled now, 2 settled late (the sweeper had returned the hold), 0 nothing to do."""
    overrun: tuple[int, ...] = ()
    """Per group: how far this settle pushed spent + held past the limit (0: within)."""


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
                     released: bool = False) -> SettleResult: ...

    async def sweep(self, tag: str, limit: int = 100) -> int: ...


class RedisLedger:
    def __init__(self, client: Any, *, hold_ttl_s: float = 600.0,
                 queue_timeout_s: float = 1.0, max_in_flight: int = MAX_CONNECTIONS) -> None:
        """`client`: a redis.asyncio Redis or RedisCluster (decode_responses off or on)."""
        self._client = client
        self._slots = asyncio.Semaphore(max_in_flight)
        self._queue_timeout_s = queue_timeout_s
        self._hold_ttl_ms = int(hold_ttl_s * 1000)
        self._record_ttl_ms = self._hold_ttl_ms * 2 + RECORD_GRACE_MS
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
                     released: bool = False) -> SettleResult:
        """Charge `actual` (one amount per group). `released`: give the holds back; when
        the reserve has not reached Redis yet, leave a tombstone so that it holds nothing."""
        if len(actual) != len(reservation.groups) or any(a < 0 for a in actual):
            raise ValueError("one non-negative actual amount per group is required")
        args: list[object] = ["released" if released else "settled", self._record_ttl_ms,
                              len(reservation.groups)]
        for group, amount in zip(reservation.groups, actual, strict=True):
            args.extend((amount, group.limit, len(group.keys), *group.keys))
        reply = await self._call(self._settle, [reservation.record_key, reservation.holds_key],
                                 args)
        return SettleResult(status=int(reply[0]), overrun=tuple(int(v) for v in reply[1:]))

    async def sweep(self, tag: str, limit: int = 100) -> int:
        reply = await self._call(self._sweep, [holds_key(tag)], [int(time.time() * 1000), limit])
        return int(reply)

    async def _call(self, script: Any, keys: list[str], args: Sequence[object]) -> Any:
        await self._acquire_slot()
        try:
            if not self._loaded:
                await self._load_scripts()
            return await script(keys=keys, args=list(args))
        except redis_errors.MaxConnectionsError:
            raise LedgerOverloaded("redis: connection pool exhausted") from None
        except redis_errors.ConnectionError as exc:
            if _pool_wait_timed_out(exc):
                raise LedgerOverloaded("redis: connection pool exhausted") from None
            raise LedgerUnavailable(f"redis: {type(exc).__name__}") from None
        except (redis_errors.RedisError, OSError) as exc:
            raise LedgerUnavailable(f"redis: {type(exc).__name__}") from None
        finally:
            self._slots.release()

    async def _acquire_slot(self) -> None:
        """The one gate: wait for a slot, for at most the queue timeout."""
        if not self._slots.locked():
            await self._slots.acquire()  # free slot: returns without suspending
            return
        try:
            async with asyncio.timeout(self._queue_timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise LedgerOverloaded("redis: no free connection within queue_timeout_ms"
                                   ) from None


def _pool_wait_timed_out(exc: Exception) -> bool:
    """BlockingConnectionPool's own wait expired (not a connect or read timeout)."""
    return isinstance(exc.__cause__, TimeoutError) and str(exc) == "No connection available."
