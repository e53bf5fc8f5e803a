"""The budget ledger in Redis: one Lua call to reserve, one to settle.

`RedisLedger` holds a request's worst case on every counter it touches in one atomic
script (all or nothing), then replaces the holds with the real amounts. Both calls are
keyed by the gateway's request id, so a replayed reserve holds once and a repeated settle
charges once. Holds that are never settled (process killed, stream lost) expire and are
returned by `sweep`. Works on a single Redis and on Redis Cluster: every key of a request
carries the same hash tag (`policy.hash_tag`). On a single node, the batched calls go
over the ledger's own RESP connections (`resp_pool`, `extproc.budgets.resp`).

Redis errors are mapped once, here, to `LedgerUnavailable`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, Protocol

from redis import exceptions as redis_errors
from redis.asyncio import ConnectionPool, Redis, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from extproc.backends import REDIS_FAILURES, describe_redis_failure
from extproc.budgets.policy import CounterGroup
from extproc.budgets.resp import RespAddress, RespPool, encode_command
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
    "resp_pool",
]

_SCRIPTS: Final = resources.files("extproc.budgets") / "lua"


MAX_CONNECTIONS: Final = 64
"""Ledger calls in flight per process: the ledger's one gate (`RedisLedger._call`). A call
beyond it waits for a free slot for at most `redis.queue_timeout_ms`."""
POOL_HEADROOM: Final = 32
"""Connections beyond the ledger's gate for the other users of the client (keyring records,
key pool health). The pool does not block: past its size a call fails at once."""


IO_CEILING_FACTOR: Final = 20
IO_CEILING_MIN_S: Final = 1.0
_BUSY_SHARE: Final = 0.5
"""A thread that ran or waited for a CPU this share of a window was busy in it."""


def io_ceiling_s(timeout_s: float) -> float:
    """How long a ledger call may take at most while this process is too busy to read
    Redis' answers (see `_IoDeadline`); also redis-py's own socket timeouts."""
    return max(IO_CEILING_MIN_S, IO_CEILING_FACTOR * timeout_s)


def redis_client(settings: RedisSettings) -> Any:
    """An asyncio client for `settings`: Redis, or RedisCluster when `cluster: true`.

    `redis.timeout_ms` bounds the time Redis takes, not this process. redis-py's socket
    timeouts are wall-clock asyncio timers: on a loaded host they also count the time this
    process ran other streams or waited for a CPU (measured on 2 cores: 13 to 53 false
    timeouts in 2,000 burst requests with a 50 ms socket timeout). So the ledger bounds
    its calls itself (`_IoDeadline`), and redis-py's timeouts here are a backstop, at
    the ledger's ceiling (1 s by default), also for the client's other users (keyring
    records, key health). Waiting for a slot is bounded by `redis.queue_timeout_ms`, in
    the ledger's one gate; the connection pool itself never blocks.
    """
    io_s = io_ceiling_s(settings.timeout_ms / 1000)
    size = MAX_CONNECTIONS + POOL_HEADROOM
    if settings.cluster:
        return RedisCluster.from_url(settings.url, socket_timeout=io_s,
                                     socket_connect_timeout=io_s, max_connections=size,
                                     retry=_retry())
    if settings.sentinel is not None:
        return _sentinel_master(settings, io_s, size)
    pool = ConnectionPool.from_url(settings.url, socket_timeout=io_s,
                                   socket_connect_timeout=io_s, max_connections=size,
                                   retry=_retry())
    return Redis(connection_pool=pool)


def resp_pool(settings: RedisSettings) -> RespPool | None:
    """The ledger's own connections for its batched calls (`RedisLedger(resp=...)`), to
    the single node `redis_client(settings)` talks to; None for Cluster, Sentinel and TLS,
    which keep redis-py. Measured by bench/ledger.py, run on its own."""
    if settings.cluster or settings.sentinel is not None:
        return None
    address = RespAddress.from_url(settings.url)
    if address is None:
        return None
    return RespPool(address, connect_timeout_s=io_ceiling_s(settings.timeout_ms / 1000))


def _sentinel_master(settings: RedisSettings, io_s: float, size: int) -> Any:
    """A client of the master the sentinels name; each new connection asks them again, so
    after a failover the next call reaches the promoted replica. Database, username and
    password come from `url` (its host is not used)."""
    assert settings.sentinel is not None
    options = ConnectionPool.from_url(settings.url).connection_kwargs
    addresses = [(host, int(port)) for host, _, port in
                 (a.rpartition(":") for a in settings.sentinel.addresses)]
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        addresses, socket_timeout=io_s, socket_connect_timeout=io_s)
    return sentinel.master_for(
        settings.sentinel.service, socket_timeout=io_s, socket_connect_timeout=io_s,
        max_connections=size, retry=_retry(),
        **{k: v for k, v in options.items() if k in ("db", "username", "password")})


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
    charge_on_expiry: bool = False
    """The sweeper charges this hold in full instead of returning it: the fast path's
    usage comes from Envoy's best-effort access log, and a lost one must never become a
    free request (docs/decisions/0122-usage-by-access-log.md)."""

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
    def __init__(self, client: Any, *, hold_ttl_s: float = 600.0, io_timeout_s: float = 0.05,
                 queue_timeout_s: float = 1.0, max_in_flight: int = MAX_CONNECTIONS,
                 resp: RespPool | None = None) -> None:
        """`client`: a redis.asyncio Redis or RedisCluster (decode_responses off or on).
        `resp`: connections to the same single node (`resp_pool`) for the batched calls,
        which then skip redis-py; without it they use `client.pipeline()`."""
        self._client = client
        self._resp = resp
        self._io_timeout_s = io_timeout_s
        self._io_ceiling_s = io_ceiling_s(io_timeout_s)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._queue_timeout_s = queue_timeout_s
        self._hold_ttl_ms = int(hold_ttl_s * 1000)
        self._record_ttl_ms = self._hold_ttl_ms * 2 + RECORD_GRACE_MS
        self._reserve = client.register_script((_SCRIPTS / "reserve.lua").read_text())
        self._settle = client.register_script((_SCRIPTS / "settle.lua").read_text())
        self._sweep = client.register_script((_SCRIPTS / "sweep.lua").read_text())
        self._loaded = False
        self._loading = asyncio.Lock()
        self._batching = not isinstance(client, RedisCluster)
        self._flushing: set[asyncio.Task[None]] = set()
        self._pending: list[_PendingCall] = []
        """Calls asked for in this event-loop turn: sent together in one pipeline."""

    @property
    def settle_bound_s(self) -> float | None:
        """The longest a settle asked for now can take, by the ledger's own deadlines: the
        slot wait (`queue_timeout_s`), then the I/O deadline up to its ceiling and one more
        window (`_IoDeadline`). None before the scripts are loaded (that call waits for
        the client's socket timeouts only) and on Redis Cluster (redis-py's own path)."""
        if not (self._batching and self._loaded):
            return None
        return self._queue_timeout_s + self._io_ceiling_s + self._io_timeout_s

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
        if reservation.charge_on_expiry:
            args.append(1)
        if self._batching and self._loaded:
            reply = await self._batched(self._reserve, keys, args)
        else:
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
        keys = [reservation.record_key, reservation.holds_key]
        if self._batching and self._loaded:
            reply = await self._batched(self._settle, keys, args)
        else:
            reply = await self._call(self._settle, keys, args)
        return SettleResult(status=int(reply[0]), overrun=tuple(int(v) for v in reply[1:]))

    async def _batched(self, script: Any, keys: list[str], args: Sequence[object]) -> Any:
        """Every reserve and settle asked for in one event-loop turn goes to Redis in one
        pipeline (one round trip, one slot, one deadline): settles come in batches (Envoy's
        access-log entries, requests finishing together) and concurrent requests reserve
        together. Each call still gets its own reply or error; a failed pipeline fails
        each of its calls as `LedgerUnavailable`. Measured in bench/fastpath.py."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append(_PendingCall(script, keys, list(args), future))
        if len(self._pending) == 1:
            task = asyncio.get_running_loop().create_task(self._flush_settles())
            self._flushing.add(task)
            task.add_done_callback(self._flushing.discard)
        return await future

    async def _flush_settles(self) -> None:
        """Send this turn's calls (see `_batched`)."""
        await asyncio.sleep(0)  # let this turn's other settles join the batch
        batch, self._pending = self._pending, []
        try:
            replies = await self._call_pipeline(batch)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else LedgerUnavailable("redis: cancelled")
            for pending in batch:
                if not pending.future.done():
                    pending.future.set_exception(error)
            if not isinstance(exc, Exception):
                raise
            return
        for pending, reply in zip(batch, replies, strict=True):
            if pending.future.done():
                continue
            if isinstance(reply, redis_errors.NoScriptError):
                self._loaded = False  # Redis lost its scripts: the single path reloads
                pending.future.set_exception(LedgerUnavailable("redis: NOSCRIPT"))
            elif isinstance(reply, Exception):
                pending.future.set_exception(LedgerUnavailable(describe_redis_failure(reply))
                                             if isinstance(reply, REDIS_FAILURES)
                                             else LedgerUnavailable("redis: error reply"))
            else:
                pending.future.set_result(reply)

    async def _call_pipeline(self, batch: list[_PendingCall]) -> list[Any]:
        async def send() -> list[Any]:
            if self._resp is not None:
                return await self._resp.execute([
                    encode_command(("EVALSHA", pending.script.sha, len(pending.keys),
                                    *pending.keys, *pending.args))
                    for pending in batch])
            pipe = self._client.pipeline(transaction=False)
            for pending in batch:
                pipe.evalsha(pending.script.sha, len(pending.keys), *pending.keys,
                             *pending.args)
            replies: list[Any] = await pipe.execute(raise_on_error=False)
            return replies

        result: list[Any] = await self._guarded(send)
        return result

    def close(self) -> None:
        """Close the ledger's own connections (`resp`); the client is the caller's."""
        if self._resp is not None:
            self._resp.close()

    async def sweep(self, tag: str, limit: int = 100) -> int:
        reply = await self._call(self._sweep, [holds_key(tag)], [int(time.time() * 1000), limit])
        return int(reply)

    async def _call(self, script: Any, keys: list[str], args: Sequence[object]) -> Any:
        return await self._guarded(lambda: script(keys=keys, args=list(args)))

    async def _guarded(self, send: Callable[[], Awaitable[Any]]) -> Any:
        """`send()` to Redis in one of the ledger's slots and under its I/O deadline; its
        failures become `LedgerUnavailable` (`LedgerOverloaded` for no free slot or
        connection)."""
        await self._acquire_slot()
        deadline: _IoDeadline | None = None
        try:
            if not self._loaded:
                # One-time set-up: cluster discovery and SCRIPT LOAD on every primary take
                # several connections and round trips (a cold cluster client took over
                # 100 ms on a loaded 2-core host); the client's socket timeouts bound them,
                # not one call's I/O deadline.
                await self._load_scripts()
            deadline = _IoDeadline(self._io_timeout_s, self._io_ceiling_s)
            return await send()
        except asyncio.CancelledError:
            if deadline is not None and deadline.expired and deadline.task.uncancel() == 0:
                raise LedgerUnavailable("redis: TimeoutError") from None
            raise  # cancelled from outside (the client left)
        except redis_errors.MaxConnectionsError:
            raise LedgerOverloaded("redis: connection pool exhausted") from None
        except REDIS_FAILURES as exc:
            raise LedgerUnavailable(describe_redis_failure(exc)) from None
        finally:
            if deadline is not None:
                deadline.cancel()
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


@dataclass(frozen=True, slots=True)
class _PendingCall:
    script: Any
    keys: list[str]
    args: list[object]
    future: asyncio.Future[Any]


def _busy_ns() -> int:
    """Time this thread has been on a CPU or waiting for one (Linux schedstat), in ns;
    the thread's CPU time where schedstat is missing."""
    try:
        with open("/proc/thread-self/schedstat", "rb") as stat:
            on_cpu, waiting, _ = stat.read().split()
        return int(on_cpu) + int(waiting)
    except (OSError, ValueError):
        return time.thread_time_ns()


class _IoDeadline:
    """Bounds one Redis call to `timeout_s` of Redis' time, not of this process's.

    An asyncio timer measures wall time, and on a loaded host most of a call's wall time
    can be this process's: its event loop runs a few hundred other streams, and the
    kernel leaves it waiting for a CPU for tens of milliseconds at a time (measured on 2
    cores: 27 ms between two lines of code of one call). Redis is to blame only for time
    this thread spent idle, waiting for it. So when `timeout_s` has passed, the deadline
    watches one more `timeout_s` window: if the thread was mostly running or waiting for a
    CPU in it (`_BUSY_SHARE`), the call gets another window, up to `ceiling_s` in all;
    if the thread was mostly idle and the answer still has not come, Redis is slow and
    the call is cancelled (`expired`) - after one to two `timeout_s` on an idle process.
    """

    __slots__ = ("_busy_at", "_ceiling", "_handle", "_loop", "_timeout_s", "_window_at",
                 "expired", "task")

    def __init__(self, timeout_s: float, ceiling_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        self.task = task
        self._timeout_s = timeout_s
        now = self._loop.time()
        self._ceiling = now + ceiling_s
        self._window_at = 0.0
        self._busy_at = 0
        self._handle: asyncio.Handle = self._loop.call_at(now + timeout_s, self._open_window)
        self.expired = False

    def _open_window(self) -> None:
        self._window_at = self._loop.time()
        self._busy_at = _busy_ns()
        self._handle = self._loop.call_at(self._window_at + self._timeout_s, self._judge)

    def _judge(self) -> None:
        now = self._loop.time()
        busy_s = (_busy_ns() - self._busy_at) / 1e9
        if busy_s > _BUSY_SHARE * (now - self._window_at) and now < self._ceiling:
            self._open_window()  # this process, not Redis, used the time
            return
        # An answer the loop read in this iteration reaches the task before this runs.
        self._handle = self._loop.call_soon(self._expire)

    def _expire(self) -> None:
        self.expired = True
        self.task.cancel()

    def cancel(self) -> None:
        self._handle.cancel()
