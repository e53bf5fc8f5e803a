"""The ledger pieces the fast path adds, against a real redis-server: holds charged in
full when swept (a lost access-log entry), and settles batched into one pipeline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from extproc.budgets.ledger import RedisLedger
from tests.integration.conftest import LEDGER_IO_TIMEOUT_S
from tests.integration.test_ledger import counter, make_budget, make_reservation


async def test_a_charge_on_expiry_hold_is_charged_in_full_by_the_sweep(redis: Any) -> None:
    budget = make_budget()
    ledger = RedisLedger(redis, io_timeout_s=LEDGER_IO_TIMEOUT_S, hold_ttl_s=0.001)
    charged = replace(make_reservation(budget, 5_000), charge_on_expiry=True)
    returned = make_reservation(budget, 7_000)
    assert (await ledger.reserve(charged)).held
    assert (await ledger.reserve(returned)).held
    key = charged.groups[0].keys[0]
    assert await counter(redis, key) == (0, 12_000)
    await asyncio.sleep(0.01)

    assert await ledger.sweep(charged.tag) == 2

    # The fast-path hold became spend; the other one went back, as before.
    assert await counter(redis, key) == (5_000, 0)
    # A settle arriving after the sweep changes nothing: charged money is never returned.
    late = await ledger.settle(charged, [1_000] * len(charged.groups))
    assert late.status == 0
    assert await counter(redis, key) == (5_000, 0)


@contextlib.contextmanager
def pipelines_sent(redis: Any) -> Iterator[list[int]]:
    """The number of commands in each pipeline `redis` executes while inside."""
    sent: list[int] = []
    real_pipeline = redis.pipeline

    def counting_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        async def execute(*a: Any, **k: Any) -> Any:
            sent.append(len(pipe.command_stack))
            return await real_execute(*a, **k)

        pipe.execute = execute
        return pipe

    redis.pipeline = counting_pipeline
    try:
        yield sent
    finally:
        redis.pipeline = real_pipeline


async def test_settles_of_one_turn_share_one_pipeline(redis: Any) -> None:
    budget = make_budget()
    ledger = RedisLedger(redis, io_timeout_s=LEDGER_IO_TIMEOUT_S)
    reservations = [make_reservation(budget, 10_000) for _ in range(20)]
    for reservation in reservations:
        assert (await ledger.reserve(reservation)).held
    with pipelines_sent(redis) as sent:
        results = await asyncio.gather(*(
            ledger.settle(r, [1_000 + i] + [0] * (len(r.groups) - 1))
            for i, r in enumerate(reservations)))
        again = await ledger.settle(reservations[0], [5] * len(reservations[0].groups))

    assert [r.status for r in results] == [1] * 20
    assert again.status == 0  # idempotent, as one by one
    assert sent == [20, 1]
    key = reservations[0].groups[0].keys[0]
    assert await counter(redis, key) == (sum(1_000 + i for i in range(20)), 0)


async def test_reserves_of_one_turn_share_one_pipeline_with_their_own_verdicts(
        redis: Any) -> None:
    budget = make_budget(tenant_usd=0.05)  # room for 5 holds of 10,000 micro-USD
    ledger = RedisLedger(redis, io_timeout_s=LEDGER_IO_TIMEOUT_S)
    first = make_reservation(budget, 10_000)
    assert (await ledger.reserve(first)).held  # loads the scripts; batching starts after
    with pipelines_sent(redis) as sent:
        results = await asyncio.gather(*(
            ledger.reserve(make_reservation(budget, 10_000)) for _ in range(6)))
        replay = await ledger.reserve(first)

    assert sent == [6, 1]
    assert [r.held for r in results] == [True] * 4 + [False] * 2  # all or nothing each
    assert replay.replay is True
    key = first.groups[0].keys[0]
    assert await counter(redis, key) == (0, 50_000)
