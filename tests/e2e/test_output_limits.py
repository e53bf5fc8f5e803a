"""Output limits and choices through real Envoy, extproc, emulator and redis-server:
reasoning models get `max_completion_tokens`, and a budget hold covers every choice of a
request with `n` > 1 (or such requests are refused, per `budgets.multiple_choices`)."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

from extproc.auth import hash_key
from extproc.devstack import Stack
from extproc.secrets import Secret
from tests.conftest import (
    ACME_KEY,
    GLOBEX_KEY,
    PATHS,
    PEPPER,
    Gateway,
    chat_body,
    gateway_config,
    start_gateway,
)

# 1 token of input costs 100 micro-USD, 1 token of output 2,000 micro-USD.
PRICE = {"input_per_mtok": 100, "output_per_mtok": 2000}
INITECH_KEY = "sk-canary-tenant-initech-" + secrets.token_hex(8)
BOTH_ZONES = [{"provider": "emu-eu"}, {"provider": "emu-us"}]


def _document(redis_port: int, multiple_choices: str) -> Any:
    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout_ms": 500}
        doc["budgets"] = {"multiple_choices": multiple_choices}
        doc["models"]["gpt-4o-mini"]["price"] = PRICE
        doc["models"].update({
            "o3-mini": {"price": PRICE, "deployments": BOTH_ZONES},
            "gpt-5": {"price": PRICE, "deployments": BOTH_ZONES},
            # Served by a model whose family takes max_tokens, configured otherwise.
            "house-model": {"price": PRICE, "output_limit_field": "max_completion_tokens",
                            "deployments": [{"provider": "emu-eu", "model": "gpt-4o"},
                                            {"provider": "emu-us", "model": "gpt-4o"}]},
        })
        models = ["gpt-4o-mini", "o3-mini", "gpt-5", "house-model"]
        monthly = [{"scope": "tenant", "window": "month", "limit_usd": 1}]
        # Room for a 4,096-token hold (8.2 USD at this price).
        doc["tenants"]["acme"].update(models=models, budgets=[
            {"scope": "tenant", "window": "month", "limit_usd": 100}])
        doc["tenants"]["globex"]["models"] = models
        doc["tenants"]["initech"] = {
            "zone": "eu", "models": models, "budgets": monthly,
            "keys": [{"id": "initech-main", "hash": hash_key(Secret(PEPPER), INITECH_KEY)}]}
        return doc
    return document


def _gateway(tmp_path_factory: pytest.TempPathFactory, mode: str,
             path: str) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp(f"limits-{mode}-{path}")
    with Stack(workdir) as stack:
        _, redis_port = stack.start_redis()
        yield start_gateway(stack, workdir / "config", document=_document(redis_port, mode),
                            path=path)


# Both on each request path: budget tenants' requests with max_tokens take the fast path.
@pytest.fixture(scope="module", params=PATHS)
def hold_all(tmp_path_factory: pytest.TempPathFactory,
             request: pytest.FixtureRequest) -> Iterator[Gateway]:
    yield from _gateway(tmp_path_factory, "hold_all", request.param)


@pytest.fixture(scope="module", params=PATHS)
def refuse(tmp_path_factory: pytest.TempPathFactory,
           request: pytest.FixtureRequest) -> Iterator[Gateway]:
    yield from _gateway(tmp_path_factory, "refuse", request.param)


def _limit_fields(gateway: Gateway) -> dict[str, int]:
    seen = gateway.emulator.requests()[-1]
    body = json.loads(seen["body"])
    return {name: body[name] for name in ("max_tokens", "max_completion_tokens") if name in body}


@pytest.mark.parametrize("model", ["o3-mini", "gpt-5"])
def test_reasoning_model_gets_max_completion_tokens(hold_all: Gateway, model: str) -> None:
    # A client's max_tokens, as older SDK code sends it (no budget: globex).
    response = hold_all.chat(chat_body(model, max_tokens=5), key=GLOBEX_KEY)
    assert response.status_code == 200
    assert _limit_fields(hold_all) == {"max_completion_tokens": 5}
    # No limit from the client, a budget tenant: the gateway's own bound, same field.
    response = hold_all.chat(chat_body(model), key=ACME_KEY)
    assert response.status_code == 200
    assert _limit_fields(hold_all) == {"max_completion_tokens": 4096}


def test_configured_output_limit_field_is_used(hold_all: Gateway) -> None:
    response = hold_all.chat(chat_body("house-model", max_tokens=7), key=GLOBEX_KEY)
    assert response.status_code == 200
    assert _limit_fields(hold_all) == {"max_completion_tokens": 7}
    response = hold_all.chat(chat_body("gpt-4o-mini", max_tokens=7), key=GLOBEX_KEY)
    assert _limit_fields(hold_all) == {"max_tokens": 7}


def test_hold_covers_every_choice(hold_all: Gateway) -> None:
    body = chat_body("gpt-4o-mini", max_tokens=8, n=3)
    payload = json.dumps(body).encode()
    response = hold_all.chat(payload, key=INITECH_KEY)

    assert response.status_code == 200
    input_estimate = -(-len(payload) // 3)
    hold = input_estimate * 100 + 3 * 8 * 2000  # three choices of up to 8 tokens each
    assert response.headers["x-asc-budget-remaining-usd"] == f"{(1_000_000 - hold) / 1e6:.6f}"
    assert json.loads(hold_all.emulator.requests()[-1]["body"])["n"] == 3


def test_refuse_mode_refuses_n_above_one_for_budget_tenants_only(refuse: Gateway) -> None:
    refuse.emulator.clear()
    refused = refuse.chat(chat_body("gpt-4o-mini", max_tokens=8, n=2), key=ACME_KEY)

    assert refused.status_code == 400
    assert refused.json() == {"error": {
        "message": "Requests with 'n' greater than 1 are not allowed for keys with a budget.",
        "type": "invalid_request_error", "param": "n", "code": "invalid_request"}}
    assert refuse.emulator.requests() == []
    assert refuse.chat(chat_body("gpt-4o-mini", max_tokens=8, n=2),
                       key=GLOBEX_KEY).status_code == 200
    assert refuse.chat(chat_body("gpt-4o-mini", max_tokens=8, n=1),
                       key=ACME_KEY).status_code == 200
