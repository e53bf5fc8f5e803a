"""Which headers cross the gateway, through real Envoy, extproc, emulator and Redis.

Client -> provider: only the allow-list of the provider's kind plus its
`forward_headers`. Provider -> client: nothing naming the shared provider account
(`openai-organization`, `openai-project`, its `x-ratelimit-*`), while the gateway's own
`x-ratelimit-*` budget headers do reach the client.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from extproc.devstack import Stack
from extproc.emulator.app import OPENAI_ACCOUNT_HEADERS
from tests.conftest import (
    ACME_KEY,
    GLOBEX_KEY,
    PATHS,
    Emulator,
    Gateway,
    chat_body,
    gateway_config,
    start_gateway,
)

HOSTILE_HEADERS = {
    "x-emulator-status": "500",          # a test hook of the emulator
    "x-emulator-delay-ms": "60000",
    "anthropic-beta": "computer-use-2025-01-24",
    "openai-beta": "assistants=v2",
    "x-forwarded-for": "10.9.9.9",
    "x-envoy-foo": "1",
    "x-upstream-gateway-auth": "whatever",
    "user-agent": "OpenAI/Python 1.0",
    "x-stainless-os": "Linux",
    "x-trace-id": "trace-1",
    "accept": "application/json",
}
# What Envoy itself adds or keeps on the way up (host rewrite, route timeout, attempt
# count, its request id and x-forwarded-proto), plus the gateway's own auth and length.
ENVOY_AND_GATEWAY = {
    "host", "x-envoy-attempt-count", "x-envoy-expected-rq-timeout-ms",
    "x-envoy-original-host", "x-forwarded-proto", "x-request-id",
    "authorization", "content-length",
}
ACCOUNT_HEADERS = set(OPENAI_ACCOUNT_HEADERS)


def test_only_allowed_client_headers_reach_the_provider(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    response = gateway.chat(chat_body(), headers=HOSTILE_HEADERS)

    assert response.status_code == 200  # the x-emulator-status hook never arrived
    [seen] = emulator_clean.requests()
    assert set(seen["headers"]) == {"accept", "content-type"} | ENVOY_AND_GATEWAY
    assert not ACCOUNT_HEADERS & set(response.headers)
    assert not [name for name in response.headers if "ratelimit" in name]


def test_provider_error_answers_do_not_name_the_account(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    emulator_clean.queue_fault(status=429)
    response = gateway.chat(chat_body(), key=GLOBEX_KEY)

    assert response.status_code == 429
    assert response.json()["error"]["message"] == (
        "The provider's rate limit was reached; retry later.")
    assert "org-" not in response.text
    assert not ACCOUNT_HEADERS & set(response.headers)


def _document(redis_port: int) -> Any:
    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0", "timeout_ms": 500}
        doc["providers"]["emu-eu"]["forward_headers"] = ["x-trace-id", "anthropic-beta"]
        doc["tenants"]["acme"]["rate_limits"] = {"rpm": 100}
        return doc
    return document


@pytest.fixture(scope="module", params=PATHS)
def budget_gateway(tmp_path_factory: pytest.TempPathFactory,
                   request: pytest.FixtureRequest) -> Iterator[Gateway]:
    """On each request path: its requests with max_tokens take the fast one."""
    workdir = tmp_path_factory.mktemp(f"provider-headers-{request.param}")
    with Stack(workdir) as stack:
        _, redis_port = stack.start_redis()
        yield start_gateway(stack, workdir / "config", document=_document(redis_port),
                            path=request.param)


def test_forward_headers_extend_the_allow_list_of_one_provider(
    budget_gateway: Gateway,
) -> None:
    budget_gateway.emulator.clear()
    acme = budget_gateway.chat(chat_body(), headers=HOSTILE_HEADERS)       # emu-eu
    globex = budget_gateway.chat(chat_body(), key=GLOBEX_KEY, headers=HOSTILE_HEADERS)

    assert (acme.status_code, globex.status_code) == (200, 200)
    eu, us = budget_gateway.emulator.requests()
    assert set(eu["headers"]) == ({"accept", "content-type", "x-trace-id", "anthropic-beta"}
                                  | ENVOY_AND_GATEWAY)
    assert (eu["headers"]["x-trace-id"], eu["headers"]["anthropic-beta"]) == (
        "trace-1", "computer-use-2025-01-24")
    assert set(us["headers"]) == {"accept", "content-type"} | ENVOY_AND_GATEWAY


def test_gateway_rate_limit_headers_replace_the_provider_account_ones(
    budget_gateway: Gateway,
) -> None:
    first = budget_gateway.chat(chat_body(), key=ACME_KEY)
    second = budget_gateway.chat(chat_body(), key=ACME_KEY)

    for response in (first, second):
        assert response.status_code == 200
        # The emulator sent 5000 / 4999 and token limits for the shared account.
        assert "x-ratelimit-limit-tokens" not in response.headers
        assert "x-ratelimit-reset-requests" not in response.headers
        assert not {"openai-organization", "openai-project"} & set(response.headers)
        assert response.headers["x-ratelimit-limit-requests"] == "100"
    remaining = [int(r.headers["x-ratelimit-remaining-requests"]) for r in (first, second)]
    assert remaining[1] == remaining[0] - 1
