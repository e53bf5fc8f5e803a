"""Scenario 2, Sentinel: the Redis master killed (kill -9) under load, Sentinel promotes
the replica, the service follows (`redis.sentinel`).

While no master answers, `fail_closed` requests get the documented 503 JSON; after the
promotion traffic is served by the new master, no hold is left there, and nothing is
spent twice. Redis replicates asynchronously: settles the old master took but had not
yet sent to the replica are lost with it (the figure `sentinel_lost_settles_micro_usd`);
that makes the new master count less than was spent, never more.
"""

from __future__ import annotations

import json
import time

import redis

from extproc.devstack import Stack
from tests.polling import wait_for
from tests.reliability.conftest import (
    SENTINEL_SERVICE,
    Load,
    budget_document,
    figure,
    settled,
    start_replicas,
    start_sentinels,
    tenant_month,
)

UNAVAILABLE = {"error": {
    "message": "The budget service is unavailable; the request was not sent.",
    "type": "service_unavailable", "param": None, "code": "gateway_unavailable"}}
BUDGET = {"budgets": [{"scope": "tenant", "window": "month", "limit_usd": 100}]}


def test_sentinel_failover_under_load_fails_closed_then_follows_the_new_master(
        stack: Stack) -> None:
    sentinels = start_sentinels(stack)
    base = budget_document(sentinels.master_port, hold_ttl_s=2, acme=BUDGET)

    def document(emulator_port: int) -> dict[str, object]:
        doc = base(emulator_port)
        doc["redis"] = {"url": "redis://127.0.0.1:1/0", "sentinel": {  # host unused
            "addresses": [f"127.0.0.1:{p}" for p in sentinels.sentinel_ports],
            "service": SENTINEL_SERVICE}}
        return doc

    fleet = start_replicas(stack, document, redis_port=sentinels.master_port, replicas=1)
    with Load(fleet.base_url, clients=4) as load:
        assert wait_for(lambda: load.count(200) >= 40)
        sentinels.master.kill()
        killed_at = time.monotonic()
        assert wait_for(lambda: sentinels.master_now() == sentinels.replica_port, timeout=30)
        promoted_at = time.monotonic()
        assert wait_for(lambda: any(r.status == 200 and r.started > promoted_at
                                    for r in load.snapshot()), timeout=30)
        back_at = min(r.started for r in load.snapshot()
                      if r.status == 200 and r.started > promoted_at)
        served = load.count(200)
        assert wait_for(lambda: load.count(200) >= served + 40)

    results = load.snapshot()
    refused = [json.loads(r.body) for r in results if r.status == 503]
    assert settled(sentinels.replica_port, timeout=30)
    spent, held = tenant_month(sentinels.replica_port)
    charged = sum(r["charged_micro_usd"] or 0 for r in fleet.records()
                  if r.get("tenant") == "acme")
    figure("sentinel_promotion_s", f"{promoted_at - killed_at:.1f}")
    figure("sentinel_kill_to_first_200_on_new_master_s", f"{back_at - killed_at:.1f}")
    figure("sentinel_fail_closed_503s", len(refused))
    figure("sentinel_lost_settles_micro_usd", charged - spent)
    figure("sentinel_stuck_holds_micro_usd", held)

    assert {r.status for r in results} <= {200, 503}
    assert all(body == UNAVAILABLE for body in refused)
    assert held == 0
    assert charged - spent >= 0  # lost replication undercounts; nothing counted twice
    client = redis.Redis(port=sentinels.replica_port, decode_responses=True)
    try:
        assert client.info("replication")["role"] == "master"
    finally:
        client.close()
