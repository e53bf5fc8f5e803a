"""Issue 8 item 1: bursts against a healthy Redis never answer 503.

Real Envoy, extproc, emulator and redis-server, with the DEFAULT Redis settings (no
`timeout_ms` in the config, so 50 ms). Each burst puts 200 requests in flight at once
(asyncio httpx, one connection each). Before the fix, the 50 ms bound also counted the
wait for the event loop and a connection slot, so a burst on 2 cores turned queueing into
`503 "The budget service is unavailable"` and opened the breaker for every tenant.
"""

from __future__ import annotations

import asyncio
import collections
import time
from typing import Any

import httpx
import pytest
import redis

from extproc.devstack import Stack
from tests.conftest import ACME_KEY, CHAT, GLOBEX_KEY, chat_body, gateway_config, start_gateway

BURSTS = 5
IN_FLIGHT = 200
# One emulator call (3 prompt + 4 completion tokens) costs 3 + 40 = 43 micro-USD; a hold
# for max_tokens=8 is about 30 + 80 micro-USD: a USD 0.002 budget admits a few dozen.
PRICE = {"input_per_mtok": 1, "output_per_mtok": 10}
SMALL_LIMIT_MICRO_USD = 2_000


def burst_config(redis_port: int) -> Any:
    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}  # defaults only
        doc["models"]["gpt-4o-mini"]["price"] = PRICE
        doc["tenants"]["acme"]["budgets"] = [
            {"scope": "tenant", "window": "day", "limit_usd": 0.002}]
        doc["tenants"]["globex"]["budgets"] = [
            {"scope": "tenant", "window": "day", "limit_usd": 100000}]
        return doc
    return document


async def burst(base_url: str, key: str, errors: list[str]) -> list[int]:
    """200 requests in flight at once, each on its own connection."""
    limits = httpx.Limits(max_connections=IN_FLIGHT, max_keepalive_connections=IN_FLIGHT)
    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as client:
        start = asyncio.Event()

        async def one() -> int:
            await start.wait()
            response = await client.post(CHAT, json=chat_body(max_tokens=8),
                                         headers={"authorization": f"Bearer {key}"})
            if response.status_code == 503:
                errors.append(response.text[:200])
            return response.status_code

        tasks = [asyncio.create_task(one()) for _ in range(IN_FLIGHT)]
        await asyncio.sleep(0)  # every task is parked on the event before any is sent
        start.set()
        return list(await asyncio.gather(*tasks))


def daily_counter(redis_port: int, tenant: str) -> tuple[int, int]:
    client = redis.Redis(port=redis_port, decode_responses=True)
    try:
        [key] = list(client.scan_iter(f"asc:{{t:{tenant}}}:b:tenant:{tenant}:d*"))
        spent, held = client.hmget(key, "spent", "held")
    finally:
        client.close()
    return int(spent or 0), int(held or 0)


@pytest.mark.both_paths
def test_bursts_with_a_healthy_redis_never_answer_503(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    gateway = start_gateway(stack, stack.workdir / "config", document=burst_config(redis_port))

    small: collections.Counter[int] = collections.Counter()
    large: collections.Counter[int] = collections.Counter()
    errors: list[str] = []
    for _ in range(BURSTS):
        small.update(asyncio.run(burst(gateway.base_url, ACME_KEY, errors)))
        large.update(asyncio.run(burst(gateway.base_url, GLOBEX_KEY, errors)))

    print(f"\n503s over {BURSTS} bursts of {IN_FLIGHT}: small budget {small[503]},"
          f" large budget {large[503]}; small {dict(small)}, large {dict(large)};"
          f" 503 bodies: {collections.Counter(errors).most_common(3)}")
    if small[503] + large[503]:
        reasons = collections.Counter(
            line.split('"reason":')[1][:60] for line in gateway.extproc.log_text().splitlines()
            if '"reason":' in line)
        print(f"extproc reasons: {reasons.most_common(5)}")
    assert small[503] + large[503] == 0
    assert set(small) == {200, 429}
    assert dict(large) == {200: BURSTS * IN_FLIGHT}
    deadline = time.monotonic() + 15  # every finish() settles just after its response
    while daily_counter(redis_port, "acme")[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    spent, held = daily_counter(redis_port, "acme")
    assert held == 0
    assert spent == 43 * small[200]
    assert spent <= SMALL_LIMIT_MICRO_USD
