"""Scenario 12: one tenant's traffic never makes another's requests fail.

One replica (the hard case: both tenants share one event loop, one Redis pool and one
ledger gate). acme exhausts its budget and RPM (429s), sends broken bodies (400s) and
bursts of 200 requests at once; globex keeps calling meanwhile and every one of its
requests is answered 200. Related: tests/e2e/test_budget_burst.py (bursts never 503).
"""

from __future__ import annotations

import collections
import json

from extproc.devstack import Stack
from tests.conftest import ACME_KEY, GLOBEX_KEY
from tests.reliability.conftest import Load, budget_document, burst, figure, start_replicas

BURSTS = 2
IN_FLIGHT = 200


def test_one_tenants_429s_4xx_and_bursts_never_fail_another_tenant(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    fleet = start_replicas(stack, budget_document(
        redis_port,
        acme={"budgets": [{"scope": "tenant", "window": "month", "limit_usd": 0.1}],
              "rate_limits": {"rpm": 50}},
        globex={"budgets": [{"scope": "tenant", "window": "month", "limit_usd": 1000}]}),
        redis_port=redis_port, replicas=1)

    noisy: collections.Counter[int] = collections.Counter()
    with Load(fleet.base_url, clients=2, key=GLOBEX_KEY) as victim, \
            Load(fleet.base_url, clients=2, key=ACME_KEY,
                 body={"model": "gpt-4o-mini", "messages": "not a list"}) as broken, \
            Load(fleet.base_url, clients=2, key=ACME_KEY) as over_budget:
        for _ in range(BURSTS):
            noisy.update(o.status for o in burst(fleet.base_url, IN_FLIGHT))
    noisy.update(r.status for r in broken.results)
    noisy.update(r.status for r in over_budget.results)
    victims = collections.Counter(r.status for r in victim.results)
    figure("isolation_other_tenant_failures", f"{victims.total() - victims[200]}"
           f"/{victims.total()}")
    figure("isolation_noisy_tenant_statuses", dict(sorted(noisy.items())))

    assert set(victims) == {200}
    assert victims[200] > 20
    assert set(noisy) == {200, 400, 429}
    assert noisy[429] > noisy[200]
    refused = json.loads(next(r.body for r in broken.results))["error"]
    assert refused["type"] == "invalid_request_error"
