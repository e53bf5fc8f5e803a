"""Key pool health through real Envoy, extproc, emulator and redis-server (issue 8, items 2
and 3). Provider faults are queued through the emulator's control API.
"""

from __future__ import annotations

import time
from typing import Any

import httpx
import pytest
import redis

from extproc.devstack import Stack
from tests.conftest import (
    ACME_KEY,
    CHAT,
    GLOBEX_KEY,
    Gateway,
    chat_body,
    gateway_config,
    start_gateway,
)
from tests.e2e.test_credentials import log_events, metric_value

CREDENTIAL = "global/emu-eu-1"
"""acme's (and, here, globex's) provider emu-eu has one credential, in the global scope."""
HEALTH_KEY = "asc:cred:health"
"""Where replicas share opens: credential -> open until (epoch seconds)."""
# A provider 429's text names the shared account: the gateway answers a fixed one.
RATE_LIMITED = {"error": {"message": "The provider's rate limit was reached; retry later.",
                          "type": "rate_limit_error", "param": None, "code": "rate_limited"}}


def pool_document(redis_port: int) -> Any:
    """The tests' config with Redis (pool health sync), and globex moved onto acme's
    provider with a budget too small for any request: its requests take a key from the
    pool and are then refused by the budget."""

    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout_ms": 500}
        doc["tenants"]["globex"].update(
            zone="eu", models=["gpt-4o-mini"],
            budgets=[{"scope": "tenant", "window": "day", "limit_usd": 0.000001}])
        return doc

    return document


@pytest.fixture
def pool_gateway(stack: Stack) -> tuple[Gateway, redis.Redis]:
    _, redis_port = stack.start_redis()
    gateway = start_gateway(stack, stack.workdir / "config", document=pool_document(redis_port))
    client = redis.Redis(port=redis_port, decode_responses=True)
    first = gateway.chat()
    assert (first.status_code, first.headers["x-asc-credential"]) == (200, "emu-eu-1@1")
    return gateway, client


def state_is(gateway: Gateway, state: str, credential: str = CREDENTIAL) -> bool:
    return metric_value(gateway.metrics(), "asc_credential_state", credential=credential,
                        state=state) == 1


def poll(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


def open_from_another_replica(gateway: Gateway, client: redis.Redis, seconds: float) -> float:
    """Open the credential the way another replica's discovery does (the shared health
    hash), wait until this replica has adopted it and until it is due for a probe."""
    until = time.time() + seconds
    client.hset(HEALTH_KEY, CREDENTIAL, str(until))
    poll(lambda: state_is(gateway, "open"))
    poll(lambda: time.time() > until + 0.05)  # the cool-down the test itself set
    return until


# -- item 2: a probe taken by a request that fails for another reason is given back ----------


def test_probe_taken_by_a_budget_refused_request_is_given_back(
        pool_gateway: tuple[Gateway, redis.Redis]) -> None:
    gateway, client = pool_gateway
    open_from_another_replica(gateway, client, 1.5)
    gateway.emulator.clear()

    refused = gateway.chat(key=GLOBEX_KEY)  # takes the half-open probe, then the budget says no
    assert refused.status_code == 429
    assert refused.json() == {"error": {
        "message": "Request refused: it would exceed the tenant daily budget (limit USD "
                   "0.000001).", "type": "rate_limit_error", "param": None,
        "code": "rate_limited"}}
    assert refused.headers["x-asc-credential"] == "emu-eu-1@1"

    # Before the fix: 503 "No usable credential for the selected provider." until restart.
    recovered = gateway.chat()
    assert (recovered.status_code, recovered.headers.get("x-asc-credential")) == (200, "emu-eu-1@1")
    assert state_is(gateway, "closed")
    assert len(gateway.emulator.requests()) == 1  # globex's request never reached it


def test_probe_taken_by_a_request_whose_client_left_is_given_back(
        pool_gateway: tuple[Gateway, redis.Redis]) -> None:
    gateway, client = pool_gateway
    open_from_another_replica(gateway, client, 1.5)
    gateway.emulator.queue_fault(delay_ms=5000)  # the provider is slow for the probe

    with pytest.raises(httpx.ReadTimeout):  # the client gives up before response headers
        httpx.post(f"{gateway.base_url}{CHAT}", json=chat_body(),
                   headers={"authorization": f"Bearer {ACME_KEY}"}, timeout=0.5)
    poll(lambda: any(e["aborted"] for e in log_events(gateway, "request finished")))

    recovered = gateway.chat()
    assert (recovered.status_code, recovered.headers.get("x-asc-credential")) == (200, "emu-eu-1@1")
    assert state_is(gateway, "closed")


# -- item 3: a 429 cools a credential down, it never opens it -----------------------------------


def test_three_429s_with_retry_after_do_not_open_the_credential_anywhere(
        pool_gateway: tuple[Gateway, redis.Redis]) -> None:
    gateway, client = pool_gateway
    gateway.emulator.queue_fault(status=429, retry_after=2, count=3)

    answers = [gateway.chat() for _ in range(3)]
    last_429 = time.monotonic()

    assert [(r.status_code, r.json(), r.headers["retry-after"]) for r in answers] == [
        (429, RATE_LIMITED, "2")] * 3
    assert state_is(gateway, "closed")  # before the fix: open after the third
    # Past the cool-down (and so past at least one pool sync, every second): no replica
    # was told to open the credential, and the provider serves again.
    poll(lambda: time.monotonic() > last_429 + 2.0)
    assert client.hgetall(HEALTH_KEY) == {}
    after = gateway.chat()
    assert (after.status_code, after.headers.get("x-asc-credential")) == (200, "emu-eu-1@1")
    assert len(gateway.emulator.requests()) == 1 + 3 + 1


def test_a_429_moves_traffic_to_the_other_credential_until_retry_after(
        stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    base = pool_document(redis_port)

    def two_keys(emulator_port: int) -> dict[str, Any]:
        doc = base(emulator_port)
        doc["credentials"]["emu-eu-2"] = {"env": "TEST_PROVIDER_KEY_US"}  # also accepted
        doc["providers"]["emu-eu"]["credentials"] = ["emu-eu-1", "emu-eu-2"]
        return doc

    gateway = start_gateway(stack, stack.workdir / "config", document=two_keys)
    gateway.emulator.queue_fault(status=429, retry_after=30)
    limited = gateway.chat()
    assert limited.status_code == 429
    other = {"emu-eu-1@1": "emu-eu-2@1", "emu-eu-2@1": "emu-eu-1@1"}[
        limited.headers["x-asc-credential"]]

    # While the rate-limited credential cools down, every request goes to the other one
    # (with two healthy credentials of weight 1, 20 requests all on one would be chance
    # 1 in a million), and neither is open.
    after = [gateway.chat() for _ in range(20)]
    assert {(r.status_code, r.headers.get("x-asc-credential")) for r in after} == {
        (200, other)}
    assert not any(state_is(gateway, "open", f"global/{c}") for c in ("emu-eu-1", "emu-eu-2"))
