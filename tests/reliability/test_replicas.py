"""Scenario 3: limits hold globally across replicas (LiteLLM #40291: limits that multiply
with replicas). Three extproc processes behind one Envoy share one Redis; 200 requests in
flight at once against one tenant's budget, then against one tenant's RPM."""

from __future__ import annotations

import collections
import json

from extproc.devstack import Stack
from tests.conftest import GLOBEX_KEY, chat_body
from tests.polling import wait_for
from tests.reliability.conftest import (
    CALL_COST,
    REPLICAS,
    Sampler,
    budget_document,
    burst,
    figure,
    settled,
    start_replicas,
    tenant_month,
)

IN_FLIGHT = 200
LIMIT_MICRO_USD = 500_000
RPM = 40


def test_three_replicas_hold_one_budget_and_one_rpm_globally(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    fleet = start_replicas(stack, budget_document(
        redis_port,
        acme={"budgets": [{"scope": "tenant", "window": "month", "limit_usd": 0.5}]},
        globex={"rate_limits": {"rpm": RPM}}), redis_port=redis_port)

    with Sampler(redis_port) as sampler:
        budget = burst(fleet.base_url, IN_FLIGHT)
    rpm = burst(fleet.base_url, IN_FLIGHT, key=GLOBEX_KEY, body=chat_body(max_tokens=8))

    budget_statuses = collections.Counter(o.status for o in budget)
    rpm_statuses = collections.Counter(o.status for o in rpm)
    assert settled(redis_port)
    spent, held = tenant_month(redis_port)
    served_by = collections.Counter(r["replica"] for r in fleet.records())
    figure("replicas_budget_overspend_micro_usd", max(0, spent - LIMIT_MICRO_USD))
    figure("replicas_budget_peak_spent_plus_held_micro_usd",
           f"{sampler.peak}/{LIMIT_MICRO_USD} ({sampler.samples} samples)")
    figure("replicas_rpm_admitted", f"{rpm_statuses[200]}/{RPM}")
    figure("replicas_records_per_process", sorted(served_by.values()))

    # Budget: every answer is a 200 or the budget's 429; never more spent than the limit,
    # at any sampled moment either; each 200 charged once.
    assert set(budget_statuses) == {200, 429}
    assert held == 0
    assert spent == CALL_COST * budget_statuses[200] <= LIMIT_MICRO_USD
    assert sampler.peak <= LIMIT_MICRO_USD
    assert sampler.samples > 10
    # RPM: counted once per request across replicas, so exactly RPM pass, not 3 x RPM.
    assert rpm_statuses == {200: RPM, 429: IN_FLIGHT - RPM}
    refused = next(o for o in rpm if o.status == 429)
    assert json.loads(refused.body)["error"]["code"] == "rate_limited"
    assert int(refused.headers["retry-after"]) > 0
    # Every replica served: the limits were really enforced by several processes.
    assert len(served_by) == REPLICAS
    # Exactly one record per request.
    assert wait_for(lambda: len(fleet.records()) == 2 * IN_FLIGHT)
