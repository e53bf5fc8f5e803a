"""Scenario 7: kill -9 of replicas mid-load, then the sweeper.

Three replicas, a slow provider (so holds are in flight), two replicas killed with SIGKILL
while clients keep sending. The survivor's sweeper returns the holds of the requests the
dead ones had in flight (hold_ttl_s 2). Then the ledger reconciles with the records:
every reservation is settled, released or expired (none still held), every settled one
has exactly one record charging the same request, and the tenant's `spent` is the sum of
the records' charges. Related: tests/e2e/test_budgets.py (one killed extproc, one hold).
"""

from __future__ import annotations

import collections
from typing import Any

import redis

from extproc.devstack import Stack
from tests.polling import wait_for
from tests.reliability.conftest import (
    Load,
    budget_document,
    figure,
    settled,
    start_replicas,
    tenant_month,
)

BUDGET = {"budgets": [{"scope": "tenant", "window": "month", "limit_usd": 100}]}


def reservations(redis_port: int, tenant: str = "acme") -> dict[str, str]:
    """request id -> state of every reservation record of `tenant`."""
    client = redis.Redis(port=redis_port, decode_responses=True)
    try:
        prefix = f"asc:{{t:{tenant}}}:res:"
        return {key.removeprefix(prefix): str(client.hget(key, "state"))
                for key in client.scan_iter(prefix + "*")}
    finally:
        client.close()


def test_kill9_of_two_replicas_then_the_sweeper_reconciles_the_ledger(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    fleet = start_replicas(stack, budget_document(redis_port, hold_ttl_s=2, acme=BUDGET),
                           redis_port=redis_port, emulator_args=("--latency-ms", "300"))

    with Load(fleet.base_url, clients=6) as load:
        assert wait_for(lambda: load.count(200) >= 30, timeout=60)
        assert wait_for(lambda: tenant_month(redis_port)[1] > 0)  # holds in flight
        fleet.extprocs[0].kill()
        fleet.extprocs[1].kill()
        served_before = load.count(200)
        assert wait_for(lambda: load.count(200) >= served_before + 30, timeout=60)

    assert settled(redis_port, timeout=30)
    spent, held = tenant_month(redis_port)
    states = reservations(redis_port)
    records = [r for r in fleet.records() if r.get("tenant") == "acme"]
    by_id: dict[str, list[dict[str, Any]]] = collections.defaultdict(list)
    for record in records:
        by_id[record["request_id"]].append(record)
    settled_ids = {rid for rid, state in states.items() if state == "settled"}
    expired_ids = {rid for rid, state in states.items() if state == "expired"}
    charged = {rid for rid, rs in by_id.items() if any(r["charged_micro_usd"] for r in rs)}
    counts = collections.Counter(states.values())
    figure("kill9_reservations_by_state", dict(sorted(counts.items())))
    figure("kill9_stuck_holds_micro_usd", held)
    figure("kill9_ledger_minus_records_micro_usd",
           spent - sum(r["charged_micro_usd"] or 0 for r in records))

    statuses = {r.status for r in load.results}
    assert statuses <= {200, 500}
    assert load.count(500) > 0  # the kills did cut requests
    assert held == 0
    assert "held" not in counts
    assert expired_ids  # the sweeper, not a settle, returned the dead replicas' holds
    assert all(len(rs) == 1 for rs in by_id.values())  # one record per request
    assert charged == settled_ids
    assert not expired_ids & set(by_id)  # a swept request died with its replica
    assert spent == sum(r["charged_micro_usd"] or 0 for r in records)
    assert spent > 0
