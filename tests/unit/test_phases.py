"""The per-request processor (`extproc.phases.RequestProcessor`), driven with plain messages.

No Envoy, no sockets: each test feeds `Headers` / `Body` values to one processor built
from a small inline config and asserts the exact `Continue` / `Respond` it returns.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from extproc.auth import hash_key
from extproc.config import parse_config
from extproc.credentials import ResolvedCredential, StaticKeyProvider
from extproc.logs import JsonFormatter
from extproc.messages import (
    Body,
    BodyMode,
    Continue,
    Headers,
    Phase,
    Respond,
    Trailers,
)
from extproc.phases import RequestProcessor, Usage
from extproc.runtime import Runtime
from extproc.secrets import Secret

PEPPER = "pepper-phases-tests"
PROVIDER_KEY_US = "sk-canary-provider-XYZ"
PROVIDER_KEY_EU = "sk-canary-provider-EU-XYZ"
TENANT_KEYS = {
    "acme": "sk-canary-tenant-acme-XYZ",
    "euco": "sk-canary-tenant-euco-XYZ",
    "pinned": "sk-canary-tenant-pinned-XYZ",
}
ENVIRON = {"ASC_PEPPER": PEPPER, "KEY_US": PROVIDER_KEY_US, "KEY_EU": PROVIDER_KEY_EU}
LIMIT = 4096
JSON_CT = ("content-type", "application/json")


def _hash(tenant: str) -> str:
    return hash_key(Secret(PEPPER), TENANT_KEYS[tenant])


CONFIG = f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
limits: {{max_body_bytes: {LIMIT}}}
credentials:
  cred-us: {{env: KEY_US}}
  cred-eu: {{env: KEY_EU}}
providers:
  prov-us:
    kind: openai
    base_url: "http://127.0.0.1:18080"
    region: us-east-1
    zone: us
    cluster: prov_us
    credentials: [cred-us]
  prov-eu:
    kind: openai
    base_url: "https://eu.example.com/openai/"
    region: eu-west-1
    zone: eu
    cluster: prov_eu
    credentials: [cred-eu]
models:
  gpt-4o-mini:
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.60}}
    deployments:
      - {{provider: prov-us}}
      - {{provider: prov-eu, model: gpt-4o-mini-eu}}
  gpt-4o:
    price: {{input_per_mtok: 2.5, output_per_mtok: 10}}
    deployments: [{{provider: prov-us}}]
tenants:
  acme:
    keys: [{{id: acme-1, hash: "{_hash("acme")}"}}]
    models: [gpt-4o-mini]
  euco:
    zone: eu
    keys: [{{id: euco-1, hash: "{_hash("euco")}"}}]
    models: [gpt-4o-mini]
  pinned:
    keys: [{{id: pinned-1, hash: "{_hash("pinned")}"}}]
    models: [gpt-4o-mini, gpt-4o]
    routing:
      gpt-4o-mini: {{pin: prov-eu}}
"""

RUNTIME = Runtime.build(parse_config(CONFIG), environ=ENVIRON)


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_processor(runtime: Runtime = RUNTIME, clock: FakeClock | None = None) -> RequestProcessor:
    return RequestProcessor(runtime, clock=clock or FakeClock())


def request_headers(
    tenant: str | None = "acme",
    *,
    end_of_stream: bool = False,
    extra: dict[str, str] | None = None,
    **header_kwargs: str,
) -> Headers:
    """Client request headers; `x_api_key="k"` sets `x-api-key`, `extra` sets any name."""
    headers = {":method": "POST", ":path": "/v1/chat/completions",
               "content-type": "application/json"}
    if tenant is not None:
        headers["authorization"] = f"Bearer {TENANT_KEYS[tenant]}"
    headers.update({k.replace("_", "-"): v for k, v in header_kwargs.items()})
    headers.update(extra or {})
    return Headers(Phase.REQUEST_HEADERS, headers, end_of_stream)


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields `log_event` attached to a record."""
    fields: dict[str, Any] = record.__dict__["fields"]
    return fields


def usage_of(processor: RequestProcessor) -> Usage | None:
    return processor.usage


def chat(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": "h\u00e9llo"}], **extra}


def request_body(payload: object, *, end_of_stream: bool = True) -> Body:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return Body(Phase.REQUEST_BODY, raw, end_of_stream)


def response_headers(status: str, content_type: str = "application/json",
                     *, end_of_stream: bool = False) -> Headers:
    return Headers(Phase.RESPONSE_HEADERS,
                   {":status": status, "content-type": content_type}, end_of_stream)


def response_body(data: bytes, *, end_of_stream: bool) -> Body:
    return Body(Phase.RESPONSE_BODY, data, end_of_stream)


def error_json(message: str, type_: str, code: str, param: str | None = None) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": param,
                                 "code": code}}, separators=(",", ":")).encode()


async def routed(tenant: str = "acme", model: str = "gpt-4o-mini",
                 clock: FakeClock | None = None) -> RequestProcessor:
    """A processor that has accepted headers and body, i.e. the request went upstream."""
    processor = make_processor(clock=clock)
    assert isinstance(await processor.handle(request_headers(tenant)), Continue)
    assert isinstance(await processor.handle(request_body(chat(model))), Continue)
    return processor


def us_tags(processor: RequestProcessor) -> list[tuple[str, str]]:
    return [("x-asc-request-id", processor.request_id), ("x-asc-provider", "prov-us"),
            ("x-asc-region", "us-east-1"), ("x-asc-credential", "cred-us@1")]


def us_metadata(processor: RequestProcessor, **extra: str) -> dict[str, Any]:
    return {"request_id": processor.request_id, "tenant": "acme", "key_id": "acme-1",
            "model": "gpt-4o-mini", "provider": "prov-us", "region": "us-east-1",
            "upstream_model": "gpt-4o-mini", "credential": "cred-us@1", **extra}


# -- request headers --------------------------------------------------------------------


@pytest.mark.parametrize(("method", "path", "shown"), [
    ("POST", "/v1/completions", "POST /v1/completions"),
    ("GET", "/v1/chat/completions", "GET /v1/chat/completions"),
    ("POST", "/v1/chat/completions/extra?x=1", "POST /v1/chat/completions/extra"),
    ("POST", "/v1/models", "POST /v1/models"),
])
async def test_unknown_endpoint_is_404(method: str, path: str, shown: str) -> None:
    processor = make_processor()
    reply = await processor.handle(request_headers(extra={":method": method, ":path": path}))
    message = f"Unknown endpoint: {shown}"
    assert reply == Respond(
        status=404,
        body=error_json(message, "not_found_error", "not_found"),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id)],
        details="asc_not_found",
        metadata={"request_id": processor.request_id, "error": "not_found"},
    )
    assert (processor.status, processor.principal) == (404, None)


async def test_unknown_endpoint_exact_body() -> None:
    reply = await make_processor().handle(request_headers(extra={":path": "/admin"}))
    assert isinstance(reply, Respond)
    assert reply.body == (b'{"error":{"message":"Unknown endpoint: POST /admin",'
                          b'"type":"not_found_error","param":null,"code":"not_found"}}')


async def test_query_string_is_ignored_for_the_endpoint() -> None:
    reply = await make_processor().handle(
        request_headers(extra={":path": "/v1/chat/completions?api-version=1"}))
    assert isinstance(reply, Continue)


@pytest.mark.parametrize("headers", [
    {},
    {"authorization": "Basic dXNlcjpwYXNz"},
    {"authorization": "Bearer "},
    {"x-api-key": " "},
])
async def test_missing_key_is_401(headers: dict[str, str]) -> None:
    processor = make_processor()
    reply = await processor.handle(request_headers(None, extra=headers))
    assert reply == Respond(
        status=401,
        body=error_json(
            "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'.",
            "authentication_error", "invalid_api_key"),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id)],
        details="asc_invalid_api_key",
        metadata={"request_id": processor.request_id, "error": "invalid_api_key"},
    )


@pytest.mark.parametrize("headers", [
    {"authorization": "Bearer sk-not-a-tenant-key"},
    {"x-api-key": "sk-not-a-tenant-key"},
    {"authorization": f"Bearer {PROVIDER_KEY_US}"},
])
async def test_bad_key_is_401(headers: dict[str, str]) -> None:
    processor = make_processor()
    reply = await processor.handle(request_headers(None, extra=headers))
    assert reply == Respond(
        status=401,
        body=error_json("Invalid API key.", "authentication_error", "invalid_api_key"),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id)],
        details="asc_invalid_api_key",
        metadata={"request_id": processor.request_id, "error": "invalid_api_key"},
    )
    assert processor.principal is None


async def test_x_api_key_authenticates() -> None:
    processor = make_processor()
    reply = await processor.handle(request_headers(None, x_api_key=TENANT_KEYS["euco"]))
    assert isinstance(reply, Continue)
    assert processor.principal is not None
    assert (processor.principal.tenant.id, processor.principal.key_id) == ("euco", "euco-1")


async def test_content_length_over_limit_is_413() -> None:
    processor = make_processor()
    reply = await processor.handle(request_headers(content_length=str(LIMIT + 1)))
    assert reply == Respond(
        status=413,
        body=error_json(f"Request body exceeds the limit of {LIMIT} bytes.",
                        "invalid_request_error", "payload_too_large"),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id)],
        details="asc_payload_too_large",
        metadata={"request_id": processor.request_id, "tenant": "acme", "key_id": "acme-1",
                  "error": "payload_too_large"},
    )


async def test_content_length_at_limit_is_accepted() -> None:
    reply = await make_processor().handle(request_headers(content_length=str(LIMIT)))
    assert isinstance(reply, Continue)


async def test_headers_only_request_is_400() -> None:
    processor = make_processor()
    reply = await processor.handle(request_headers(end_of_stream=True))
    assert reply == Respond(
        status=400,
        body=error_json("A JSON request body is required.", "invalid_request_error",
                        "invalid_request"),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id)],
        details="asc_invalid_request",
        metadata={"request_id": processor.request_id, "tenant": "acme", "key_id": "acme-1",
                  "error": "invalid_request"},
    )


async def test_good_headers_strip_credentials_and_gateway_headers() -> None:
    headers = Headers(Phase.REQUEST_HEADERS, {
        ":method": "POST",
        ":path": "/v1/chat/completions",
        ":authority": "gateway.local",
        "authorization": f"Bearer {TENANT_KEYS['acme']}",
        "x-api-key": "sk-other",
        "api-key": "sk-azure-style",
        "proxy-authorization": "Basic abc",
        "content-type": "application/json",
        "content-length": "120",
        "x-asc-cluster": "prov_eu",
        "x-asc-tenant": "globex",
        "x-asc-request-id": "forged",
        "user-agent": "openai-python/1.0",
        "x-request-id": "envoy-id",
    }, False)
    processor = make_processor()
    reply = await processor.handle(headers)
    assert reply == Continue(
        remove_headers=["authorization", "x-api-key", "api-key", "proxy-authorization",
                        "x-asc-cluster", "x-asc-tenant", "x-asc-request-id"],
        request_body_mode=BodyMode.BUFFERED,
    )
    assert processor.status is None
    assert processor.error is None


# -- request body -----------------------------------------------------------------------


async def accepted(tenant: str = "acme", runtime: Runtime = RUNTIME) -> RequestProcessor:
    processor = make_processor(runtime)
    assert isinstance(await processor.handle(request_headers(tenant)), Continue)
    return processor


def acme_error(processor: RequestProcessor, status: int, message: str, type_: str, code: str,
               param: str | None = None, **meta: str) -> Respond:
    return Respond(
        status=status,
        body=error_json(message, type_, code, param),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id)],
        details=f"asc_{code}",
        metadata={"request_id": processor.request_id, "tenant": "acme", "key_id": "acme-1",
                  **meta, "error": code},
    )


async def test_body_without_end_of_stream_is_413() -> None:
    processor = await accepted()
    reply = await processor.handle(request_body(chat(), end_of_stream=False))
    assert reply == acme_error(processor, 413, f"Request body exceeds the limit of {LIMIT} bytes.",
                               "invalid_request_error", "payload_too_large")


async def test_body_over_limit_with_end_of_stream_is_413() -> None:
    processor = await accepted()
    body = json.dumps(chat(pad="x" * LIMIT)).encode()
    reply = await processor.handle(request_body(body))
    assert reply == acme_error(processor, 413, f"Request body exceeds the limit of {LIMIT} bytes.",
                               "invalid_request_error", "payload_too_large")


@pytest.mark.parametrize(("payload", "message", "param"), [
    (b'{"model": "gpt-4o-mini", "messages": [', "The request body is not valid JSON.", None),
    (b"\xff\xfe{}", "The request body is not valid JSON.", None),
    (b"", "A JSON request body is required.", None),
    (b"[1, 2]", "The request body must be a JSON object.", None),
    ({"messages": [{"role": "user", "content": "x"}]}, "'model' must be a non-empty string.",
     "model"),
    ({"model": "", "messages": [{"role": "user", "content": "x"}]},
     "'model' must be a non-empty string.", "model"),
    ({"model": "gpt-4o-mini"}, "'messages' must be a non-empty array.", "messages"),
    ({"model": "gpt-4o-mini", "messages": []}, "'messages' must be a non-empty array.",
     "messages"),
    ({"model": "gpt-4o-mini", "messages": "hi"}, "'messages' must be a non-empty array.",
     "messages"),
    (chat(stream="yes"), "'stream' must be a boolean.", "stream"),
])
async def test_invalid_body_is_400(payload: object, message: str, param: str | None) -> None:
    processor = await accepted()
    reply = await processor.handle(request_body(payload))
    assert reply == acme_error(processor, 400, message, "invalid_request_error",
                               "invalid_request", param)
    assert processor.route is None


async def test_unknown_model_is_404() -> None:
    processor = await accepted()
    reply = await processor.handle(request_body(chat("gpt-5")))
    assert reply == acme_error(processor, 404, "The model 'gpt-5' does not exist.",
                               "not_found_error", "model_not_found", "model", model="gpt-5")


async def test_model_not_allowed_is_403() -> None:
    processor = await accepted()
    reply = await processor.handle(request_body(chat("gpt-4o")))
    assert reply == acme_error(processor, 403, "Your key is not allowed to use the model 'gpt-4o'.",
                               "permission_error", "model_not_allowed", "model", model="gpt-4o")


async def test_good_body_routes_and_injects_the_provider_key() -> None:
    processor = await accepted()
    reply = await processor.handle(request_body(chat(stream=True)))
    assert reply == Continue(
        set_headers=[
            ("x-asc-cluster", "prov_us"),
            (":path", "/v1/chat/completions"),
            ("authorization", f"Bearer {PROVIDER_KEY_US}"),
        ],
        body=None,
        clear_route_cache=True,
        metadata=us_metadata(processor),
    )
    assert processor.streaming is True
    assert processor.route is not None
    assert processor.route.reason == "first deployment"


async def test_residency_routes_eu_tenant_to_eu_and_rewrites_the_model() -> None:
    processor = await accepted("euco")
    reply = await processor.handle(request_body(chat(temperature=0.5)))
    body = ('{"model":"gpt-4o-mini-eu","messages":[{"role":"user","content":"h\u00e9llo"}],'
            '"temperature":0.5}').encode()
    assert reply == Continue(
        set_headers=[
            ("x-asc-cluster", "prov_eu"),
            (":path", "/openai/v1/chat/completions"),
            ("authorization", f"Bearer {PROVIDER_KEY_EU}"),
            ("content-length", str(len(body))),
        ],
        body=body,
        clear_route_cache=True,
        metadata={"request_id": processor.request_id, "tenant": "euco", "key_id": "euco-1",
                  "model": "gpt-4o-mini", "provider": "prov-eu", "region": "eu-west-1",
                  "upstream_model": "gpt-4o-mini-eu", "credential": "cred-eu@1"},
    )
    assert processor.streaming is False
    assert processor.route is not None
    assert processor.route.reason == "zone eu: first deployment"


async def test_pin_is_honoured() -> None:
    processor = await accepted("pinned")
    reply = await processor.handle(request_body(chat()))
    assert isinstance(reply, Continue)
    assert reply.set_headers[:2] == [("x-asc-cluster", "prov_eu"),
                                     (":path", "/openai/v1/chat/completions")]
    assert processor.route is not None
    assert (processor.route.provider.name, processor.route.reason) == ("prov-eu",
                                                                       "pinned to prov-eu")
    other = await accepted("pinned")
    reply = await other.handle(request_body(chat("gpt-4o")))
    assert isinstance(reply, Continue)
    assert reply.set_headers[0] == ("x-asc-cluster", "prov_us")
    assert reply.body is None


async def test_body_before_headers_is_500() -> None:
    processor = make_processor()
    reply = await processor.handle(request_body(chat()))
    assert reply == Respond(
        status=500,
        body=error_json("Request body before headers.", "server_error", "internal_error"),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id)],
        details="asc_internal_error",
        metadata={"request_id": processor.request_id, "error": "internal_error"},
    )


async def test_missing_provider_credential_is_503(caplog: pytest.LogCaptureFixture) -> None:
    config = RUNTIME.config
    runtime = Runtime(config=config, tenants=RUNTIME.tenants, keys=StaticKeyProvider({}))
    processor = await accepted(runtime=runtime)
    with caplog.at_level(logging.ERROR, logger="extproc.request"):
        reply = await processor.handle(request_body(chat()))
    assert reply == Respond(
        status=503,
        body=error_json("No usable credential for the selected provider.",
                        "service_unavailable", "gateway_unavailable"),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id),
                 ("x-asc-provider", "prov-us"), ("x-asc-region", "us-east-1")],
        details="asc_gateway_unavailable",
        metadata={"request_id": processor.request_id, "tenant": "acme", "key_id": "acme-1",
                  "model": "gpt-4o-mini", "provider": "prov-us", "region": "us-east-1",
                  "upstream_model": "gpt-4o-mini", "error": "gateway_unavailable"},
    )
    [record] = caplog.records
    assert record.getMessage() == "provider credential unavailable"
    assert fields_of(record) == {"request_id": processor.request_id, "provider": "prov-us"}


class ExplodingKeys:
    """A key source failing in a way the processor does not expect."""

    def credential(self, credential_id: str) -> ResolvedCredential:
        raise RuntimeError(f"vault said no for {credential_id}: {PROVIDER_KEY_US}")


async def test_unexpected_exception_is_500_without_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = Runtime(config=RUNTIME.config, tenants=RUNTIME.tenants, keys=ExplodingKeys())
    processor = await accepted(runtime=runtime)
    with caplog.at_level(logging.ERROR, logger="extproc.request"):
        reply = await processor.handle(request_body(chat()))
    assert isinstance(reply, Respond)
    assert reply.status == 500
    assert reply.body == error_json(
        f"Internal gateway error (request id {processor.request_id}).",
        "server_error", "internal_error")
    [record] = caplog.records
    line = JsonFormatter().format(record)
    assert json.loads(line)["exc_type"] == "RuntimeError"
    assert PROVIDER_KEY_US not in line
    assert "vault said no" not in line


async def test_trailers_continue_unchanged() -> None:
    processor = make_processor()
    assert await processor.handle(Trailers(Phase.REQUEST_TRAILERS)) == Continue()
    assert await processor.handle(Trailers(Phase.RESPONSE_TRAILERS)) == Continue()


# -- response headers -------------------------------------------------------------------


async def test_json_200_is_tagged_and_buffered() -> None:
    processor = await routed()
    reply = await processor.handle(response_headers("200", "application/json; charset=utf-8"))
    assert reply == Continue(set_headers=us_tags(processor),
                             response_body_mode=BodyMode.BUFFERED)
    assert (processor.status, processor.upstream_status) == (200, 200)


async def test_event_stream_is_streamed() -> None:
    processor = await routed()
    reply = await processor.handle(response_headers("200", "text/event-stream; charset=utf-8"))
    assert reply == Continue(set_headers=us_tags(processor),
                             response_body_mode=BodyMode.STREAMED)


async def test_headers_only_response_is_tagged_only() -> None:
    processor = await routed()
    reply = await processor.handle(response_headers("200", end_of_stream=True))
    assert reply == Continue(set_headers=us_tags(processor))


async def test_provider_5xx_is_502() -> None:
    processor = await routed()
    reply = await processor.handle(response_headers("500"))
    assert reply == Respond(
        status=502,
        body=error_json("The provider failed with status 500.", "upstream_error",
                        "provider_error"),
        headers=[JSON_CT, *us_tags(processor)],
        details="asc_provider_error",
        metadata=us_metadata(processor, error="provider_error"),
    )
    assert (processor.status, processor.upstream_status) == (502, 500)


@pytest.mark.parametrize("status", ["401", "403"])
async def test_provider_auth_failure_is_502(status: str) -> None:
    processor = await routed()
    reply = await processor.handle(response_headers(status))
    assert reply == Respond(
        status=502,
        body=error_json("The provider rejected the gateway's credential.", "upstream_error",
                        "provider_error"),
        headers=[JSON_CT, *us_tags(processor)],
        details="asc_provider_error",
        metadata=us_metadata(processor, error="provider_error"),
    )
    assert processor.upstream_status == int(status)


@pytest.mark.parametrize("status", ["400", "422", "429"])
async def test_provider_json_4xx_passes_through(status: str) -> None:
    processor = await routed()
    reply = await processor.handle(response_headers(status))
    assert reply == Continue(set_headers=us_tags(processor))
    assert processor.status == int(status)


async def test_provider_non_json_404_is_502() -> None:
    processor = await routed()
    reply = await processor.handle(response_headers("404", "text/html"))
    assert reply == Respond(
        status=502,
        body=error_json("The provider failed with status 404.", "upstream_error",
                        "provider_error"),
        headers=[JSON_CT, *us_tags(processor)],
        details="asc_provider_error",
        metadata=us_metadata(processor, error="provider_error"),
    )


async def test_missing_status_counts_as_502() -> None:
    processor = await routed()
    reply = await processor.handle(Headers(Phase.RESPONSE_HEADERS, {}, False))
    assert isinstance(reply, Respond)
    assert reply.body == error_json("The provider failed with status 502.", "upstream_error",
                                    "provider_error")


async def test_envoy_local_reply_is_only_tagged() -> None:
    """No route was chosen (the request was refused earlier): tag, never judge."""
    processor = make_processor()
    await processor.handle(request_headers(None))
    reply = await processor.handle(response_headers("401"))
    assert reply == Continue(set_headers=[("x-asc-request-id", processor.request_id)])


# -- response body ----------------------------------------------------------------------


async def test_buffered_usage_is_read() -> None:
    processor = await routed()
    await processor.handle(response_headers("200"))
    document = json.dumps({"id": "c1", "choices": [],
                           "usage": {"prompt_tokens": 12, "completion_tokens": 34,
                                     "total_tokens": 46}}).encode()
    assert await processor.handle(response_body(document[:20], end_of_stream=False)) == Continue()
    assert usage_of(processor) is None
    # 12 x 0.15 + 34 x 0.60 USD per Mtok, each rounded up to a micro-USD: 2 + 21.
    assert await processor.handle(response_body(document[20:], end_of_stream=True)) == Continue(
        set_headers=[("x-asc-cost-usd", "0.000023")])
    assert processor.usage == Usage(prompt_tokens=12, completion_tokens=34)


@pytest.mark.parametrize("document", [
    b"not json",
    b"[]",
    b'{"usage": null}',
    b'{"usage": {"prompt_tokens": "12", "completion_tokens": 3}}',
])
async def test_buffered_body_without_usage(document: bytes) -> None:
    processor = await routed()
    await processor.handle(response_headers("200"))
    await processor.handle(response_body(document, end_of_stream=True))
    assert processor.usage is None


async def test_negative_usage_is_clamped() -> None:
    processor = await routed()
    await processor.handle(response_headers("200"))
    await processor.handle(response_body(
        b'{"usage": {"prompt_tokens": -5, "completion_tokens": 7}}', end_of_stream=True))
    assert processor.usage == Usage(prompt_tokens=0, completion_tokens=7)


async def test_streamed_usage_split_across_two_messages() -> None:
    processor = await routed()
    await processor.handle(response_headers("200", "text/event-stream"))
    stream = (
        b'data: {"id":"c1","choices":[{"delta":{"content":"hi"}}]}\n\n'
        b'data: {"id":"c1","choices":[],"usage":{"prompt_tokens":9,"completion_tokens":21}}\n\n'
        b"data: [DONE]\n\n"
    )
    cut = stream.index(b'"completion_tokens"')
    assert await processor.handle(response_body(stream[:cut], end_of_stream=False)) == Continue()
    assert usage_of(processor) is None
    assert await processor.handle(response_body(stream[cut:], end_of_stream=False)) == Continue()
    assert usage_of(processor) == Usage(prompt_tokens=9, completion_tokens=21)
    assert await processor.handle(response_body(b"", end_of_stream=True)) == Continue()
    assert processor.usage == Usage(prompt_tokens=9, completion_tokens=21)


async def test_streamed_usage_in_unterminated_last_event() -> None:
    processor = await routed()
    await processor.handle(response_headers("200", "text/event-stream"))
    await processor.handle(response_body(
        b'data: {"usage":{"prompt_tokens":1,', end_of_stream=False))
    await processor.handle(response_body(b'"completion_tokens":2}}', end_of_stream=True))
    assert processor.usage == Usage(prompt_tokens=1, completion_tokens=2)


# -- finish and the request log line ----------------------------------------------------


def requests_total(tenant: str, provider: str, region: str, model: str, status: str) -> float:
    value = REGISTRY.get_sample_value("asc_requests_total", {
        "tenant": tenant, "provider": provider, "region": region, "model": model,
        "status": status})
    return value or 0.0


async def test_finish_twice_records_once(caplog: pytest.LogCaptureFixture) -> None:
    processor = await routed()  # upstream never answered: the request was aborted
    before = requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", "aborted")
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
        await processor.finish()
    after = requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", "aborted")
    assert after - before == 1.0
    assert [r.getMessage() for r in caplog.records] == ["request finished"]
    assert fields_of(caplog.records[0])["aborted"] is True


async def test_response_cut_short_is_aborted(caplog: pytest.LogCaptureFixture) -> None:
    processor = await routed()
    await processor.handle(response_headers("200"))
    await processor.handle(response_body(b'{"id":', end_of_stream=False))
    before = requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", "aborted")
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    assert requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", "aborted") - before == 1
    assert fields_of(caplog.records[0])["aborted"] is True
    assert fields_of(caplog.records[0])["status"] == 200


@pytest.mark.parametrize(("status", "content_type", "end_of_stream", "outcome"), [
    ("200", "application/json", True, "200"),      # headers-only response
    ("400", "application/json", False, "400"),     # passed through, body not watched
    ("200", "text/plain", False, "200"),           # body not watched
    ("500", "application/json", False, "502"),     # replaced by our error
])
async def test_response_outcome_without_watched_body(
    status: str, content_type: str, end_of_stream: bool, outcome: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    processor = await routed()
    await processor.handle(response_headers(status, content_type, end_of_stream=end_of_stream))
    before = requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", outcome)
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    assert requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", outcome) - before == 1
    assert fields_of(caplog.records[0])["aborted"] is False


async def test_refused_request_records_the_error_status(
    caplog: pytest.LogCaptureFixture,
) -> None:
    processor = make_processor()
    await processor.handle(request_headers(None))
    before = requests_total("-", "-", "-", "-", "401")
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    assert requests_total("-", "-", "-", "-", "401") - before == 1.0
    [record] = caplog.records
    fields = fields_of(record)
    assert (fields["status"], fields["error"], fields["aborted"]) == (401, "invalid_api_key", False)


async def test_request_log_line_has_exact_fields(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock(100.0)
    processor = await routed(clock=clock)
    await processor.handle(response_headers("200"))
    clock.now = 100.25
    await processor.handle(response_body(
        b'{"usage":{"prompt_tokens":3,"completion_tokens":4}}', end_of_stream=True))
    clock.now = 101.5
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    [record] = caplog.records
    assert fields_of(record) == {
        "request_id": processor.request_id,
        "tenant": "acme",
        "key_id": "acme-1",
        "model": "gpt-4o-mini",
        "provider": "prov-us",
        "region": "us-east-1",
        "upstream_model": "gpt-4o-mini",
        "route_reason": "first deployment",
        "credential": "cred-us@1",
        "status": 200,
        "upstream_status": 200,
        "error": None,
        "aborted": False,
        "stream": False,
        "charged_micro_usd": None,
        "estimated_input_tokens": None,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "duration_ms": 1500.0,
    }


async def test_no_key_ever_reaches_a_log_line_or_a_client(
    caplog: pytest.LogCaptureFixture,
) -> None:
    outputs: list[bytes] = []
    with caplog.at_level(logging.DEBUG):
        for tenant in ("acme", "euco", "pinned"):
            for status, content_type in (("200", "application/json"), ("401", "application/json"),
                                         ("500", "text/plain"), ("200", "text/event-stream")):
                processor = await routed(tenant)
                reply = await processor.handle(response_headers(status, content_type))
                outputs.append(repr(reply).encode())
                await processor.handle(response_body(
                    b'data: {"usage":{"prompt_tokens":1,"completion_tokens":1}}\n\n',
                    end_of_stream=True))
                await processor.finish()
        refused = make_processor()
        outputs.append(repr(await refused.handle(
            request_headers(None, authorization=f"Bearer {TENANT_KEYS['acme']}x"))).encode())
        await refused.finish()
        late = await accepted("acme")
        outputs.append(repr(await late.handle(request_body(chat("gpt-4o")))).encode())
        await late.finish()
    formatter = JsonFormatter()
    lines = [formatter.format(record) for record in caplog.records]
    assert sum(1 for r in caplog.records if r.getMessage() == "request finished") == 14
    secrets = [PROVIDER_KEY_US, PROVIDER_KEY_EU, PEPPER, *TENANT_KEYS.values(), "canary"]
    for text in [*lines, caplog.text, *(o.decode() for o in outputs)]:
        for secret in secrets:
            assert secret not in text
