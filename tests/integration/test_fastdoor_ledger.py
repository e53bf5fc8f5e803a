"""The fast door against a real redis-server: a check Envoy gave up on returns its hold at
once (the request never reached the provider), and a decided one holds the worst case."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from extproc.config import parse_config
from extproc.fastdoor import decide
from extproc.runtime import Runtime, RuntimeHolder
from tests.integration.test_ledger import counter
from tests.unit.test_fastdoor import BODY, client_headers, parse
from tests.unit.test_fastpath import FAST_CONFIG
from tests.unit.test_phases import ENVIRON


def budget_holder(redis_port: int) -> RuntimeHolder:
    text = FAST_CONFIG.replace(
        "credentials:\n", f'redis: {{url: "redis://127.0.0.1:{redis_port}/0"}}\n'
        "credentials:\n", 1).replace(
        "  acme:\n", "  acme:\n    budgets: [{scope: tenant, window: day, limit_usd: 10}]\n", 1)
    return RuntimeHolder(Runtime.build(parse_config(text), environ=ENVIRON))


async def day_counter(redis: Any) -> tuple[int, int]:
    [key] = [k async for k in redis.scan_iter("asc:{t:acme}:b:tenant:acme:d*")]
    return await counter(redis, key)


async def test_a_check_envoy_gave_up_on_returns_its_hold(redis_server: int,
                                                         redis: Any) -> None:
    holder = budget_holder(redis_server)

    class Closing(asyncio.Transport):
        def is_closing(self) -> bool:
            return True

    decided = await decide(holder, None, "POST", "/v1/chat/completions", client_headers(),
                           BODY)
    _, fields, _ = parse(decided)
    assert fields["x-asc-path"] == "/v1/chat/completions"
    spent, held = await day_counter(redis)
    assert (spent, held) == (0, held)
    assert held > 0  # the worst case of the decided request

    abandoned = await decide(holder, None, "POST", "/v1/chat/completions", client_headers(),
                             BODY, Closing())

    assert abandoned == b""
    # Only the first request's hold remains: the abandoned one was returned, not charged.
    assert await day_counter(redis) == (0, held)


@pytest.fixture(autouse=True)
async def _clean(redis: Any) -> None:
    await redis.flushdb()
