"""Teams inside a tenant, through real Envoy, extproc, emulator and redis-server: a team's
budget is one more scope of the same all-or-nothing reservation as the tenant's."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.devstack import Stack
from tests.conftest import ACME_KEY, ACME_KEY_2, chat_body, start_gateway
from tests.e2e.test_budgets import PRICE, budget_config, ledger_state
from tests.polling import wait_for

pytestmark = pytest.mark.timeout(120)

TEAM_LIMIT_USD = 0.03
TENANT_LIMIT_USD = 0.05
TEAM_COUNTER = "asc:{t:acme}:b:tenant:acme:team:billing:d"
TENANT_COUNTER = "asc:{t:acme}:b:tenant:acme:m"


def teams_document(redis_port: int) -> Any:
    """acme: key acme-main in team billing (0.03 USD a day, gpt-4o-mini only), key
    acme-second in team research (no budget or model list of its own), the tenant 0.05 USD
    a month."""
    base = budget_config(redis_port,
                         budgets=[{"scope": "tenant", "window": "month",
                                   "limit_usd": TENANT_LIMIT_USD}],
                         teams={"billing": {"budgets": [{"window": "day",
                                                         "limit_usd": TEAM_LIMIT_USD}]},
                                "research": {}})

    def document(emulator_port: int) -> dict[str, Any]:
        doc: dict[str, Any] = base(emulator_port)
        doc["models"]["gpt-4o-eu"] = {"price": PRICE,
                                      "deployments": [{"provider": "emu-eu", "model": "gpt-4o"}]}
        acme = doc["tenants"]["acme"]
        acme["models"] = ["gpt-4o-mini", "gpt-4o-eu"]
        acme["teams"]["billing"]["models"] = ["gpt-4o-mini"]
        main, second = acme["keys"]
        main["team"], second["team"] = "billing", "research"
        return doc
    return document


def counters(redis_port: int) -> dict[str, tuple[int, int]]:
    """(spent, held) of the team and tenant counters, by prefix."""
    state = ledger_state(redis_port)
    return {prefix: next((v for k, v in state.items() if k.startswith(prefix)), (0, 0))
            for prefix in (TEAM_COUNTER, TENANT_COUNTER)}


def settled(redis_port: int) -> bool:
    return all(held == 0 for _, held in counters(redis_port).values())


def test_team_budget_denies_only_its_team_and_reserves_nothing_elsewhere(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    gateway = start_gateway(stack, stack.workdir / "config",
                            document=teams_document(redis_port))

    billing = [gateway.chat(chat_body(max_tokens=8), key=ACME_KEY) for _ in range(2)]
    assert [r.status_code for r in billing] == [200, 200]
    assert wait_for(lambda: settled(redis_port))
    before = counters(redis_port)
    assert before[TEAM_COUNTER] == before[TENANT_COUNTER]  # both scopes of one reservation
    assert before[TEAM_COUNTER][0] > 0

    refused = gateway.chat(chat_body(max_tokens=8), key=ACME_KEY)
    assert refused.status_code == 429
    assert refused.json()["error"]["message"] == (
        "Request refused: it would exceed the team 'billing' daily budget "
        f"(limit USD {TEAM_LIMIT_USD}).")
    # All-or-nothing: the team's denial held nothing on the tenant's counter either.
    assert counters(redis_port) == before

    # The other team is not limited by billing's budget...
    research = gateway.chat(chat_body(max_tokens=8), key=ACME_KEY_2)
    assert research.status_code == 200, research.text
    assert wait_for(lambda: settled(redis_port))
    after_research = counters(redis_port)
    assert after_research[TEAM_COUNTER] == before[TEAM_COUNTER]  # not billing's money
    assert after_research[TENANT_COUNTER][0] > before[TENANT_COUNTER][0]

    # ...but the tenant's scope still holds for every team.
    statuses = []
    for _ in range(4):
        statuses.append(gateway.chat(chat_body(max_tokens=8), key=ACME_KEY_2))
        assert wait_for(lambda: settled(redis_port))
    codes = [r.status_code for r in statuses]
    assert codes == [200, 429, 429, 429], codes
    denied = statuses[codes.index(429)]
    assert denied.json()["error"]["message"] == (
        "Request refused: it would exceed the tenant monthly budget "
        f"(limit USD {TENANT_LIMIT_USD}).")
    spent, held = counters(redis_port)[TENANT_COUNTER]
    assert (spent <= TENANT_LIMIT_USD * 1_000_000, held) == (True, 0)
    assert counters(redis_port)[TEAM_COUNTER] == before[TEAM_COUNTER]


def test_team_models_narrow_the_tenants(stack: Stack) -> None:
    _, redis_port = stack.start_redis()
    gateway = start_gateway(stack, stack.workdir / "config",
                            document=teams_document(redis_port))

    refused = gateway.chat(chat_body("gpt-4o-eu", max_tokens=8), key=ACME_KEY)
    assert refused.status_code == 403
    assert refused.json()["error"] == {
        "message": "Your key is not allowed to use the model 'gpt-4o-eu'.",
        "type": "permission_error", "param": "model", "code": "model_not_allowed"}
    assert gateway.emulator.requests() == []
    served = gateway.chat(chat_body("gpt-4o-eu", max_tokens=8), key=ACME_KEY_2)
    assert served.status_code == 200, served.text
    (seen,) = gateway.emulator.requests()
    assert json.loads(seen["body"])["model"] == "gpt-4o"
