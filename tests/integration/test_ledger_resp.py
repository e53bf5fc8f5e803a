"""The ledger's own RESP connections (`resp_pool`) against real redis-servers: pipelined
replies in order, error replies per command, NOSCRIPT, Redis stopped and restarted, a call
cancelled in flight, and a password that never shows."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from extproc.budgets.ledger import LedgerUnavailable, RedisLedger, redis_client, resp_pool
from extproc.budgets.resp import RespAddress, RespPool, encode_command
from extproc.config import RedisSettings
from extproc.devstack import LOOPBACK, Stack, free_port, redis_server_binary, wait_for_port
from tests.integration.conftest import LEDGER_IO_TIMEOUT_S
from tests.integration.test_ledger import counter, make_budget, make_reservation, poll

CANARY = "pw-canary-7f3a91"


def make_pool(port: int, *, url: str | None = None) -> RespPool:
    address = RespAddress.from_url(url or f"redis://{LOOPBACK}:{port}/0")
    assert address is not None
    return RespPool(address, connect_timeout_s=2.0)


def commands(*lines: tuple[object, ...]) -> list[bytes]:
    return [encode_command(line) for line in lines]


@pytest.fixture
async def admin(redis_server: int) -> AsyncIterator[Redis]:
    client = Redis(port=redis_server)
    try:
        yield client
    finally:
        await client.client_unpause()
        await client.aclose()


async def make_resp_ledger(url: str, **options: Any) -> tuple[RedisLedger, Any]:
    """A ledger on `url` with its batched calls on its own connections; scripts loaded."""
    settings = RedisSettings(url=url, timeout_ms=2000)
    client = redis_client(settings)
    pool = resp_pool(settings)
    assert pool is not None
    ledger = RedisLedger(client, resp=pool, **options)
    assert (await ledger.reserve(make_reservation(make_budget(), 1))).held  # loads scripts
    return ledger, client


async def test_pipelined_replies_come_back_in_order(redis_server: int) -> None:
    pool = make_pool(redis_server)
    key = f"resp:{uuid.uuid4().hex}"
    try:
        replies = await pool.execute(commands(
            ("SET", key, "a"), ("APPEND", key, "bc"), ("GET", key), ("INCR", f"{key}:n"),
            ("INCRBY", f"{key}:n", 41), ("GET", f"{key}:missing"),
            ("MGET", key, f"{key}:n")))
        assert replies == [b"OK", 3, b"abc", 1, 42, None, [b"abc", b"42"]]
        # Two batches at once, each on its own connection, each with its own replies.
        first, second = await asyncio.gather(
            pool.execute(commands(("INCRBY", f"{key}:n", 100))),
            pool.execute(commands(("GET", key), ("STRLEN", key))))
        assert (first, second) == ([142], [b"abc", 3])
    finally:
        pool.close()


async def test_an_error_reply_fails_its_command_only(redis_server: int) -> None:
    pool = make_pool(redis_server)
    key = f"resp:{uuid.uuid4().hex}"
    try:
        ok, error, value, noscript = await pool.execute(commands(
            ("SET", key, "text"), ("INCR", key), ("GET", key),
            ("EVALSHA", "0" * 40, 0)))
        assert (ok, value) == (b"OK", b"text")
        assert (type(error), str(error)) == (redis_errors.ResponseError, "ERR")
        assert (type(noscript), str(noscript)) == (redis_errors.NoScriptError, "NOSCRIPT")
        # The connection is still in step.
        assert await pool.execute(commands(("GET", key))) == [b"text"]
    finally:
        pool.close()


async def test_the_ledger_over_resp_never_overspends(redis_server: int) -> None:
    ledger, client = await make_resp_ledger(f"redis://{LOOPBACK}:{redis_server}/0",
                                            io_timeout_s=LEDGER_IO_TIMEOUT_S)
    try:
        budget = make_budget(tenant_usd=1.0)
        reservations = [make_reservation(budget, 10_000 + (i * 37) % 10_001)
                        for i in range(200)]
        results = await asyncio.gather(*(ledger.reserve(r) for r in reservations))
        held = [r for r, result in zip(reservations, results, strict=True) if result.held]
        key = reservations[0].groups[0].keys[0]
        assert await counter(client, key) == (0, sum(r.groups[0].amount for r in held))
        assert 1_000_000 - sum(r.groups[0].amount for r in held) < 20_001

        settled = await asyncio.gather(*(ledger.settle(r, [r.groups[0].amount // 2])
                                         for r in held))
        assert [s.status for s in settled] == [1] * len(held)
        assert await counter(client, key) == (sum(r.groups[0].amount // 2 for r in held), 0)
        again = await ledger.settle(held[0], [1])
        assert again.status == 0
    finally:
        ledger.close()
        await client.aclose()


async def test_noscript_after_script_flush_fails_one_call_then_recovers(
        redis_server: int, admin: Redis) -> None:
    ledger, client = await make_resp_ledger(f"redis://{LOOPBACK}:{redis_server}/0",
                                            io_timeout_s=LEDGER_IO_TIMEOUT_S)
    try:
        budget = make_budget()
        await admin.script_flush()
        with pytest.raises(LedgerUnavailable, match=r"^redis: NOSCRIPT$"):
            await ledger.reserve(make_reservation(budget, 1_000))
        reservation = make_reservation(budget, 2_000)
        assert (await ledger.reserve(reservation)).held  # reloaded, then batched again
        assert (await ledger.settle(reservation, [500])).status == 1
        assert await counter(client, reservation.groups[0].keys[0]) == (500, 0)
    finally:
        ledger.close()
        await client.aclose()


async def test_redis_stopped_fails_at_once_and_a_restart_recovers(tmp_path: Path) -> None:
    with Stack(tmp_path) as stack:
        process, port = stack.start_redis()
        # A 10 s I/O deadline: a "ConnectionError" (not "TimeoutError") failed without
        # waiting for it.
        ledger, client = await make_resp_ledger(f"redis://{LOOPBACK}:{port}/0",
                                                io_timeout_s=10.0)
        try:
            budget = make_budget()
            process.stop()
            for _ in range(3):
                with pytest.raises(LedgerUnavailable, match=r"^redis: ConnectionError$"):
                    await ledger.reserve(make_reservation(budget, 1_000))

            stack.start_redis(port)  # empty: no counters, no scripts

            async def reserve_once() -> bool:
                try:
                    return (await ledger.reserve(make_reservation(budget, 1_000))).held
                except LedgerUnavailable:
                    return False

            assert await poll(reserve_once, until=lambda held: held)
            reservation = make_reservation(budget, 3_000)
            assert (await ledger.reserve(reservation)).held
            assert await counter(client, reservation.groups[0].keys[0]) == (0, 4_000)
        finally:
            ledger.close()
            await client.aclose()


async def test_a_batch_cancelled_in_flight_leaves_the_next_one_its_own_replies(
        redis_server: int, admin: Redis) -> None:
    pool = make_pool(redis_server)
    key = f"resp:{uuid.uuid4().hex}"
    try:
        assert await pool.execute(commands(("SET", f"{key}:b", 0))) == [b"OK"]  # warm
        await admin.client_pause(10_000, all=False)  # Redis holds every write back
        stuck = asyncio.create_task(pool.execute(commands(("INCRBY", f"{key}:a", 5))))

        async def blocked() -> int:
            return int((await admin.info("clients"))["blocked_clients"])

        assert await poll(blocked, until=lambda n: n == 1)
        stuck.cancel()
        with pytest.raises(asyncio.CancelledError):
            await stuck
        await admin.client_unpause()

        # Had the connection been reused, this batch would read the 5 meant for the other.
        # (The cancelled INCRBY itself went with its closed connection: Redis drops what
        # a client that left had sent but Redis had not run yet.)
        assert await pool.execute(commands(("INCRBY", f"{key}:b", 7))) == [7]
    finally:
        pool.close()


async def test_a_deadline_expired_in_flight_is_a_timeout_and_the_next_call_is_in_step(
        redis_server: int, admin: Redis) -> None:
    ledger, client = await make_resp_ledger(f"redis://{LOOPBACK}:{redis_server}/0",
                                            io_timeout_s=0.05)
    try:
        budget = make_budget(tenant_usd=1.0)
        await admin.client_pause(2_000, all=False)
        late = make_reservation(budget, 10_000)
        with pytest.raises(LedgerUnavailable, match=r"^redis: TimeoutError$"):
            await ledger.reserve(late)
        await admin.client_unpause()

        # The next reserve gets its own verdict: what is left after its hold of 20,000
        # (whether the timed-out reserve ran in Redis before its connection closed or not).
        result = await ledger.reserve(make_reservation(budget, 20_000))
        spent, held = await counter(client, late.groups[0].keys[0])
        assert (spent, held in (20_000, 30_000)) == (0, True)
        assert (result.held, result.replay, result.remaining) == (True, False,
                                                                  (1_000_000 - held,))
    finally:
        ledger.close()
        await client.aclose()


@pytest.fixture(scope="module")
def password_redis(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A redis-server of our own that wants a password (`CANARY`)."""
    with Stack(tmp_path_factory.mktemp("redis-auth")) as stack:
        port = free_port()
        data_dir = stack.workdir / f"redis-{port}"
        data_dir.mkdir()
        process = stack.spawn(f"redis-{port}", [
            redis_server_binary(), "--port", str(port), "--bind", LOOPBACK, "--save", "",
            "--appendonly", "no", "--dir", str(data_dir), "--requirepass", CANARY])
        wait_for_port(port, process=process)
        yield port


def exception_texts(exc: BaseException) -> str:
    """str and repr of an exception and of every exception behind it."""
    texts = []
    seen: BaseException | None = exc
    while seen is not None:
        texts += [str(seen), repr(seen), repr(seen.args)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(texts)


async def test_a_password_logs_in_and_never_shows(password_redis: int) -> None:
    url = f"redis://:{CANARY}@{LOOPBACK}:{password_redis}/2"
    ledger, client = await make_resp_ledger(url, io_timeout_s=LEDGER_IO_TIMEOUT_S)
    try:
        reservation = make_reservation(make_budget(), 1_000)
        assert (await ledger.reserve(reservation)).held
        assert await client.exists(reservation.record_key) == 1  # db 2, as the URL says
        pool = resp_pool(RedisSettings(url=url))
        assert CANARY not in repr(pool)
    finally:
        ledger.close()
        await client.aclose()


async def test_a_wrong_password_is_an_authentication_error_without_the_password(
        password_redis: int) -> None:
    right = f"redis://:{CANARY}@{LOOPBACK}:{password_redis}/0"
    ledger, client = await make_resp_ledger(right, io_timeout_s=LEDGER_IO_TIMEOUT_S)
    wrong = resp_pool(RedisSettings(url=f"redis://:{CANARY}-x@{LOOPBACK}:{password_redis}/0"))
    assert wrong is not None
    ledger_wrong = RedisLedger(client, resp=wrong, io_timeout_s=LEDGER_IO_TIMEOUT_S)
    try:
        assert (await ledger_wrong.reserve(make_reservation(make_budget(), 1))).held  # redis-py
        with pytest.raises(LedgerUnavailable) as caught:
            await ledger_wrong.reserve(make_reservation(make_budget(), 1))  # resp
        assert str(caught.value) == "redis: AuthenticationError"
        assert CANARY not in exception_texts(caught.value)
        with pytest.raises(redis_errors.AuthenticationError) as direct:
            await wrong.execute(commands(("PING",)))
        assert CANARY not in exception_texts(direct.value)
    finally:
        ledger.close()
        ledger_wrong.close()
        await client.aclose()


async def test_calls_of_one_turn_share_one_batch_with_their_own_replies(
        redis_server: int) -> None:
    ledger, client = await make_resp_ledger(f"redis://{LOOPBACK}:{redis_server}/0",
                                            io_timeout_s=LEDGER_IO_TIMEOUT_S)
    pool = ledger._resp
    assert pool is not None
    sent: list[int] = []
    real_execute = pool.execute

    async def counting_execute(batch: list[bytes]) -> list[Any]:
        sent.append(len(batch))
        return await real_execute(batch)

    pool.execute = counting_execute  # type: ignore[method-assign]
    try:
        budget = make_budget(tenant_usd=0.05)  # room for 5 holds of 10,000
        reservations = [make_reservation(budget, 10_000) for _ in range(6)]
        results = await asyncio.gather(*(ledger.reserve(r) for r in reservations))
        held = [r for r, result in zip(reservations, results, strict=True) if result.held]
        settled = await asyncio.gather(*(ledger.settle(r, [1_000 + i])
                                         for i, r in enumerate(held)))

        assert sent == [6, 5]
        assert [r.held for r in results] == [True] * 5 + [False]
        assert [s.status for s in settled] == [1] * 5
        key = held[0].groups[0].keys[0]
        assert await counter(client, key) == (sum(1_000 + i for i in range(5)), 0)
    finally:
        ledger.close()
        await client.aclose()


async def test_an_idle_connection_redis_closed_is_replaced(redis_server: int,
                                                           admin: Redis) -> None:
    pool = make_pool(redis_server)
    try:
        [client_id] = await pool.execute(commands(("CLIENT", "ID")))
        assert await admin.client_kill_filter(_id=client_id) == 1

        [other_id] = await pool.execute(commands(("CLIENT", "ID")))
        assert other_id != client_id
        assert await pool.execute(commands(("PING",))) == [b"PONG"]
    finally:
        pool.close()
