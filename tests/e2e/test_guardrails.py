"""Guardrails through real Envoy, extproc, redis-server and the emulator: redaction seen
at the provider, refusals in each door's dialect (nothing sent, nothing held, counted),
answers redacted (whole and streamed), and a route's guardrail profile."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import redis

from extproc.devstack import Stack
from tests.conftest import (
    ACME_KEY,
    CHAT,
    Gateway,
    chat_body,
    gateway_config,
    start_gateway,
)
from tests.e2e.audit_check import assert_one_record
from tests.e2e.test_credentials import log_events
from tests.e2e.test_request_path import metric_value
from tests.polling import wait_for

STRICT_HOST = "strict.mesh.internal"
REPLY = "Reach alice@example.com or +44 20 7946 0958 today"
PII_PROMPT = ("I am bob@example.com, my colleague is carol@example.com; bob@example.com "
              "again, phone +1 415 555 0132.")


def guardrails_document(redis_port: int) -> Any:
    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
        acme = doc["tenants"]["acme"]
        acme["zone"] = "us"
        acme["models"] = ["gpt-4o-mini", "gpt-4o"]
        acme["budgets"] = [{"scope": "tenant", "window": "month", "limit_usd": 10}]
        acme["guardrails"] = {
            "models": {"deny": ["gpt-4o"]},
            "n": 1,
            "temperature": {"max": 1},
            "pii": {"email": "redact", "phone": "redact", "credit_card": "deny",
                    "secret": "deny"},
            "responses": {"redact": True, "stream_window": 32},
        }
        doc["guardrail_profiles"] = {"strict": {"pii": {"email": "deny"}}}
        return doc
    return document


def strict_route(bootstrap: dict[str, Any]) -> None:
    """A virtual host whose route names the `strict` guardrail profile."""
    hcm = bootstrap["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    hosts = hcm["route_config"]["virtual_hosts"]
    strict = json.loads(json.dumps(hosts[0]))
    strict.update(name="strict", domains=[STRICT_HOST])
    # The gateway's own route is the last (the fast path's routes come first when it is
    # rendered, and never reach ext_proc).
    strict["routes"][-1]["metadata"] = {"filter_metadata": {"asc": {"guardrails": "strict"}}}
    hosts.insert(0, strict)


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, int]]:
    workdir = tmp_path_factory.mktemp("guardrails")
    with Stack(workdir) as stack:
        _, redis_port = stack.start_redis()
        gateway = start_gateway(stack, workdir / "config",
                                document=guardrails_document(redis_port),
                                emulator_args=("--reply", REPLY), edit_bootstrap=strict_route)
        yield gateway, redis_port


def held(redis_port: int) -> int:
    """Micro-USD (and tokens) held by every budget counter: 0 when nothing leaked."""
    client = redis.Redis(port=redis_port, decode_responses=True)
    total = sum(int(client.hget(key, "held") or 0) for key in client.scan_iter("asc:*:b:*"))
    client.close()
    return total


def guardrail_count(gateway: Gateway, rule: str, action: str) -> float:
    return metric_value(gateway.metrics(), "asc_guardrail_actions_total", tenant="acme",
                        rule=rule, action=action)


def messages(gateway: Gateway, body: dict[str, Any], **headers: str) -> httpx.Response:
    return gateway.client.post("/v1/messages", json=body, headers={
        "x-api-key": ACME_KEY, "anthropic-version": "2023-06-01", **headers})


def test_redaction_happens_before_the_provider_sees_the_prompt(
        guarded: tuple[Gateway, int]) -> None:
    gateway, redis_port = guarded
    gateway.emulator.clear()
    before = guardrail_count(gateway, "pii.email", "redact")
    response = gateway.chat(chat_body(messages=[
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": PII_PROMPT}]))
    assert response.status_code == 200
    [seen] = gateway.emulator.requests()
    sent = json.loads(seen["body"])
    assert sent["messages"][1]["content"] == (
        "I am [EMAIL_1], my colleague is [EMAIL_2]; [EMAIL_1] again, phone [PHONE_1].")
    for original in ("bob@example.com", "carol@example.com", "415 555 0132"):
        assert original not in seen["body"]
    # The body was rewritten to another length: Envoy forwarded it, so content-length
    # matched (a stale one is a 500 from Envoy, decision 0002).
    assert int(seen["headers"]["content-length"]) == len(seen["body"].encode())
    assert guardrail_count(gateway, "pii.email", "redact") == before + 1
    request_id = response.headers["x-asc-request-id"]

    def lines() -> list[dict[str, Any]]:
        return [event for event in log_events(gateway, "request finished")
                if event.get("request_id") == request_id]

    assert wait_for(lines)
    [line] = lines()
    assert line["guardrails"] == ["pii.email:redact:3", "pii.phone:redact:1",
                                  "response.pii.email:redact:1",
                                  "response.pii.phone:redact:1"]
    assert "bob@example.com" not in json.dumps(line)
    assert held(redis_port) == 0
    record = assert_one_record(gateway, request_id, tenant="acme", status=200, guardrails=[
        {"rule": "pii.email", "action": "redact", "count": 3},
        {"rule": "pii.phone", "action": "redact", "count": 1},
        {"rule": "response.pii.email", "action": "redact", "count": 1},
        {"rule": "response.pii.phone", "action": "redact", "count": 1}])
    assert "bob@example.com" not in json.dumps(record)


def test_denied_openai_request_never_reaches_the_provider(
        guarded: tuple[Gateway, int]) -> None:
    gateway, redis_port = guarded
    gateway.emulator.clear()
    before = guardrail_count(gateway, "pii.credit_card", "deny")
    response = gateway.chat(chat_body(messages=[
        {"role": "user", "content": "Charge 4111 1111 1111 1111 please"}]))
    assert response.status_code == 403
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {"error": {
        "message": "Guardrail 'pii.credit_card': the prompt contains a payment card number, "
                   "which this key may not send.",
        "type": "permission_error", "param": None, "code": "guardrail_denied"}}
    assert "4111" not in response.text
    assert gateway.emulator.requests() == []
    assert held(redis_port) == 0
    assert guardrail_count(gateway, "pii.credit_card", "deny") == before + 1
    assert_one_record(gateway, response.headers["x-asc-request-id"], status=403,
                      error="guardrail_denied", attempts=[], guardrails=[
                          {"rule": "pii.credit_card", "action": "deny", "count": 1}])


def test_denied_anthropic_request_answers_in_its_dialect(guarded: tuple[Gateway, int]) -> None:
    gateway, redis_port = guarded
    gateway.emulator.clear()
    before = guardrail_count(gateway, "pii.secret", "deny")
    response = messages(gateway, {
        "model": "gpt-4o-mini", "max_tokens": 20,
        "system": "Key: AKIAIOSFODNN7EXAMPLE",
        "messages": [{"role": "user", "content": "Is this key valid?"}]})
    assert response.status_code == 403
    assert response.json() == {"type": "error", "error": {
        "type": "permission_error",
        "message": "Guardrail 'pii.secret': the prompt contains a secret (API key or private "
                   "key), which this key may not send."}}
    assert "AKIA" not in response.text
    assert gateway.emulator.requests() == []
    assert held(redis_port) == 0
    assert guardrail_count(gateway, "pii.secret", "deny") == before + 1


@pytest.mark.parametrize(("body", "status", "error"), [
    (chat_body("gpt-4o"), 403, {
        "message": "Guardrail 'model.deny': the model 'gpt-4o' is denied for this key.",
        "type": "permission_error", "param": "model", "code": "guardrail_denied"}),
    (chat_body(n=2), 400, {
        "message": "Guardrail 'params.n': 'n' may be at most 1.",
        "type": "invalid_request_error", "param": "n", "code": "guardrail_limit_exceeded"}),
    (chat_body(temperature=1.5), 400, {
        "message": "Guardrail 'params.temperature': 'temperature' must be at most 1.",
        "type": "invalid_request_error", "param": "temperature",
        "code": "guardrail_limit_exceeded"}),
])
def test_model_and_parameter_rules(guarded: tuple[Gateway, int], body: dict[str, Any],
                                   status: int, error: dict[str, Any]) -> None:
    gateway, redis_port = guarded
    gateway.emulator.clear()
    response = gateway.chat(body)
    assert (response.status_code, response.json()) == (status, {"error": error})
    assert gateway.emulator.requests() == []
    assert held(redis_port) == 0


def test_anthropic_door_redacts_and_cleans_the_answer(guarded: tuple[Gateway, int]) -> None:
    gateway, _ = guarded
    gateway.emulator.clear()
    response = messages(gateway, {
        "model": "gpt-4o-mini", "max_tokens": 50,
        "messages": [{"role": "user", "content": "Mail alice@example.com the summary."}]})
    assert response.status_code == 200
    sent = json.loads(gateway.emulator.requests()[0]["body"])
    assert sent["messages"][-1]["content"] == "Mail [EMAIL_1] the summary."
    # The answer names the same address: same placeholder as in the prompt.
    assert response.json()["content"][0]["text"] == "Reach [EMAIL_1] or [PHONE_1] today"


def test_streamed_answer_is_redacted_across_chunks(guarded: tuple[Gateway, int]) -> None:
    gateway, _ = guarded
    body = chat_body(stream=True, messages=[{"role": "user", "content": "Say hi"}])
    with gateway.client.stream("POST", CHAT, json=body, headers={
            "authorization": f"Bearer {ACME_KEY}"}) as response:
        assert response.status_code == 200
        raw = b"".join(response.iter_bytes())
    text = ""
    for block in raw.decode().split("\n\n"):
        data = block.removeprefix("data: ")
        if data and data != "[DONE]":
            for choice in json.loads(data)["choices"]:
                text += choice["delta"].get("content") or ""
    # The emulator sends one word per event: the phone number spans four events.
    assert text == "Reach [EMAIL_1] or [PHONE_1] today"
    assert "7946" not in raw.decode()
    assert raw.endswith(b"data: [DONE]\n\n")


def assert_the_strict_route_denies_an_email(gateway: Gateway, **body: Any) -> str:
    """The same prompt with an email, on the plain host (200) and on STRICT_HOST, whose
    route's profile denies emails (403); the strict answer's request id."""
    sent = chat_body(messages=[{"role": "user", "content": "Write to dan@example.com"}],
                     **body)
    plain = gateway.chat(sent)
    strict = gateway.chat(sent, headers={"host": STRICT_HOST})
    assert plain.status_code == 200
    assert strict.status_code == 403
    assert strict.json()["error"]["message"] == (
        "Guardrail 'pii.email': the prompt contains an email address, which this key may "
        "not send.")
    return strict.headers["x-asc-request-id"]


def test_a_route_profile_tightens_the_tenants_rules(guarded: tuple[Gateway, int]) -> None:
    gateway, redis_port = guarded
    gateway.emulator.clear()
    assert_the_strict_route_denies_an_email(gateway)
    assert len(gateway.emulator.requests()) == 1
    assert held(redis_port) == 0
