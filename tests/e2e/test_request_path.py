"""A tenant's request through real Envoy, the real extproc service and the emulator."""

from __future__ import annotations

import json
import re
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from extproc.emulator.app import key_fingerprint
from tests.conftest import (
    ACME_KEY,
    CHAT,
    GLOBEX_KEY,
    PROVIDER_KEY_EU,
    PROVIDER_KEY_US,
    Emulator,
    Gateway,
    chat_body,
)
from tests.e2e.audit_check import access_log_line, assert_one_record

EMULATOR_REPLY = "Hello from the emulator."


def openai_error(
    message: str, type_: str, code: str, param: str | None = None
) -> dict[str, object]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def test_completion_is_routed_in_zone_with_the_provider_key(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    response = gateway.chat(chat_body())

    assert response.status_code == 200
    body = response.json()
    assert body["model"] == "gpt-4o-mini-eu"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": EMULATOR_REPLY}
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert response.headers["x-asc-provider"] == "emu-eu"
    assert response.headers["x-asc-region"] == "eu-west-1"
    assert response.headers["x-asc-credential"] == "emu-eu-1@1"
    # 3 x 0.15 + 4 x 0.60 USD per Mtok, each rounded up to a micro-USD.
    assert response.headers["x-asc-cost-usd"] == "0.000004"
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-asc-request-id"])

    [seen] = emulator_clean.requests()
    assert seen["path"] == CHAT
    assert seen["headers"]["authorization"] == "Bearer " + key_fingerprint(PROVIDER_KEY_EU)
    assert json.loads(seen["body"])["model"] == "gpt-4o-mini-eu"
    assert int(seen["headers"]["content-length"]) == len(seen["body"].encode())
    assert not [name for name in seen["headers"] if name.startswith("x-asc-")]
    assert_one_record(
        gateway, response.headers["x-asc-request-id"], tenant="acme",
        principal__key_id="acme-main", front_door="openai", endpoint="chat",
        model_asked="gpt-4o-mini", model_served="gpt-4o-mini-eu", route__provider="emu-eu",
        route__region="eu-west-1", route__cluster="emu_eu", credential="emu-eu-1@1",
        status=200, error=None, aborted=False, tokens={"input": 3, "output": 4, "cached": 0},
        cost_micro_usd=4)


def test_us_tenant_goes_to_the_us_deployment_unchanged(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    sent = chat_body(temperature=0.2)
    response = gateway.chat(sent, key=GLOBEX_KEY)

    assert response.status_code == 200
    assert response.headers["x-asc-provider"] == "emu-us"
    [seen] = emulator_clean.requests()
    assert seen["headers"]["authorization"] == "Bearer " + key_fingerprint(PROVIDER_KEY_US)
    assert json.loads(seen["body"]) == sent


def test_x_api_key_authenticates_and_is_stripped(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    response = gateway.chat(chat_body(), key=None, headers={"x-api-key": ACME_KEY})

    assert response.status_code == 200
    [seen] = emulator_clean.requests()
    assert "x-api-key" not in seen["headers"]
    assert seen["headers"]["authorization"] == "Bearer " + key_fingerprint(PROVIDER_KEY_EU)


def test_client_cannot_steer_the_cluster_or_spoof_gateway_headers(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    response = gateway.chat(chat_body(), headers={
        "x-asc-cluster": "emu_us", "x-asc-tenant": "globex", "api-key": "client-secret",
    })

    assert response.status_code == 200
    assert response.headers["x-asc-provider"] == "emu-eu"
    [seen] = emulator_clean.requests()
    assert seen["headers"]["authorization"] == "Bearer " + key_fingerprint(PROVIDER_KEY_EU)
    assert "api-key" not in seen["headers"]
    assert not [name for name in seen["headers"] if name.startswith("x-asc-")]


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (None, "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'."),
        ("sk-wrong-key", "Invalid API key."),
        (PROVIDER_KEY_EU, "Invalid API key."),
    ],
)
def test_unauthenticated_requests_never_reach_a_provider(
    gateway: Gateway, emulator_clean: Emulator, key: str | None, message: str
) -> None:
    response = gateway.chat(chat_body(), key=key)

    assert response.status_code == 401
    assert response.headers["content-type"] == "application/json"
    assert response.json() == openai_error(message, "authentication_error", "invalid_api_key")
    assert emulator_clean.requests() == []
    assert_one_record(gateway, response.headers["x-asc-request-id"], tenant=None,
                      principal=None, status=401, error="invalid_api_key", route=None,
                      model_asked=None, credential=None, attempts=[])


@pytest.mark.parametrize(
    ("payload", "status", "expected"),
    [
        (chat_body("gpt-4o"), 403, openai_error(
            "Your key is not allowed to use the model 'gpt-4o'.", "permission_error",
            "model_not_allowed", "model")),
        (chat_body("no-such-model"), 404, openai_error(
            "The model 'no-such-model' does not exist.", "not_found_error", "model_not_found",
            "model")),
        (b'{"model": "gpt-4o-mini", "messages": [', 400, openai_error(
            "The request body is not valid JSON.", "invalid_request_error", "invalid_request")),
        (b'["not", "an", "object"]', 400, openai_error(
            "The request body must be a JSON object.", "invalid_request_error",
            "invalid_request")),
        (json.dumps({"model": "gpt-4o-mini"}).encode(), 400, openai_error(
            "'messages' must be a non-empty array.", "invalid_request_error", "invalid_request",
            "messages")),
        (json.dumps({"model": 7, "messages": []}).encode(), 400, openai_error(
            "'model' must be a non-empty string.", "invalid_request_error", "invalid_request",
            "model")),
    ],
    ids=["not-allowed", "unknown-model", "malformed", "not-object", "no-messages", "bad-model"],
)
def test_bad_requests_get_exact_errors_and_reach_no_provider(
    gateway: Gateway, emulator_clean: Emulator, payload: dict[str, object] | bytes,
    status: int, expected: dict[str, object],
) -> None:
    response = gateway.chat(payload)

    assert response.status_code == status
    assert response.json() == expected
    assert response.headers["x-asc-request-id"]
    assert emulator_clean.requests() == []
    assert_one_record(gateway, response.headers["x-asc-request-id"], tenant="acme",
                      principal__key_id="acme-main", status=status,
                      error=expected["error"]["code"], route=None, attempts=[],
                      tokens=None)


def test_body_over_limit_with_content_length_is_413(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    big = chat_body(padding="x" * 70_000)
    response = gateway.chat(big)

    assert response.status_code == 413
    assert response.json() == openai_error(
        "Request body exceeds the limit of 65536 bytes.", "invalid_request_error",
        "payload_too_large")
    assert emulator_clean.requests() == []


def test_chunked_body_over_limit_is_413_not_a_hang(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    def chunks():  # type: ignore[no-untyped-def]
        yield b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
        for _ in range(200):
            yield b"y" * 4096
        yield b'"}]}'

    response = gateway.client.post(CHAT, content=chunks(), headers={
        "authorization": f"Bearer {ACME_KEY}", "content-type": "application/json"}, timeout=10)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert emulator_clean.requests() == []


def test_a_whole_json_object_padded_past_the_limit_is_413(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    # Any first part of it parses as a request (the object, then spaces). On the fast
    # path Envoy sends the door at most its first max_body_bytes + 64 KiB
    # (allow_partial_message, decision 0136): the request still takes the full path, which
    # reads it whole and refuses it (tests/unit/test_fastdoor.py: a cut body is never
    # decided at the door).
    def chunks():  # type: ignore[no-untyped-def]
        yield json.dumps(chat_body()).encode()
        for _ in range(200):
            yield b" " * 4096

    response = gateway.client.post(CHAT, content=chunks(), headers={
        "authorization": f"Bearer {GLOBEX_KEY}", "content-type": "application/json"},
        timeout=10)

    assert response.status_code == 413
    assert response.json()["error"]["code"] == "payload_too_large"
    assert emulator_clean.requests() == []


def test_unknown_endpoint_is_404(gateway: Gateway, emulator_clean: Emulator) -> None:
    response = gateway.client.get("/v1/files", headers={"authorization": f"Bearer {ACME_KEY}"})

    assert response.status_code == 404
    assert response.json() == openai_error(
        "Unknown endpoint: GET /v1/files", "not_found_error", "not_found")
    assert emulator_clean.requests() == []
    assert_one_record(gateway, response.headers["x-asc-request-id"], status=404,
                      error="not_found", tenant=None)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ({"status": 500}, "The provider failed with status 500."),
        ({"status": 503, "html": True}, "The provider failed with status 503."),
        ({"status": 404, "html": True}, "The provider failed with status 404."),
    ],
    ids=["json-500", "html-503", "html-404"],
)
def test_provider_failures_become_gateway_errors_in_openai_shape(
    gateway: Gateway, emulator_clean: Emulator, fault: dict[str, object], message: str
) -> None:
    emulator_clean.queue_fault(**fault)
    response = gateway.chat(chat_body())

    assert response.status_code == 502
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-asc-provider"] == "emu-eu"
    assert response.json() == openai_error(message, "upstream_error", "provider_error")
    assert len(emulator_clean.requests()) == 1
    assert_one_record(gateway, response.headers["x-asc-request-id"], tenant="acme",
                      status=502, upstream_status=fault["status"], error="provider_error",
                      route__provider="emu-eu", credential="emu-eu-1@1", tokens=None,
                      cost_micro_usd=None)


def test_provider_rejecting_our_key_is_not_blamed_on_the_client(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    emulator_clean.queue_fault(status=401)
    response = gateway.chat(chat_body())

    assert response.status_code == 502
    assert response.json() == openai_error(
        "The provider rejected the gateway's credential.", "upstream_error", "provider_error")


def test_provider_rate_limit_passes_through_with_retry_after(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    emulator_clean.queue_fault(status=429, retry_after=7)
    response = gateway.chat(chat_body())

    assert response.status_code == 429
    assert response.headers["retry-after"] == "7"
    # The provider's text names the shared account and its limits: never shown.
    assert response.json() == openai_error(
        "The provider's rate limit was reached; retry later.", "rate_limit_error",
        "rate_limited")
    record = assert_one_record(gateway, response.headers["x-asc-request-id"], status=429,
                               upstream_status=429, error="rate_limited")
    assert [(a["provider"], a["status"]) for a in record["attempts"]] == [("emu-eu", 429)]


def test_provider_connection_reset_is_a_json_gateway_error(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    """The provider sent nothing: Envoy's own 503 reaches the client as local_reply_config
    made it (as on the fast path), and the record has no upstream status (decision 0140);
    before, it read "The provider failed with status 503." and recorded a 503 answer."""
    emulator_clean.queue_fault(reset=True)
    assert_envoys_reset_reply(gateway, gateway.chat(chat_body()))


def assert_envoys_reset_reply(gateway: Gateway, response: httpx.Response,
                              **record: object) -> None:
    """A reset before the answer, on either path: Envoy's 503 as local_reply_config made
    it, and a record without an upstream status."""
    assert response.status_code == 503
    assert response.json() == {"error": {
        "message": "The gateway or the provider is unavailable.", "type": "gateway_error",
        "param": None, "code": "gateway_unavailable"}}
    # The reset is the operator's to read, not the client's (decision 0141).
    assert access_log_line(gateway, response.headers["x-asc-request-id"])["details"] == (
        "upstream_reset_before_response_started{connection_termination}")
    assert_one_record(gateway, response.headers["x-asc-request-id"], tenant="acme",
                      status=503, upstream_status=None, error="provider_error",
                      aborted=False, **record)


def test_streaming_passes_chunks_and_records_usage(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    body = chat_body(stream=True, stream_options={"include_usage": True})
    with gateway.client.stream("POST", CHAT, json=body,
                               headers={"authorization": f"Bearer {ACME_KEY}"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["x-asc-provider"] == "emu-eu"
        events = [line.removeprefix("data: ") for line in response.iter_lines()
                  if line.startswith("data: ")]

    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == EMULATOR_REPLY
    assert chunks[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    request_id = response.headers["x-asc-request-id"]
    line = _extproc_log_line(gateway, request_id)
    assert (line["prompt_tokens"], line["completion_tokens"], line["stream"]) == (3, 4, True)
    assert line["status"] == 200
    assert_one_record(gateway, request_id, status=200, stream=True, aborted=False,
                      tokens={"input": 3, "output": 4, "cached": 0}, cost_micro_usd=4)


def _extproc_log_line(gateway: Gateway, request_id: str) -> dict[str, object]:
    for _ in range(50):
        for raw in gateway.extproc.log_text().splitlines():
            if request_id in raw and '"request finished"' in raw:
                entry: dict[str, object] = json.loads(raw)
                return entry
        time.sleep(0.05)
    raise AssertionError(f"no log line for {request_id}")


def test_request_log_and_envoy_access_log_share_the_request_id(
    gateway: Gateway, emulator_clean: Emulator
) -> None:
    response = gateway.chat(chat_body())
    request_id = response.headers["x-asc-request-id"]

    line = _extproc_log_line(gateway, request_id)
    assert line["tenant"] == "acme"
    assert line["key_id"] == "acme-main"
    assert line["provider"] == "emu-eu"
    assert line["route_reason"] == "zone eu; first in order emu-eu"
    assert line["credential"] == "emu-eu-1@1"
    assert (line["prompt_tokens"], line["completion_tokens"]) == (3, 4)

    access = access_log_line(gateway, request_id)
    assert access["tenant"] == "acme"
    assert access["provider"] == "emu-eu"
    assert access["status"] == 200


def metric_value(text: str, sample_name: str, **labels: str) -> float:
    """Sum of the samples of `sample_name` whose labels include `labels`."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == sample_name and labels.items() <= sample.labels.items():
                total += sample.value
    return total


def test_metrics_count_requests_and_tokens(gateway: Gateway, emulator_clean: Emulator) -> None:
    labels = {"tenant": "acme", "provider": "emu-eu", "region": "eu-west-1",
              "model": "gpt-4o-mini"}
    before = gateway.metrics()
    for _ in range(3):
        assert gateway.chat(chat_body()).status_code == 200
    # Outcomes are recorded when Envoy closes the stream, just after the client's response.
    for _ in range(50):
        after = gateway.metrics()
        done = (metric_value(after, "asc_requests_total", status="200", **labels)
                - metric_value(before, "asc_requests_total", status="200", **labels))
        if done == 3:
            break
        time.sleep(0.05)

    assert done == 3
    output_tokens = (metric_value(after, "gen_ai_client_token_usage_total", token_type="output",
                                  **labels)
                     - metric_value(before, "gen_ai_client_token_usage_total",
                                    token_type="output", **labels))
    assert output_tokens == 12
    assert metric_value(after, "asc_extproc_phase_seconds_count", phase="request_body") >= 3


@pytest.mark.parametrize("stream", [False, True])
def test_official_openai_sdk_completes_through_envoy(gateway: Gateway, stream: bool) -> None:
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=ACME_KEY, max_retries=0)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Hello there"}]
    if not stream:
        completion = client.chat.completions.create(model="gpt-4o-mini", messages=messages)
        assert completion.choices[0].message.content == EMULATOR_REPLY
        assert completion.usage is not None
        assert completion.usage.total_tokens == 7
        return
    pieces = []
    usage = None
    for chunk in client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(pieces) == EMULATOR_REPLY
    assert usage is not None
    assert usage.completion_tokens == 4


def test_openai_sdk_sees_authentication_errors_as_such(gateway: Gateway) -> None:
    client = openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="sk-bad", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


@pytest.mark.parametrize(("max_tokens", "status"), [(8000, 200), (10**12, 400)])
def test_max_tokens_without_a_tenant_cap(
    gateway: Gateway, emulator_clean: Emulator, max_tokens: int, status: int,
) -> None:
    response = gateway.chat(chat_body(max_tokens=max_tokens))

    assert response.status_code == status
    if status == 400:
        assert response.json() == openai_error(
            "'max_tokens' must not exceed 1000000 for your key.", "invalid_request_error",
            "invalid_request", "max_tokens")
        assert emulator_clean.requests() == []
    else:
        [seen] = emulator_clean.requests()
        assert json.loads(seen["body"])["max_tokens"] == 8000
