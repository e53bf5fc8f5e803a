"""The fast path through real Envoy, extproc, emulator and redis-server: one ext_proc
message per same-dialect request, settle and record from Envoy's access log, and the
invariants that must hold on it (docs/fast-path.md)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio

from extproc.budgets.ledger import RedisLedger
from extproc.devstack import Stack
from extproc.emulator.app import OPENAI_ACCOUNT_HEADERS
from tests.conftest import (
    ACME_KEY,
    CANARIES,
    GLOBEX_KEY,
    PROVIDER_KEY_EU,
    PROVIDER_KEY_US,
    Gateway,
    chat_body,
    gateway_config,
    provider_fingerprint,
    start_gateway,
)
from tests.e2e.audit_check import assert_one_record
from tests.e2e.test_budgets import PRICE, month_counter
from tests.e2e.test_guardrails import assert_the_strict_route_denies_an_email, strict_route
from tests.e2e.test_request_path import assert_envoys_reset_reply
from tests.polling import wait_for

HOLD_TTL_S = 1


def fast_config(redis_port: int, *, flush_interval_ms: int = 20,
                **fast_path: Any) -> Any:
    """The tests' config with budgets on acme, the EU deployment under the model's own
    name (a renamed model needs its body rewritten: full path) and the fast path on."""

    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
        doc["budgets"] = {"hold_ttl_s": HOLD_TTL_S}
        model = doc["models"]["gpt-4o-mini"]
        model["price"] = PRICE
        model["deployments"] = [{"provider": "emu-us"}, {"provider": "emu-eu"}]
        doc["tenants"]["acme"]["budgets"] = [
            {"scope": "tenant", "window": "month", "limit_usd": 100}]
        doc["providers"]["emu-claude"] = {
            "kind": "anthropic", "base_url": f"http://127.0.0.1:{emulator_port}",
            "region": "eu-central-1", "zone": "eu", "cluster": "emu_claude",
            "credentials": ["emu-eu-1"]}
        doc["models"]["claude-x"] = {"price": PRICE, "deployments": [{"provider": "emu-claude"}]}
        doc["tenants"]["acme"]["models"].append("claude-x")
        doc["fast_path"] = {"enabled": True, "flush_interval_ms": flush_interval_ms,
                            **fast_path}
        return doc

    return document


@pytest.fixture(scope="module")
def fast(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, int]]:
    workdir = tmp_path_factory.mktemp("fast")
    with Stack(workdir) as stack:
        _, redis_port = stack.start_redis()
        yield start_gateway(stack, workdir / "config", document=fast_config(redis_port)), \
            redis_port


def phase_count(gateway: Gateway, phase: str) -> int:
    found = re.search(rf'^asc_extproc_phase_seconds_count\{{phase="{phase}"\}} (\S+)$',
                      gateway.metrics(), re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def door_checks(gateway: Gateway, outcome: str) -> int:
    found = re.search(rf'^asc_fast_door_checks_total\{{outcome="{outcome}"\}} (\S+)$',
                      gateway.metrics(), re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def records(gateway: Gateway, request_id: str) -> list[dict[str, Any]]:
    found = []
    for process in gateway.stack.processes:
        if process.name.startswith("extproc"):
            for line in process.log_text().splitlines():
                with contextlib.suppress(ValueError):
                    event = json.loads(line)
                    if (event.get("msg") == "request finished"
                            and event.get("request_id") == request_id):
                        found.append(event)
    return found


def cost_micro_usd(usage: dict[str, int]) -> int:
    # PRICE: 100 USD / Mtok input, 2000 USD / Mtok output -> 100 and 2000 micro-USD a token.
    return usage["prompt_tokens"] * 100 + usage["completion_tokens"] * 2000


def test_plain_request_is_one_message_and_settles_from_the_access_log(
        fast: tuple[Gateway, int]) -> None:
    gateway, redis_port = fast
    gateway.emulator.clear()
    spent_before, _ = month_counter(redis_port) if _has_counter(redis_port) else (0, 0)
    bodies_before = phase_count(gateway, "request_body")
    answers_before = phase_count(gateway, "response_headers")
    streams_before = phase_count(gateway, "request_headers")
    fast_before = door_checks(gateway, "fast")

    response = gateway.chat(chat_body(max_tokens=8),
                            headers={"x-api-key": "sk-client-extra", "x-asc-cluster": "emu_us",
                                     "openai-organization": "org-client"})

    assert response.status_code == 200
    usage = response.json()["usage"]
    request_id = response.headers["x-asc-request-id"]
    assert len(request_id) == 32
    # The x-asc-* headers the service knows when it replies, put on by Envoy.
    assert response.headers["x-asc-provider"] == "emu-eu"
    assert response.headers["x-asc-region"] == "eu-west-1"
    assert response.headers["x-asc-credential"] == "emu-eu-1@1"
    assert "x-asc-budget-remaining-usd" in response.headers
    assert "x-asc-cost-usd" not in response.headers  # known only after the answer
    for name in OPENAI_ACCOUNT_HEADERS:
        assert name not in response.headers
    # Residency (acme is eu) and key injection; client credentials and x-asc-* stripped.
    [upstream] = gateway.emulator.requests()
    assert upstream["headers"]["authorization"] == (
        f"Bearer {provider_fingerprint(PROVIDER_KEY_EU)}")
    assert not {"x-api-key", "x-asc-cluster", "openai-organization"} & set(upstream["headers"])
    assert json.loads(upstream["body"]) == chat_body(max_tokens=8)  # as the client sent it
    # Decided by the fast door alone: not one ext_proc message (docs/decisions/0124).
    assert phase_count(gateway, "request_headers") == streams_before
    assert phase_count(gateway, "request_body") == bodies_before
    assert phase_count(gateway, "response_headers") == answers_before
    assert door_checks(gateway, "fast") == fast_before + 1
    # Settled at the real usage, from Envoy's access log; exactly one record.
    cost = cost_micro_usd(usage)
    assert wait_for(lambda: month_counter(redis_port) == (spent_before + cost, 0))
    assert wait_for(lambda: len(records(gateway, request_id)) == 1)
    assert grpc_logs_written(gateway) >= 1  # the stat the door-off test reads
    [record] = records(gateway, request_id)
    assert record["status"] == 200
    assert record["charged_micro_usd"] == cost
    assert record["prompt_tokens"] == usage["prompt_tokens"]
    assert record["completion_tokens"] == usage["completion_tokens"]
    assert record["provider"] == "emu-eu"
    assert record["credential"] == "emu-eu-1@1"
    assert record["aborted"] is False
    # ... and exactly one audit record, through the same finish().
    assert_one_record(gateway, request_id, tenant="acme", endpoint="chat",
                      front_door="openai", route__provider="emu-eu",
                      credential="emu-eu-1@1", status=200, upstream_status=200,
                      tokens__input=usage["prompt_tokens"],
                      tokens__output=usage["completion_tokens"],
                      charged_micro_usd=cost, budget__settled=True,
                      principal__subject="acme-main", principal__source="virtual_key")


def test_two_hundred_concurrent_requests_at_the_door_never_overspend(stack: Stack) -> None:
    """tests/e2e/test_budgets.py's overspend test, decided by the door: 50 clients, a
    1 USD budget; what is charged is what the answers' usage costs, never more."""
    _, redis_port = stack.start_redis()
    fast_document = fast_config(redis_port)

    def document(emulator_port: int) -> dict[str, Any]:
        doc = fast_document(emulator_port)
        doc["tenants"]["acme"]["budgets"] = [
            {"scope": "tenant", "window": "month", "limit_usd": 1}]
        return doc

    gateway = start_gateway(stack, stack.workdir / "config", document=document)
    fast_before = door_checks(gateway, "fast")
    local = threading.local()  # one HTTP client per thread (httpcore's pool is not shared)

    def call(_: int) -> httpx.Response:
        if not hasattr(local, "client"):
            local.client = httpx.Client(base_url=gateway.base_url, timeout=30)
        return local.client.post("/v1/chat/completions", json=chat_body(max_tokens=8),
                                 headers={"authorization": f"Bearer {ACME_KEY}"})

    with ThreadPoolExecutor(max_workers=50) as pool:
        responses = list(pool.map(call, range(200)))

    assert sorted({r.status_code for r in responses}) == [200, 429]
    ok = [r for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(ok) >= 100  # the budget was used, not refused wholesale
    assert door_checks(gateway, "fast") == fast_before + len(ok)
    assert phase_count(gateway, "request_body") == 0  # no request took ext_proc
    # Settles come from Envoy's access log: every hold is settled, none is left.
    assert wait_for(lambda: month_counter(redis_port)[1] == 0)
    spent, held = month_counter(redis_port)
    charged = sum(cost_micro_usd(r.json()["usage"]) for r in ok)
    assert held == 0
    assert spent == charged <= 1_000_000
    assert refused[0].json() == {"error": {
        "message": "Request refused: it would exceed the tenant monthly budget "
                   "(limit USD 1.00).",
        "type": "rate_limit_error", "param": None, "code": "rate_limited"}}
    assert_one_record(gateway, refused[0].headers["x-asc-request-id"], tenant="acme",
                      status=429, error="rate_limited", charged_micro_usd=None)
    assert_one_record(gateway, ok[0].headers["x-asc-request-id"], tenant="acme", status=200,
                      budget__mode="redis", budget__settled=True,
                      charged_micro_usd=cost_micro_usd(ok[0].json()["usage"]))


def _has_counter(redis_port: int) -> bool:
    client = redis.Redis(port=redis_port)
    try:
        return any(True for _ in client.scan_iter("asc:{t:acme}:b:tenant:acme:m*"))
    finally:
        client.close()


def test_streamed_request_sends_no_chunk_to_the_service(fast: tuple[Gateway, int]) -> None:
    gateway, redis_port = fast
    gateway.chat(chat_body(max_tokens=8))  # the counter exists from here on
    assert wait_for(lambda: month_counter(redis_port)[1] == 0)
    spent_before, _ = month_counter(redis_port)
    chunks_before = phase_count(gateway, "response_body")

    response = gateway.chat(chat_body(max_tokens=8, stream=True,
                                      stream_options={"include_usage": True}))

    assert response.status_code == 200
    events = [line[len("data: "):] for line in response.text.splitlines()
              if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert len(events) > 3
    assert phase_count(gateway, "response_body") == chunks_before
    cost = cost_micro_usd(usage)
    assert wait_for(lambda: month_counter(redis_port) == (spent_before + cost, 0))
    request_id = response.headers["x-asc-request-id"]
    assert wait_for(lambda: len(records(gateway, request_id)) == 1)
    assert records(gateway, request_id)[0]["stream"] is True


def test_a_stream_without_usage_keeps_the_full_path(fast: tuple[Gateway, int]) -> None:
    gateway, _ = fast
    chunks_before = phase_count(gateway, "response_body")

    response = gateway.chat(chat_body(max_tokens=8, stream=True))

    assert response.status_code == 200
    # The full path asked the provider for usage and removed that chunk again.
    assert '"usage"' not in response.text
    assert phase_count(gateway, "response_body") > chunks_before


def test_residency_and_refusals_read_as_on_the_full_path(fast: tuple[Gateway, int]) -> None:
    gateway, _ = fast
    gateway.emulator.clear()

    us = gateway.chat(chat_body(max_tokens=8), key=GLOBEX_KEY)
    too_many = gateway.chat(chat_body(max_tokens=2_000_000))
    unknown = gateway.chat(chat_body(model="gpt-9"))
    no_key = gateway.chat(chat_body(max_tokens=8), key=None)

    assert us.status_code == 200
    assert us.headers["x-asc-region"] == "us-east-1"
    [upstream] = gateway.emulator.requests()
    assert upstream["headers"]["authorization"] == (
        f"Bearer {provider_fingerprint(PROVIDER_KEY_US)}")
    assert too_many.status_code == 400
    assert too_many.json()["error"]["param"] == "max_tokens"
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert no_key.status_code == 401
    log_text = "".join(p.log_text() for p in gateway.stack.processes)
    for canary in CANARIES:
        assert canary not in log_text
        assert canary not in us.text


def test_a_lost_access_log_charges_the_whole_hold_and_fails_closed(
        stack: Stack) -> None:
    """Envoy holds the entry (10 s flush) when extproc dies: the hold is never settled,
    and the sweep charges it in full instead of returning it."""
    _, redis_port = stack.start_redis()
    gateway = start_gateway(stack, stack.workdir / "config",
                            document=fast_config(redis_port, flush_interval_ms=10_000))
    response = gateway.chat(chat_body(max_tokens=8))
    assert response.status_code == 200
    spent, held = month_counter(redis_port)
    assert (spent, held) == (0, held)
    assert held > cost_micro_usd(response.json()["usage"])

    gateway.extproc.stop(sig=signal.SIGKILL)
    refused = gateway.chat(chat_body(max_tokens=8))
    assert refused.status_code == 500  # fail closed: no service, no provider call
    assert len(gateway.emulator.requests()) == 1

    async def sweep() -> int:  # what the (dead) service's sweeper would run
        client = redis.asyncio.Redis(port=redis_port)
        try:
            return await RedisLedger(client, hold_ttl_s=HOLD_TTL_S).sweep("{t:acme}")
        finally:
            await client.aclose()

    assert wait_for(lambda: asyncio.run(sweep()) == 1, timeout=HOLD_TTL_S + 5)
    assert month_counter(redis_port) == (held, 0)


def test_anthropic_door_to_anthropic_is_one_message_plain_and_streamed(
        fast: tuple[Gateway, int]) -> None:
    gateway, redis_port = fast
    gateway.chat(chat_body(max_tokens=8))
    assert wait_for(lambda: month_counter(redis_port)[1] == 0)
    spent_before, _ = month_counter(redis_port)
    before = {p: phase_count(gateway, p) for p in ("request_body", "response_body")}
    gateway.emulator.clear()
    body = {"model": "claude-x", "max_tokens": 8,
            "messages": [{"role": "user", "content": "Hello there"}]}
    headers = {"x-api-key": ACME_KEY, "anthropic-version": "2023-06-01"}

    plain = gateway.client.post("/v1/messages", json=body, headers=headers)
    streamed = gateway.client.post("/v1/messages", json={**body, "stream": True},
                                   headers=headers)

    assert plain.status_code == 200
    assert plain.headers["x-asc-provider"] == "emu-claude"
    assert streamed.status_code == 200
    assert "event: message_stop" in streamed.text
    # The emulator names its account (anthropic-organization-id, anthropic-ratelimit-*):
    # Envoy's asc.fast_answer_headers removes it from both answers (decision 0143).
    for answer in (plain, streamed):
        assert [name for name in answer.headers
                if name.startswith("anthropic-")] == []
    assert {p: phase_count(gateway, p) for p in before} == before
    for upstream in gateway.emulator.requests():
        assert upstream["path"] == "/v1/messages"
        assert upstream["headers"]["x-api-key"] == provider_fingerprint(PROVIDER_KEY_EU)
    usage = plain.json()["usage"]
    plain_cost = usage["input_tokens"] * 100 + usage["output_tokens"] * 2000
    final = [json.loads(line[len("data: "):]) for line in streamed.text.splitlines()
             if line.startswith("data: ")]
    started = next(e for e in final if e["type"] == "message_start")["message"]["usage"]
    ended = [e for e in final if e["type"] == "message_delta"][-1]["usage"]
    streamed_cost = started["input_tokens"] * 100 + ended["output_tokens"] * 2000
    assert wait_for(lambda: month_counter(redis_port) == (
        spent_before + plain_cost + streamed_cost, 0))


@pytest.mark.parametrize(("status", "html", "client_status", "client_type", "message"), [
    # A 429 never shows the provider's text (its account, limits and figures).
    (429, False, 429, "rate_limit_error",
     "The provider's rate limit was reached; retry later."),
    # An HTML page (a proxy's): nothing of it reaches the client.
    (503, True, 502, "api_error", "The provider failed with status 503."),
])
def test_a_provider_error_on_the_fast_path_reads_as_on_the_full_path(
        fast: tuple[Gateway, int], status: int, html: bool, client_status: int,
        client_type: str, message: str) -> None:
    gateway, redis_port = fast
    gateway.emulator.clear()
    gateway.emulator.queue_fault(status=status, html=html, retry_after=7,
                                 message="Limit 3, Used 3 for org-emulat0r5hared4cc0unt")
    headers = {"x-api-key": ACME_KEY, "anthropic-version": "2023-06-01"}

    response = gateway.client.post("/v1/messages", headers=headers, json={
        "model": "claude-x", "max_tokens": 8,
        "messages": [{"role": "user", "content": "Hello there"}]})

    assert response.status_code == client_status
    assert response.json() == {"type": "error",
                               "error": {"type": client_type, "message": message}}
    assert response.headers["content-type"] == "application/json"
    assert response.headers["retry-after"] == "7"
    assert response.headers["x-asc-provider"] == "emu-claude"
    assert len(gateway.emulator.requests()) == 1
    # Decided at the door: no ext_proc message, one record with both statuses.
    assert_one_record(gateway, response.headers["x-asc-request-id"], tenant="acme",
                      status=client_status, upstream_status=status)
    assert wait_for(lambda: month_counter(redis_port)[1] == 0)  # the hold went back


LEAKY_STREAM_ERROR = "Overloaded for org proj_AbCd1234xyz: Used 9990"
FIXED = "The provider failed while streaming."
_OPENAI_HEAD = 'data: {"error": {"message": "'
_ANTHROPIC_HEAD = ('event: error\ndata: {"type": "error", "error": '
                   '{"type": "overloaded_error", "message": "')


# The full path shows the provider's message scrubbed (test_providers); Envoy's Lua filter
# cannot wait for the door inside a stream, so the fast path puts a fixed message in its
# place and keeps the provider's type (decision 0138).
@pytest.mark.parametrize(("door", "split", "error", "with_id"), [
    ("openai", None, {"message": FIXED, "type": "server_error"}, False),
    ("anthropic", None, {"message": FIXED, "type": "overloaded_error"}, False),
    # The error event in two chunks, cut inside its message: the first part is replaced,
    # and the rest of the event is dropped (OpenAI's type comes after the message).
    ("openai", len(_OPENAI_HEAD) + 5, {"message": FIXED}, False),
    ("anthropic", len(_ANTHROPIC_HEAD) + 5, {"message": FIXED, "type": "overloaded_error"},
     False),
    # Anthropic's `event: error` line alone in the first chunk.
    ("anthropic", len("event: error\n"), {"message": FIXED}, False),
    # Split inside the `"error"` key: Envoy keeps the cut line back until its end comes,
    # and the whole event is replaced.
    ("openai", len('data: {"err'), {"message": FIXED, "type": "server_error"}, False),
    # The same after another field: the start passed on would not have been the start of
    # the replacement, and the client got a broken event before it (decision 0142).
    ("openai", len('data: {"id": "chatcmpl-emulator", "err'),
     {"message": FIXED, "type": "server_error"}, True),
])
def test_an_in_stream_error_on_the_fast_path_never_shows_the_providers_message(
        fast: tuple[Gateway, int], door: str, split: int | None,
        error: dict[str, str], with_id: bool) -> None:
    gateway, _ = fast
    gateway.emulator.queue_fault(stream_error=LEAKY_STREAM_ERROR, stream_error_split=split,
                                 stream_error_id=with_id)
    chunks_before = phase_count(gateway, "response_body")
    fast_before = door_checks(gateway, "fast")

    if door == "openai":
        response = gateway.chat(chat_body(max_tokens=8, stream=True,
                                          stream_options={"include_usage": True}))
    else:
        response = gateway.client.post(
            "/v1/messages", headers={"x-api-key": ACME_KEY, "anthropic-version": "2023-06-01"},
            json={"model": "claude-x", "max_tokens": 8, "stream": True,
                  "messages": [{"role": "user", "content": "Hello there"}]})

    assert response.status_code == 200
    assert (door_checks(gateway, "fast"), phase_count(gateway, "response_body")) == (
        fast_before + 1, chunks_before)  # decided at the door; no chunk went to ext_proc
    blocks = [block.split("\n") for block in response.text.strip("\n").split("\n\n")]
    if door == "openai":
        assert len(blocks) == 2
        assert blocks[0][0].startswith('data: {"id"')
        assert json.loads(blocks[1][0].removeprefix("data: ")) == {"error": error}
        assert len(blocks[1]) == 1
    else:
        assert [lines[0] for lines in blocks] == ["event: message_start", "event: error"]
        assert json.loads(blocks[1][1].removeprefix("data: ")) == {
            "type": "error", "error": error}
        assert len(blocks[1]) == 2
    assert "AbCd1234xyz" not in response.text
    assert "9990" not in response.text
    assert_one_record(gateway, response.headers["x-asc-request-id"], tenant="acme",
                      status=200, upstream_status=200)


def test_envoys_own_reply_on_the_fast_path_is_not_sent_to_the_door(
        fast: tuple[Gateway, int]) -> None:
    # A reset before the answer: Envoy's local reply (no provider text in it) keeps
    # local_reply_config's JSON; only answers from the provider are mapped.
    gateway, _ = fast
    gateway.emulator.queue_fault(reset=True)

    response = gateway.chat(chat_body(max_tokens=8))

    # The same answer and record as on the full path (decision 0140): the provider sent
    # nothing, so nothing is charged (the whole hold was, before).
    assert_envoys_reset_reply(gateway, response, charged_micro_usd=0)


def _extproc_connections(gateway: Gateway) -> int:
    stats = gateway.admin("GET", "/stats?filter=^cluster.asc_extproc.upstream_cx_total$").text
    return int(stats.strip().rsplit(": ", 1)[1])


@pytest.mark.parametrize(("streams", "more_than_threads"), [(None, False), (2, True)])
def test_a_stream_limit_makes_envoy_open_connections_for_the_workers(
        stack: Stack, streams: int | None, more_than_threads: bool) -> None:
    """Envoy (2 threads) opens one extproc connection per thread without a limit; with
    `max_concurrent_streams` it opens more, which SO_REUSEPORT spreads over workers."""
    def limit(bootstrap: dict[str, Any]) -> None:
        if streams is not None:
            options = bootstrap["static_resources"]["clusters"][0][
                "typed_extension_protocol_options"][
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
            options["explicit_http_config"]["http2_protocol_options"] = {
                "max_concurrent_streams": streams}

    gateway = start_gateway(stack, stack.workdir / "config", workers=2,
                            edit_bootstrap=limit)

    def call(_: int) -> int:
        with httpx.Client(base_url=gateway.base_url, timeout=15) as client:
            return client.post("/v1/chat/completions", json=chat_body(stream=True),
                               headers={"authorization": f"Bearer {ACME_KEY}"}).status_code

    with ThreadPoolExecutor(16) as pool:
        assert set(pool.map(call, range(64))) == {200}
    assert (_extproc_connections(gateway) > 2) is more_than_threads


def test_oversized_bodies_are_refused_with_413(fast: tuple[Gateway, int]) -> None:
    gateway, _ = fast
    gateway.emulator.clear()
    just_over = chat_body(max_tokens=8)
    just_over["messages"][0]["content"] = "x" * 70_000  # over 65,536, within Envoy's slack
    far_over = chat_body(max_tokens=8)
    far_over["messages"][0]["content"] = "x" * 200_000  # over Envoy's buffer too

    service = gateway.chat(just_over)
    envoy_itself = gateway.chat(far_over)

    assert service.status_code == 413
    assert service.json()["error"]["code"] == "payload_too_large"
    assert envoy_itself.status_code == 413
    assert envoy_itself.headers["content-type"] == "application/json"
    assert "error" in envoy_itself.json()
    assert gateway.emulator.requests() == []


FORGED = {
    # What the door and Envoy use between them: a client must not be able to set any.
    "x-asc-path": "/v1/chat/completions", "x-asc-cluster": "emu_us",
    "x-asc-meta-fast": "IAE=", "x-asc-meta-tenant": "globex",
    "x-asc-meta-hold": '{"mode":"redis","local":0,"day":"","tag":"{t:globex}","groups":[]}',
    "x-asc-meta-credential": "forged@9", "x-asc-meta-bogus": "1",
    "x-asc-meta-record": '{"key_id":"globex-1","hold":"{}","team":"forged"}',
}


@pytest.mark.parametrize("stream_usage", [True, False], ids=["fast", "full"])
def test_forged_door_headers_never_reach_envoy_metadata_or_the_provider(
        fast: tuple[Gateway, int], stream_usage: bool) -> None:
    gateway, _ = fast
    gateway.emulator.clear()
    full_before = door_checks(gateway, "full")
    body = chat_body(max_tokens=8, stream=True,
                     **({"stream_options": {"include_usage": True}} if stream_usage else {}))

    response = gateway.chat(body, headers=FORGED)

    assert response.status_code == 200
    assert response.headers["x-asc-region"] == "eu-west-1"  # acme's, not globex's us
    [upstream] = gateway.emulator.requests()
    assert not {name for name in upstream["headers"] if name.startswith("x-asc")}
    assert upstream["headers"]["authorization"] == (
        f"Bearer {provider_fingerprint(PROVIDER_KEY_EU)}")
    request_id = response.headers["x-asc-request-id"]
    assert wait_for(lambda: len(records(gateway, request_id)) == 1)
    [record] = records(gateway, request_id)
    assert record["tenant"] == "acme"
    assert record["credential"] == "emu-eu-1@1"
    if not stream_usage:
        assert door_checks(gateway, "full") == full_before + 1
    # No second record: the forged `fast` mark did not make Envoy log a fast request.
    assert_one_record(gateway, request_id, tenant="acme", credential="emu-eu-1@1",
                      status=200)


def test_a_budget_refusal_is_answered_by_the_door_once(fast: tuple[Gateway, int]) -> None:
    gateway, redis_port = fast
    gateway.chat(chat_body(max_tokens=8))
    assert wait_for(lambda: month_counter(redis_port)[1] == 0)
    spent_before, _ = month_counter(redis_port)
    refused_before = door_checks(gateway, "refused")
    gateway.emulator.clear()

    # 60,000 output tokens at 2,000 USD / Mtok: 120 USD against a 100 USD budget.
    response = gateway.chat(chat_body(max_tokens=60_000))

    assert response.status_code == 429
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert error["message"] == ("Request refused: it would exceed the tenant monthly budget"
                                " (limit USD 100.00).")
    assert int(response.headers["retry-after"]) > 0
    request_id = response.headers["x-asc-request-id"]
    assert gateway.emulator.requests() == []
    assert door_checks(gateway, "refused") == refused_before + 1
    assert month_counter(redis_port) == (spent_before, 0)  # nothing held, nothing spent
    assert wait_for(lambda: len(records(gateway, request_id)) == 1)
    assert_one_record(gateway, request_id, tenant="acme", status=429)


def credential_open(gateway: Gateway, credential: str) -> bool:
    return re.search(rf'^asc_credential_state\{{credential="{re.escape(credential)}",'
                     r'state="open"\} 1\.0$', gateway.metrics(), re.MULTILINE) is not None


def test_fast_answers_feed_the_keys_health(stack: Stack) -> None:
    """Three 401s on the fast path open the key (from Envoy's access log, as the full path
    would from the answer's headers); the request after them is refused, not sent."""
    _, redis_port = stack.start_redis()
    gateway = start_gateway(stack, stack.workdir / "config", document=fast_config(redis_port))
    gateway.emulator.queue_fault(status=401, count=3)

    refused = [gateway.chat(chat_body(max_tokens=8)) for _ in range(3)]

    # The client gets the full path's 502 (the door mapped the provider's 401, whose text
    # quotes the key); the key's verdict is taken on the provider's 401.
    assert [r.status_code for r in refused] == [502] * 3
    assert [r.json() for r in refused] == [{"error": {
        "message": "The provider rejected the gateway's credential.",
        "type": "upstream_error", "param": None, "code": "provider_error"}}] * 3
    assert {r.headers["x-asc-credential"] for r in refused} == {"emu-eu-1@1"}
    assert wait_for(lambda: credential_open(gateway, "global/emu-eu-1"))
    unavailable = gateway.chat(chat_body(max_tokens=8))
    assert unavailable.status_code == 503
    # Routing sees the open key: the only EU deployment is unusable (as on the full path).
    assert unavailable.json()["error"]["message"] == (
        "Every deployment of model 'gpt-4o-mini' in your residency zone is unavailable.")
    assert len(gateway.emulator.requests()) == 3  # the open key was not tried again


def test_a_route_without_the_door_takes_no_forged_metadata(stack: Stack) -> None:
    """An operator switched the door off on a route (docs/fast-path.md): the request takes
    the full path there, and a client's x-asc-meta-* headers are not turned into metadata
    (else Envoy would log it as a fast request and the service would record it twice)."""
    _, redis_port = stack.start_redis()

    def door_off_on_the_full_route(bootstrap: dict[str, Any]) -> None:
        listener = bootstrap["static_resources"]["listeners"][0]
        hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
        full_route = hcm["route_config"]["virtual_hosts"][0]["routes"][-1]
        full_route["typed_per_filter_config"] = {"asc.fast_door": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3"
                     ".ExtAuthzPerRoute", "disabled": True}}

    gateway = start_gateway(stack, stack.workdir / "config", document=fast_config(redis_port),
                            edit_bootstrap=door_off_on_the_full_route)
    checks_before = sum(door_checks(gateway, o) for o in ("fast", "full", "refused"))

    response = gateway.chat(chat_body(max_tokens=8), headers=FORGED)

    assert response.status_code == 200
    assert sum(door_checks(gateway, o) for o in ("fast", "full", "refused")) == checks_before
    assert phase_count(gateway, "request_body") == 1  # the full path took it
    [upstream] = gateway.emulator.requests()
    assert not {name for name in upstream["headers"] if name.startswith("x-asc")}
    request_id = response.headers["x-asc-request-id"]
    assert wait_for(lambda: len(records(gateway, request_id)) == 1)
    assert_one_record(gateway, request_id, tenant="acme", credential="emu-eu-1@1",
                      status=200)
    # Envoy wrote its access line: the fast-path access log (which would feed a second
    # record) logged nothing for it.
    assert wait_for(lambda: request_id in gateway.envoy.log_text())
    assert grpc_logs_written(gateway) == 0


def test_a_route_with_asc_metadata_takes_the_full_path(stack: Stack) -> None:
    """The door cannot read route metadata: Envoy's Lua filter named `asc` marks a route
    that has some, and the door sends its requests to ext_proc, which applies it (here a
    guardrail profile on one host; acme has no guardrails of its own)."""
    _, redis_port = stack.start_redis()
    fast_document = fast_config(redis_port)

    def document(emulator_port: int) -> dict[str, Any]:
        doc = fast_document(emulator_port)
        doc["guardrail_profiles"] = {"strict": {"pii": {"email": "deny"}}}
        return doc

    gateway = start_gateway(stack, stack.workdir / "config", document=document,
                            edit_bootstrap=strict_route)
    fast_before, full_before = door_checks(gateway, "fast"), door_checks(gateway, "full")

    strict_request = assert_the_strict_route_denies_an_email(gateway, max_tokens=8)

    assert (door_checks(gateway, "fast"), door_checks(gateway, "full")) == (
        fast_before + 1, full_before + 1)
    assert len(gateway.emulator.requests()) == 1
    assert_one_record(gateway, strict_request, tenant="acme", status=403)


def grpc_logs_written(gateway: Gateway) -> int:
    stats = gateway.admin("GET", "/stats?filter=grpc_access_log.logs_written$").text
    return sum(int(line.rsplit(": ", 1)[1]) for line in stats.splitlines() if ": " in line)


def test_envoy_at_trace_never_prints_the_fast_doors_key(stack: Stack) -> None:
    """Envoy's ext_authz component prints at trace each header it sets, the provider key
    included: it stays at info with the other header-printing components (decision 0130)."""
    _, redis_port = stack.start_redis()
    gateway = start_gateway(stack, stack.workdir / "config", document=fast_config(redis_port),
                            envoy_log_level="trace")

    plain = gateway.chat(chat_body(max_tokens=8))
    streamed = gateway.chat(chat_body(max_tokens=8, stream=True,
                                      stream_options={"include_usage": True}))

    assert (plain.status_code, streamed.status_code) == (200, 200)
    request_id = streamed.headers["x-asc-request-id"]
    assert wait_for(lambda: request_id in gateway.envoy.log_text())
    envoy_log = gateway.envoy.log_text()
    assert "[trace]" in envoy_log  # the grep read a real trace-level log
    assert [canary[:16] for canary in CANARIES if canary in envoy_log] == []
