"""The fast door's HTTP answers (extproc/fastdoor.py) without Envoy: what it sets,
removes and refuses, byte for byte where Envoy reads it. tests/e2e/test_fastpath.py runs
the same answers through a real Envoy."""

from __future__ import annotations

import asyncio
import base64
import json

import pytest
from google.protobuf import struct_pb2

from extproc.fastdoor import DoorProtocol, _response, body_fields, decide, provider_error
from extproc.runtime import Runtime, RuntimeHolder
from tests.unit.test_fastpath import PARSED
from tests.unit.test_phases import ENVIRON, PROVIDER_KEY_US, TENANT_KEYS

BODY = json.dumps({"model": "gpt-4o-mini", "max_tokens": 16,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()


def holder() -> RuntimeHolder:
    return RuntimeHolder(Runtime.build(PARSED, environ=ENVIRON))


def client_headers(tenant: str = "acme", **extra: str) -> dict[str, str]:
    return {"host": "gw", "content-type": "application/json", "content-length": str(len(BODY)),
            "authorization": f"Bearer {TENANT_KEYS[tenant]}", "x-api-key": "sk-client",
            **extra}


def parse(response: bytes) -> tuple[str, dict[str, str], bytes]:
    head, _, body = response.partition(b"\r\n\r\n")
    status, *lines = head.decode().split("\r\n")
    fields = dict(line.split(": ", 1) for line in lines)
    assert len(fields) == len(lines), "a header appears twice"
    assert int(fields.pop("content-length")) == len(body)
    return status, fields, body


async def test_a_fast_answer_sets_the_key_and_the_metadata_and_removes_the_rest() -> None:
    response = await decide(holder(), None, "POST", "/v1/chat/completions",
                            client_headers(**{"x-asc-meta-tenant": "globex",
                                              "x-asc-meta-bogus": "1", "x-asc-path": "/x"}),
                            BODY)

    status, fields, body = parse(response)
    assert status == "HTTP/1.1 200 OK"
    assert body == b""
    assert fields["x-asc-path"] == "/v1/chat/completions"
    assert fields["x-asc-cluster"] == "prov_us"
    assert fields["authorization"] == f"Bearer {PROVIDER_KEY_US}"
    # Everything the door sets is overwritten, never also removed; the client's own
    # x-asc* headers and its key go.
    removed = fields["x-envoy-auth-headers-to-remove"].split(", ")
    assert set(removed) == {"x-api-key", "x-asc-meta-bogus"}
    assert fields["x-asc-meta-tenant"] == "acme"
    assert fields["x-asc-meta-credential"] == "cred-us@1"
    # What only the service reads back travels packed in one header (decision 0144).
    record = json.loads(fields["x-asc-meta-record"])
    assert {key: record[key] for key in ("key_id", "endpoint", "source", "stream")} == {
        "key_id": "acme-1", "endpoint": "chat", "source": "virtual_key", "stream": False}
    assert "hold" not in record  # acme has no budget here
    assert not {"x-asc-meta-key_id", "x-asc-meta-hold", "x-asc-meta-stream"} & set(fields)
    fast = struct_pb2.Value()
    fast.ParseFromString(base64.b64decode(fields["x-asc-meta-fast"]))
    assert fast.bool_value is True
    assert fields["x-asc-request-id"] == fields["x-asc-meta-request_id"]
    assert fields["x-asc-provider"] == "prov-us"


@pytest.mark.parametrize(("target", "headers", "body", "why"), [
    ("/v1/chat/completions?x=1", client_headers(), BODY, "a query string"),
    ("/v1/chat/completions", client_headers(), b"", "no body"),
    ("/v1/chat/completions", client_headers(), b"[1, 2]", "not a JSON object"),
    ("/v1/chat/completions", client_headers(), b"{not json", "not JSON"),
    ("/v1/chat/completions", {**client_headers(), "authorization": "Bearer nope"}, BODY,
     "a bad key: the full path refuses and records it"),
    ("/v1/chat/completions", client_headers("pinned"), BODY, "tenant not on the fast path"),
    ("/v1/embeddings", client_headers(), BODY, "another endpoint"),
    # Envoy cut the body at max_request_bytes: a whole JSON object followed by padding
    # still parses, but the request is larger than what the door saw.
    ("/v1/chat/completions", client_headers(**{"x-envoy-auth-partial-body": "true"}), BODY,
     "Envoy marked the body partial"),
    ("/v1/chat/completions", client_headers(**{"content-length": str(len(BODY) + 10)}),
     BODY, "fewer bytes than the request's content-length"),
])
async def test_what_the_door_cannot_decide_goes_on_to_ext_proc(
        target: str, headers: dict[str, str], body: bytes, why: str) -> None:
    response = await decide(holder(), None, "POST", target,
                            {**headers, "x-asc-cluster": "prov_eu"}, body)

    status, fields, _ = parse(response)
    assert status == "HTTP/1.1 200 OK", why
    assert fields["x-asc-path"] == "full", why
    # A client's x-asc-* header never reaches ext_proc's route or Envoy's metadata.
    assert fields["x-envoy-auth-headers-to-remove"] == "x-asc-cluster", why
    assert "authorization" not in fields, why


def test_body_fields_read_what_the_fast_path_decides_on() -> None:
    fields = body_fields(json.dumps({
        "model": "m", "stream": True, "max_tokens": 5, "n": 1, "service_tier": "auto",
        "stream_options": {"include_usage": True}, "messages": [],
        "max_completion_tokens": {"odd": 1}}).encode())

    assert fields == {"model": "m", "stream": True, "max_tokens": 5, "n": 1,
                      "service_tier": "auto", "include_usage": True,
                      "max_completion_tokens": None}


def test_a_value_with_a_line_break_cannot_split_the_answer() -> None:
    response = _response("HTTP/1.1 200 OK", [("x-a", "one\r\nx-injected: 1"), ("x-b", "ok")])

    assert response == (b"HTTP/1.1 200 OK\r\nx-a: one  x-injected: 1\r\nx-b: ok\r\n"
                        b"content-length: 0\r\n\r\n")


async def test_checks_on_one_connection_are_answered_in_order() -> None:
    """Two requests in one read (pipelined): two answers, in the order asked."""
    tasks: set[asyncio.Task[None]] = set()
    protocol = DoorProtocol(holder(), None, tasks)
    written: list[bytes] = []

    class Transport(asyncio.Transport):
        def write(self, data: bytes | bytearray | memoryview) -> None:
            written.append(bytes(data))

        def is_closing(self) -> bool:
            return False

    protocol.connection_made(Transport())
    first = (b"POST /v1/chat/completions?a=1 HTTP/1.1\r\nhost: gw\r\n"
             b"content-length: 2\r\n\r\n{}")
    second = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: gw\r\n"
              b"authorization: Bearer " + TENANT_KEYS["acme"].encode() + b"\r\n"
              b"content-length: " + str(len(BODY)).encode() + b"\r\n\r\n" + BODY)
    protocol.data_received(first + second)
    for _ in range(200):
        if len(written) == 2:
            break
        await asyncio.sleep(0.005)

    assert [parse(w)[1]["x-asc-path"] for w in written] == ["full", "/v1/chat/completions"]


async def test_a_check_envoy_gave_up_on_is_recorded_as_a_503_and_never_answered(
        caplog: pytest.LogCaptureFixture) -> None:
    class Closing(asyncio.Transport):
        def is_closing(self) -> bool:
            return True

    caplog.set_level("INFO", logger="extproc.request")

    response = await decide(holder(), None, "POST", "/v1/chat/completions", client_headers(),
                            BODY, Closing())

    assert response == b""  # the protocol closes the connection instead of answering
    [record] = [r for r in caplog.records if r.getMessage() == "request finished"]
    fields = record.fields  # type: ignore[attr-defined]
    assert (fields["tenant"], fields["status"], fields["error"]) == (
        "acme", 503, "gateway_unavailable")
    assert fields["charged_micro_usd"] is None  # no hold here; with one it is returned


async def test_envoys_health_check_is_answered_without_a_decision() -> None:
    response = await decide(holder(), None, "GET", "/_asc/door-health", {"host": "door"}, b"")

    assert response == b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n"


@pytest.mark.parametrize(("sent", "dialect", "status", "expected"), [
    # A 401's text quotes part of the key: the client reads the full path's 502.
    (401, "openai", 502, {"error": {
        "message": "The provider rejected the gateway's credential.",
        "type": "upstream_error", "param": None, "code": "provider_error"}}),
    (429, "anthropic", 429, {"type": "error", "error": {
        "type": "rate_limit_error",
        "message": "The provider's rate limit was reached; retry later."}}),
    # A 400's message is kept, scrubbed of the account's ids and figures.
    (400, "openai", 400, {"error": {
        "message": "Bad max_tokens for [redacted] (Limit [redacted])",
        "type": "invalid_request_error", "param": None, "code": "invalid_request"}}),
    ("x", "openai", 502, {"error": {
        "message": "The provider failed with status 502.",
        "type": "upstream_error", "param": None, "code": "provider_error"}}),
])
async def test_a_provider_error_is_mapped_as_on_the_full_path(
        sent: object, dialect: str, status: int, expected: dict[str, object]) -> None:
    body = json.dumps({"error": {"message": "Bad max_tokens for org-AbCdEf123 (Limit 5)",
                                 "type": "invalid_request_error"}}).encode()
    response = await decide(holder(), None, "POST", "/_asc/provider-error",
                            {"x-asc-status": str(sent), "x-asc-dialect": dialect,
                             "content-type": "application/json",
                             "content-length": str(len(body))}, body)

    head, fields, answer = parse(response)
    assert head == "HTTP/1.1 200 OK"
    assert fields["x-asc-status"] == str(status)
    assert json.loads(answer) == expected
    # Were it a client's own request to this path: no x-asc* header of its goes upstream.
    assert fields["x-envoy-auth-headers-to-remove"] == "x-asc-status, x-asc-dialect"
    assert provider_error({"x-asc-status": str(sent), "x-asc-dialect": dialect},
                          body) == response


async def test_a_route_with_asc_metadata_is_never_decided_at_the_door() -> None:
    # Envoy's Lua filter named `asc` marks it; only ext_proc reads route metadata.
    response = await decide(holder(), None, "POST", "/v1/chat/completions",
                            client_headers(**{"x-asc-route-metadata": "1"}), BODY)

    status, fields, _ = parse(response)
    assert status == "HTTP/1.1 200 OK"
    assert fields["x-asc-path"] == "full"
    assert fields["x-envoy-auth-headers-to-remove"] == "x-asc-route-metadata"
