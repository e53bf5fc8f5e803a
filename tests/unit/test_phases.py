"""The per-request processor (`extproc.phases.RequestProcessor`), driven with plain messages.

No Envoy, no sockets: each test feeds `Headers` / `Body` values to one processor built
from a small inline config and asserts the exact `Continue` / `Respond` it returns.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

import pytest
from prometheus_client import REGISTRY

from extproc.auth import hash_key
from extproc.budgets.guard import Hold
from extproc.config import Provider, Tenant, parse_config
from extproc.credentials import StaticKeyProvider
from extproc.credentials.pools import CredentialPool
from extproc.credentials.selection import ProviderKeys, Selected
from extproc.errors import Dialect, ErrorCode
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
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from extproc.secrets import Secret
from extproc.translate.base import Usage

PEPPER = "pepper-phases-tests"
PROVIDER_KEY_US = "sk-canary-provider-XYZ"
PROVIDER_KEY_EU = "sk-canary-provider-EU-XYZ"
PROVIDER_KEY_AZ = "canary-azure-provider-key-XYZ"
TENANT_KEYS = {
    "acme": "sk-canary-tenant-acme-XYZ",
    "euco": "sk-canary-tenant-euco-XYZ",
    "pinned": "sk-canary-tenant-pinned-XYZ",
    "azco": "sk-canary-tenant-azco-XYZ",
}
ENVIRON = {"ASC_PEPPER": PEPPER, "KEY_US": PROVIDER_KEY_US, "KEY_EU": PROVIDER_KEY_EU,
           "KEY_AZ": PROVIDER_KEY_AZ}
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
  cred-az: {{env: KEY_AZ}}
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
  prov-az:
    kind: azure
    base_url: "https://acme-res.openai.azure.com"
    region: eastus
    zone: us
    cluster: prov_az
    credentials: [cred-az]
    api_version: "2024-06-01"
  prov-az-default:
    kind: azure
    base_url: "https://acme-res2.openai.azure.com/proxy"
    region: westus
    zone: us
    cluster: prov_az_default
    credentials: [cred-az]
models:
  gpt-4o-mini:
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.60}}
    deployments:
      - {{provider: prov-us}}
      - {{provider: prov-eu, model: gpt-4o-mini-eu}}
  gpt-4o:
    price: {{input_per_mtok: 2.5, output_per_mtok: 10, cached_input_per_mtok: 1.25}}
    deployments: [{{provider: prov-us}}]
  gpt-4o-az:
    price: {{input_per_mtok: 2.5, output_per_mtok: 10}}
    deployments: [{{provider: prov-az, model: gpt4o-prod}}]
  gpt-4o-az-default:
    price: {{input_per_mtok: 2.5, output_per_mtok: 10}}
    deployments: [{{provider: prov-az-default, model: gpt4o-dev}}]
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
  azco:
    keys: [{{id: azco-1, hash: "{_hash("azco")}"}}]
    models: [gpt-4o-az, gpt-4o-az-default]
"""

PARSED = parse_config(CONFIG)


def fresh_runtime() -> Runtime:
    """A runtime of its own: the key pools learn from provider answers (three 401s open a
    key), so processors that do not share a runtime do not share that health either."""
    return Runtime.build(PARSED, environ=ENVIRON)


RUNTIME = fresh_runtime()


class FakeClock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_processor(runtime: Runtime | None = None,
                   clock: FakeClock | None = None) -> RequestProcessor:
    return RequestProcessor(runtime or fresh_runtime(), clock=clock or FakeClock())


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
        "openai-organization": "org-client",
        "openai-project": "proj_client",
        "anthropic-version": "2023-06-01",
        "openai-beta": "assistants=v2",
    }, False)
    processor = make_processor()
    reply = await processor.handle(headers)
    assert reply == Continue(
        remove_headers=["authorization", "x-api-key", "api-key", "proxy-authorization",
                        "x-asc-cluster", "x-asc-tenant", "x-asc-request-id",
                        "openai-organization", "openai-project", "anthropic-version"],
        request_body_mode=BodyMode.BUFFERED,
        clear_route_cache=True,
    )
    assert processor.status is None
    assert processor.error is None
    assert processor.dialect is Dialect.OPENAI


async def test_openai_organization_header_alone_is_stripped() -> None:
    """The client's organization would bill the gateway's key to another OpenAI org."""
    processor = make_processor()
    reply = await processor.handle(request_headers(extra={"openai-organization": "org-evil"}))
    assert reply == Continue(remove_headers=["authorization", "openai-organization"],
                             request_body_mode=BodyMode.BUFFERED, clear_route_cache=True)


# -- request body -----------------------------------------------------------------------


async def accepted(tenant: str = "acme", runtime: Runtime | None = None) -> RequestProcessor:
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


async def test_body_cut_short_without_end_of_stream_is_413() -> None:
    processor = await accepted()
    reply = await processor.handle(request_body(b"x" * (LIMIT + 1), end_of_stream=False))
    assert reply == acme_error(processor, 413, f"Request body exceeds the limit of {LIMIT} bytes.",
                               "invalid_request_error", "payload_too_large")


async def test_whole_body_without_end_of_stream_means_trailers_and_is_400() -> None:
    processor = await accepted()
    reply = await processor.handle(request_body(chat(), end_of_stream=False))
    assert reply == acme_error(processor, 400, "Request trailers are not supported.",
                               "invalid_request_error", "invalid_request")
    assert processor.route is None


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
    # A stream always asks for usage so the gateway can bill it.
    body = ('{"model":"gpt-4o-mini","messages":[{"role":"user","content":"h\u00e9llo"}],'
            '"stream":true,"stream_options":{"include_usage":true}}').encode()
    assert reply == Continue(
        set_headers=[
            ("x-asc-cluster", "prov_us"),
            (":path", "/v1/chat/completions"),
            ("authorization", f"Bearer {PROVIDER_KEY_US}"),
            ("content-length", str(len(body))),
        ],
        body=body,
        clear_route_cache=True,
        metadata=us_metadata(processor),
    )
    assert processor.streaming is True
    assert processor.dialect is Dialect.OPENAI
    assert processor.route is not None
    assert processor.route.reason == "first in order prov-us"


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
    assert processor.route.reason == "first in order prov-eu"


async def test_pin_is_honoured() -> None:
    processor = await accepted("pinned")
    reply = await processor.handle(request_body(chat()))
    assert isinstance(reply, Continue)
    assert reply.set_headers[:2] == [("x-asc-cluster", "prov_eu"),
                                     (":path", "/openai/v1/chat/completions")]
    assert processor.route is not None
    assert (processor.route.provider.name, processor.route.reason) == ("prov-eu",
                                                                       "pinned to prov-eu")
    assert reply.body == ('{"model":"gpt-4o-mini-eu","messages":[{"role":"user",'
                          '"content":"h\u00e9llo"}]}').encode()
    other = await accepted("pinned")
    reply = await other.handle(request_body(chat("gpt-4o")))
    assert isinstance(reply, Continue)
    assert reply.set_headers[:2] == [("x-asc-cluster", "prov_us"),
                                     (":path", "/v1/chat/completions")]
    # The body is always the translator's output, even when nothing had to change.
    assert reply.body == ('{"model":"gpt-4o","messages":[{"role":"user",'
                          '"content":"h\u00e9llo"}]}').encode()


def azco_metadata(processor: RequestProcessor, model: str, provider: str, region: str,
                  upstream_model: str) -> dict[str, Any]:
    return {"request_id": processor.request_id, "tenant": "azco", "key_id": "azco-1",
            "model": model, "provider": provider, "region": region,
            "upstream_model": upstream_model, "credential": "cred-az@1"}


async def test_azure_gets_the_deployment_path_and_an_api_key_header() -> None:
    processor = await accepted("azco")
    reply = await processor.handle(request_body(chat("gpt-4o-az", stream=True)))
    # Azure names the deployment in the path, so the body carries no model.
    body = ('{"messages":[{"role":"user","content":"h\u00e9llo"}],"stream":true,'
            '"stream_options":{"include_usage":true}}').encode()
    assert reply == Continue(
        set_headers=[
            ("x-asc-cluster", "prov_az"),
            (":path", "/openai/deployments/gpt4o-prod/chat/completions?api-version=2024-06-01"),
            ("api-key", PROVIDER_KEY_AZ),
            ("content-length", str(len(body))),
        ],
        body=body,
        clear_route_cache=True,
        metadata=azco_metadata(processor, "gpt-4o-az", "prov-az", "eastus", "gpt4o-prod"),
    )


async def test_azure_without_api_version_uses_the_default_behind_the_path_prefix() -> None:
    processor = await accepted("azco")
    reply = await processor.handle(request_body(chat("gpt-4o-az-default", temperature=0)))
    body = '{"messages":[{"role":"user","content":"h\u00e9llo"}],"temperature":0}'.encode()
    assert reply == Continue(
        set_headers=[
            ("x-asc-cluster", "prov_az_default"),
            (":path",
             "/proxy/openai/deployments/gpt4o-dev/chat/completions?api-version=2024-10-21"),
            ("api-key", PROVIDER_KEY_AZ),
            ("content-length", str(len(body))),
        ],
        body=body,
        clear_route_cache=True,
        metadata=azco_metadata(processor, "gpt-4o-az-default", "prov-az-default", "westus",
                               "gpt4o-dev"),
    )


async def test_azure_response_is_tagged_and_its_usage_billed() -> None:
    processor = await accepted("azco")
    await processor.handle(request_body(chat("gpt-4o-az")))
    reply = await processor.handle(response_headers("200"))
    assert reply == Continue(
        set_headers=[("x-asc-request-id", processor.request_id), ("x-asc-provider", "prov-az"),
                     ("x-asc-region", "eastus"), ("x-asc-credential", "cred-az@1")],
        remove_headers=["content-length"],
        response_body_mode=BodyMode.BUFFERED_PARTIAL)
    reply = await processor.handle(response_body(
        b'{"usage":{"prompt_tokens":100,"completion_tokens":10}}', end_of_stream=True))
    # 100 x 2.5 + 10 x 10 micro-USD.
    assert reply == Continue(set_headers=[("x-asc-cost-usd", "0.000350")])
    assert processor.usage == Usage(100, 10)


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
    keys = ProviderKeys(PARSED.credentials, StaticKeyProvider({}), None, CredentialPool())
    runtime = Runtime(config=PARSED, tenants=RUNTIME.tenants, keys=keys)
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
    assert fields_of(record) == {"request_id": processor.request_id, "provider": "prov-us",
                                 "reason": "credential 'cred-us' is not loaded"}


class ExplodingKeys:
    """A key source failing in a way the processor does not expect."""

    async def for_request(self, provider: Provider, tenant: Tenant,
                          bucket: int) -> Selected | None:
        raise RuntimeError(f"vault said no for {provider.name}: {PROVIDER_KEY_US}")

    async def report(self, selected: Selected, status: int) -> None:
        raise AssertionError("no key was selected")


async def test_unexpected_exception_is_500_without_details(
    caplog: pytest.LogCaptureFixture,
) -> None:
    runtime = Runtime(config=PARSED, tenants=RUNTIME.tenants,
                      keys=ExplodingKeys())  # type: ignore[arg-type]
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


async def test_request_trailers_without_a_body_decision_are_400() -> None:
    """h2: HEADERS, then a trailers-only HEADERS frame; no body ever reached the service."""
    processor = await accepted()
    reply = await processor.handle(Trailers(Phase.REQUEST_TRAILERS))
    assert reply == acme_error(processor, 400, "A JSON request body is required.",
                               "invalid_request_error", "invalid_request")


async def test_trailers_after_the_decision_continue_unchanged() -> None:
    processor = await routed()
    assert await processor.handle(Trailers(Phase.REQUEST_TRAILERS)) == Continue()
    assert await processor.handle(Trailers(Phase.RESPONSE_TRAILERS)) == Continue()


# -- response headers -------------------------------------------------------------------


async def test_json_200_is_tagged_and_buffered() -> None:
    processor = await routed()
    reply = await processor.handle(response_headers("200", "application/json; charset=utf-8"))
    assert reply == Continue(set_headers=us_tags(processor),
                             remove_headers=["content-length"],
                             response_body_mode=BodyMode.BUFFERED_PARTIAL)
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


async def test_other_content_type_passes_through_unwatched() -> None:
    processor = await routed()
    reply = await processor.handle(response_headers("200", "text/plain"))
    assert reply == Continue(set_headers=us_tags(processor))


def provider_error(processor: RequestProcessor, upstream: int, status: int, message: str,
                   type_: str, code: str,
                   extra_headers: tuple[tuple[str, str], ...] = ()) -> Respond:
    """The reply replacing a provider error from prov-us, in the OpenAI dialect."""
    return Respond(
        status=status,
        body=error_json(message, type_, code),
        headers=[JSON_CT, *us_tags(processor), *extra_headers],
        details=f"asc_provider_status_{upstream}",
        metadata=us_metadata(processor, error=code),
    )


async def provider_answers(processor: RequestProcessor, status: str, body: bytes,
                           content_type: str = "application/json",
                           **extra: str) -> Continue | Respond:
    """Feed an upstream error: its headers must ask for the whole body, which is answered."""
    headers = {":status": status, "content-type": content_type,
               **{k.replace("_", "-"): v for k, v in extra.items()}}
    reply = await processor.handle(Headers(Phase.RESPONSE_HEADERS, headers, False))
    assert reply == Continue(response_body_mode=BodyMode.BUFFERED_PARTIAL)
    return await processor.handle(response_body(body, end_of_stream=True))


async def test_provider_5xx_is_502() -> None:
    processor = await routed()
    reply = await provider_answers(processor, "500",
                                   error_json("boom at shard 7", "server_error", "internal"))
    assert reply == provider_error(processor, 500, 502, "The provider failed with status 500.",
                                   "upstream_error", "provider_error")
    assert (processor.status, processor.upstream_status) == (502, 500)
    assert processor.error is ErrorCode.PROVIDER_ERROR


async def test_provider_error_body_over_the_limit_is_answered_from_its_first_part() -> None:
    # BUFFERED_PARTIAL hands over an error body longer than max_response_bytes cut short,
    # without end_of_stream: it is answered from what arrived (decision 0055).
    processor = await routed()
    await processor.handle(response_headers("400"))
    limit = processor._config.limits.max_response_bytes
    document = error_json("Invalid 'messages[0].role'." + " " * limit, "invalid_request_error",
                          "bad")
    reply = await processor.handle(response_body(document[:limit + 1], end_of_stream=False))
    assert isinstance(reply, Respond)
    assert (reply.status, processor.upstream_status, processor.error) == (
        502, 400, ErrorCode.PROVIDER_ERROR)
    assert json.loads(reply.body)["error"]["message"] == "The provider failed with status 400."


async def test_headers_only_provider_error_is_answered_at_once() -> None:
    processor = await routed()
    reply = await processor.handle(response_headers("503", end_of_stream=True))
    assert reply == provider_error(processor, 503, 502, "The provider failed with status 503.",
                                   "upstream_error", "provider_error")
    assert (processor.status, processor.upstream_status) == (502, 503)


@pytest.mark.parametrize("status", ["401", "403"])
async def test_provider_auth_failure_is_502(status: str) -> None:
    processor = await routed()
    # The provider's message names (part of) the gateway's key: it never reaches the client.
    reply = await provider_answers(processor, status, error_json(
        "Incorrect API key provided: sk-canar*************-XYZ.", "invalid_request_error",
        "invalid_api_key"))
    assert reply == provider_error(processor, int(status), 502,
                                   "The provider rejected the gateway's credential.",
                                   "upstream_error", "provider_error")
    assert processor.upstream_status == int(status)


@pytest.mark.parametrize("status", ["400", "422"])
async def test_provider_invalid_request_keeps_the_provider_message(status: str) -> None:
    processor = await routed()
    reply = await provider_answers(processor, status, error_json(
        "Unrecognized request argument supplied: foo", "invalid_request_error", None))
    assert reply == provider_error(processor, int(status), 400,
                                   "Unrecognized request argument supplied: foo",
                                   "invalid_request_error", "invalid_request")
    assert (processor.status, processor.error) == (400, ErrorCode.INVALID_REQUEST)


async def test_mistral_style_422_detail_becomes_the_message() -> None:
    processor = await routed()
    reply = await provider_answers(processor, "422", json.dumps({"object": "error", "message": {
        "detail": [{"loc": ["body", "user"], "msg": "Extra inputs are not permitted"}]}}
    ).encode())
    assert reply == provider_error(processor, 422, 400,
                                   "body.user: Extra inputs are not permitted",
                                   "invalid_request_error", "invalid_request")


async def test_provider_json_error_without_message_gets_the_fallback() -> None:
    processor = await routed()
    reply = await provider_answers(processor, "400", b"{}")
    assert reply == provider_error(processor, 400, 400, "The provider rejected the request.",
                                   "invalid_request_error", "invalid_request")


async def test_provider_429_hides_the_shared_account_and_keeps_retry_after() -> None:
    processor = await routed()
    reply = await provider_answers(processor, "429", error_json(
        "Rate limit reached for key sk-proj-abcdefgh1234 in organization org-xyz: "
        "Limit 3, Used 3, Requested 1.",
        "requests", "rate_limit_exceeded"), retry_after="7")
    assert reply == provider_error(
        processor, 429, 429, "The provider's rate limit was reached; retry later.",
        "rate_limit_error", "rate_limited", extra_headers=(("retry-after", "7"),))
    assert processor.error is ErrorCode.RATE_LIMITED


@pytest.mark.parametrize(("upstream", "said", "status", "message", "type_", "code"), [
    ("404", "The model 'gpt-4o-mini' does not exist", 404,
     "The model 'gpt-4o-mini' does not exist", "not_found_error", "not_found"),
    ("413", "Request too large for gpt-4o-mini", 413, "Request too large for gpt-4o-mini",
     "invalid_request_error", "payload_too_large"),
    ("529", "Overloaded", 503, "The provider is overloaded; retry later.",
     "service_unavailable", "gateway_unavailable"),
    ("409", "Conflict", 502, "The provider failed with status 409.", "upstream_error",
     "provider_error"),
])
async def test_provider_json_errors_are_mapped(upstream: str, said: str, status: int,
                                               message: str, type_: str, code: str) -> None:
    processor = await routed()
    reply = await provider_answers(processor, upstream,
                                   error_json(said, "invalid_request_error", "whatever"))
    assert reply == provider_error(processor, int(upstream), status, message, type_, code)
    assert processor.error is not None
    assert (processor.status, processor.error.value) == (status, code)


async def test_provider_non_json_404_is_502() -> None:
    processor = await routed()
    reply = await provider_answers(processor, "404", b"<html><body>Not Found</body></html>",
                                   "text/html")
    assert reply == provider_error(processor, 404, 502, "The provider failed with status 404.",
                                   "upstream_error", "provider_error")


async def test_missing_status_counts_as_502() -> None:
    processor = await routed()
    reply = await processor.handle(Headers(Phase.RESPONSE_HEADERS, {}, False))
    assert reply == Continue(response_body_mode=BodyMode.BUFFERED_PARTIAL)
    assert processor.upstream_status == 502
    reply = await processor.handle(response_body(b"upstream reset", end_of_stream=True))
    assert reply == provider_error(processor, 502, 502, "The provider failed with status 502.",
                                   "upstream_error", "provider_error")


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
    # 12 x 0.15 + 34 x 0.60 USD per Mtok, each rounded up to a micro-USD: 2 + 21.
    # The body passes through unchanged, so only the cost header is set.
    assert await processor.handle(response_body(document, end_of_stream=True)) == Continue(
        set_headers=[("x-asc-cost-usd", "0.000023")])
    assert processor.usage == Usage(input_tokens=12, output_tokens=34)


async def test_a_body_without_end_of_stream_is_never_read_as_whole() -> None:
    # Envoy omits end_of_stream for a cut body, or when trailers follow (no provider sends
    # them with JSON); with an Envoy rendered for a smaller max_response_bytes than the
    # service's, a cut body can be shorter than the service's limit. Never bill or pass it.
    processor = await routed()
    await processor.handle(response_headers("200"))
    document = json.dumps({"id": "c1", "choices": [],
                           "usage": {"prompt_tokens": 12, "completion_tokens": 34}}).encode()
    reply = await processor.handle(response_body(document, end_of_stream=False))
    assert isinstance(reply, Respond)
    assert (reply.status, processor.error) == (502, ErrorCode.RESPONSE_TOO_LARGE)
    assert processor.usage is None


@pytest.mark.parametrize("document", [
    b"not json",
    b"[]",
    b'{"usage": null}',
    b'{"usage": {"prompt_tokens": "12", "completion_tokens": 3}}',
])
async def test_buffered_body_without_usage(document: bytes) -> None:
    processor = await routed()
    await processor.handle(response_headers("200"))
    reply = await processor.handle(response_body(document, end_of_stream=True))
    assert reply == Continue()
    assert processor.usage is None


async def test_negative_usage_is_clamped() -> None:
    processor = await routed()
    await processor.handle(response_headers("200"))
    reply = await processor.handle(response_body(
        b'{"usage": {"prompt_tokens": -5, "completion_tokens": 7}}', end_of_stream=True))
    # 7 x 0.60 micro-USD, rounded up.
    assert reply == Continue(set_headers=[("x-asc-cost-usd", "0.000005")])
    assert processor.usage == Usage(input_tokens=0, output_tokens=7)


async def test_cached_prompt_tokens_are_billed_at_the_cached_price() -> None:
    processor = await routed("pinned", "gpt-4o")
    await processor.handle(response_headers("200"))
    reply = await processor.handle(response_body(json.dumps({"usage": {
        "prompt_tokens": 1000, "completion_tokens": 200,
        "prompt_tokens_details": {"cached_tokens": 600}}}).encode(), end_of_stream=True))
    # 400 uncached x 2.5 + 600 cached x 1.25 + 200 x 10 = 1000 + 750 + 2000 micro-USD
    # (4500 if the cached part were billed at the full input price).
    assert reply == Continue(set_headers=[("x-asc-cost-usd", "0.003750")])
    assert processor.usage == Usage(input_tokens=1000, output_tokens=200,
                                    cached_input_tokens=600)


async def test_each_cost_part_is_rounded_up_separately() -> None:
    processor = await routed("pinned", "gpt-4o")
    await processor.handle(response_headers("200"))
    reply = await processor.handle(response_body(
        b'{"usage":{"prompt_tokens":3,"completion_tokens":1,'
        b'"prompt_tokens_details":{"cached_tokens":1}}}', end_of_stream=True))
    # 2 x 2.5 = 5, 1 x 1.25 -> 2, 1 x 10 = 10.
    assert reply == Continue(set_headers=[("x-asc-cost-usd", "0.000017")])


async def test_cached_tokens_above_the_prompt_are_capped() -> None:
    processor = await routed("pinned", "gpt-4o")
    await processor.handle(response_headers("200"))
    reply = await processor.handle(response_body(
        b'{"usage":{"prompt_tokens":100,"completion_tokens":0,'
        b'"prompt_tokens_details":{"cached_tokens":500}}}', end_of_stream=True))
    # All 100 prompt tokens at the cached price: 125 micro-USD.
    assert reply == Continue(set_headers=[("x-asc-cost-usd", "0.000125")])
    assert processor.usage == Usage(100, 0, 100)


class RecordingGuard:
    """A budget guard that holds everything and records what is settled."""

    def __init__(self) -> None:
        self.reserved: list[dict[str, Any]] = []
        self.settled: list[tuple[int, int]] = []

    async def reserve(self, **request: Any) -> Hold:
        self.reserved.append(request)
        return Hold(reservation=None, mode="redis")

    async def settle(self, hold: Hold, *, cost_micro_usd: int, tokens: int,
                     budget: object) -> int:
        self.settled.append((cost_micro_usd, tokens))
        return 1


def budget_runtime(guard: RecordingGuard) -> Runtime:
    """The test config with a daily budget on `pinned` (Redis is never contacted)."""
    text = CONFIG.replace("credentials:\n", 'redis: {url: "redis://127.0.0.1:6379"}\n'
                          "credentials:\n", 1).replace(
        "      gpt-4o-mini: {pin: prov-eu}\n",
        "      gpt-4o-mini: {pin: prov-eu}\n"
        "    budgets: [{scope: tenant, window: day, limit_usd: 10}]\n")
    runtime = Runtime.build(parse_config(text), environ=ENVIRON)
    return dataclasses.replace(runtime, budgets=guard)  # type: ignore[arg-type]


async def test_budget_is_settled_with_cached_tokens_at_the_cached_price(
    caplog: pytest.LogCaptureFixture,
) -> None:
    guard = RecordingGuard()
    processor = make_processor(budget_runtime(guard))
    await processor.handle(request_headers("pinned"))
    reply = await processor.handle(request_body(chat("gpt-4o")))
    assert isinstance(reply, Continue)
    # The provider must not generate more than the hold covers.
    assert reply.body == ('{"model":"gpt-4o","messages":[{"role":"user","content":"h\u00e9llo"}],'
                          '"max_tokens":4096}').encode()
    [reserved] = guard.reserved
    assert (reserved["key_id"], reserved["model"]) == ("pinned-1", "gpt-4o")
    await processor.handle(response_headers("200"))
    reply = await processor.handle(response_body(json.dumps({"usage": {
        "prompt_tokens": 1000, "completion_tokens": 200,
        "prompt_tokens_details": {"cached_tokens": 600}}}).encode(), end_of_stream=True))
    assert reply == Continue(set_headers=[("x-asc-cost-usd", "0.003750")])
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    assert guard.settled == [(3750, 1200)]
    fields = fields_of(caplog.records[-1])
    assert (fields["charged_micro_usd"], fields["prompt_tokens"],
            fields["cached_prompt_tokens"], fields["completion_tokens"]) == (3750, 1000, 600, 200)


class HoldingGuard(RecordingGuard):
    """Holds a fixed local amount, as a fail-open hold does."""

    async def reserve(self, **request: Any) -> Hold:
        self.reserved.append(request)
        return Hold(reservation=None, mode="fail_open", local_amount=12_345)


USAGE_DOCUMENT = json.dumps({"id": "c1", "choices": [], "usage": {
    "prompt_tokens": 1000, "completion_tokens": 200}}).encode()


@pytest.mark.parametrize("end_of_stream", [False, True])
async def test_an_answer_over_max_response_bytes_is_502_and_charges_the_hold(
    end_of_stream: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    # Without end_of_stream: Envoy's buffer filled (BUFFERED_PARTIAL). With it: the whole
    # answer arrived before the headers reply. Either way it is over the limit: one answer.
    guard = HoldingGuard()
    processor = make_processor(budget_runtime(guard))
    await processor.handle(request_headers("pinned"))
    await processor.handle(request_body(chat("gpt-4o")))
    await processor.handle(response_headers("200"))
    limit = processor._config.limits.max_response_bytes
    body = USAGE_DOCUMENT + b" " * (limit + 1 - len(USAGE_DOCUMENT))
    reply = await processor.handle(response_body(body, end_of_stream=end_of_stream))

    assert isinstance(reply, Respond)
    assert (reply.status, reply.details) == (502, "asc_response_too_large")
    assert json.loads(reply.body) == {"error": {
        "message": f"The provider's answer exceeds the gateway's limit of {limit} bytes.",
        "type": "upstream_error", "param": None, "code": "response_too_large"}}
    assert ("x-should-retry", "false") in reply.headers
    assert ("content-type", "application/json") in reply.headers
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    # The usage in the body is not read: the whole hold is charged, whatever the timing.
    assert guard.settled == [(12_345, 0)]
    [record] = caplog.records
    fields = fields_of(record)
    assert (fields["status"], fields["upstream_status"], fields["error"], fields["aborted"],
            fields["charged_micro_usd"], fields["completion_tokens"]) == (
        502, 200, "response_too_large", False, 12_345, None)


async def test_an_answer_of_exactly_max_response_bytes_passes_and_is_billed_by_usage() -> None:
    guard = HoldingGuard()
    processor = make_processor(budget_runtime(guard))
    await processor.handle(request_headers("pinned"))
    await processor.handle(request_body(chat("gpt-4o")))
    await processor.handle(response_headers("200"))
    limit = processor._config.limits.max_response_bytes
    body = USAGE_DOCUMENT + b" " * (limit - len(USAGE_DOCUMENT))
    reply = await processor.handle(response_body(body, end_of_stream=True))
    # 1000 x 2.50 + 200 x 10 USD per Mtok.
    assert reply == Continue(set_headers=[("x-asc-cost-usd", "0.004500")])
    await processor.finish()
    assert guard.settled == [(4_500, 1_200)]


STREAM_CHUNK = b'data: {"id":"c1","choices":[{"delta":{"content":"hi"}}]}\n\n'
STREAM_USAGE = (b'data: {"id":"c1","choices":[],'
                b'"usage":{"prompt_tokens":9,"completion_tokens":21}}\n\n')
STREAM_DONE = b"data: [DONE]\n\n"


async def test_streamed_usage_split_across_two_messages() -> None:
    processor = await routed()
    await processor.handle(response_headers("200", "text/event-stream"))
    stream = STREAM_CHUNK + STREAM_USAGE + STREAM_DONE
    cut = stream.index(b'"completion_tokens"')
    # The client did not ask for usage: the usage-only chunk the gateway asked for is
    # removed, so complete events are re-framed and a partial one is held back.
    assert await processor.handle(response_body(stream[:cut], end_of_stream=False)) == Continue(
        body=STREAM_CHUNK)
    assert await processor.handle(response_body(stream[cut:], end_of_stream=False)) == Continue(
        body=STREAM_DONE)
    assert await processor.handle(response_body(b"", end_of_stream=True)) == Continue()
    assert processor.usage == Usage(input_tokens=9, output_tokens=21)


async def test_stream_of_a_client_asking_for_usage_passes_unchanged() -> None:
    processor = make_processor()
    await processor.handle(request_headers())
    await processor.handle(request_body(chat(stream=True,
                                             stream_options={"include_usage": True})))
    await processor.handle(response_headers("200", "text/event-stream"))
    stream = STREAM_CHUNK + STREAM_USAGE + STREAM_DONE
    sent = []
    for piece in (stream[:7], stream[7:90], stream[90:], b""):
        reply = await processor.handle(response_body(piece, end_of_stream=not piece))
        assert isinstance(reply, Continue)
        sent.append(piece if reply.body is None else reply.body)
    # Each event leaves whole, with its last piece; the bytes are the provider's.
    assert b"".join(sent) == stream
    assert sent[0] == b""  # nothing of an unfinished event leaves
    assert processor.usage == Usage(input_tokens=9, output_tokens=21)


async def test_streamed_usage_in_unterminated_last_event() -> None:
    processor = await routed()
    await processor.handle(response_headers("200", "text/event-stream"))
    reply = await processor.handle(response_body(
        b'data: {"usage":{"prompt_tokens":1,', end_of_stream=False))
    assert reply == Continue(body=b"")  # nothing complete to send yet
    reply = await processor.handle(response_body(b'"completion_tokens":2}}', end_of_stream=True))
    assert reply == Continue(body=b'data: {"usage":{"prompt_tokens":1,"completion_tokens":2}}\n\n')
    assert processor.usage == Usage(input_tokens=1, output_tokens=2)


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
    # The provider reset the connection: Envoy resets the stream, no body message comes.
    before = requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", "aborted")
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    assert requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", "aborted") - before == 1
    assert fields_of(caplog.records[0])["aborted"] is True
    assert fields_of(caplog.records[0])["status"] == 200


@pytest.mark.parametrize(("status", "content_type", "end_of_stream", "outcome"), [
    ("200", "application/json", True, "200"),      # headers-only response
    ("200", "text/plain", False, "200"),           # body not watched
    ("400", "application/json", True, "502"),      # headers-only error: no message to keep
    ("500", "application/json", True, "502"),      # replaced by our error
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


@pytest.mark.parametrize(("status", "outcome"), [("400", "400"), ("429", "429"),
                                                ("401", "502"), ("500", "502")])
async def test_provider_error_outcome_is_the_status_the_client_got(
    status: str, outcome: str, caplog: pytest.LogCaptureFixture,
) -> None:
    processor = await routed()
    await provider_answers(processor, status, error_json("nope", "x", "y"))
    before = requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", outcome)
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    assert requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", outcome) - before == 1
    fields = fields_of(caplog.records[0])
    assert (fields["status"], fields["upstream_status"], fields["aborted"]) == (
        int(outcome), int(status), False)


async def test_provider_error_body_cut_short_is_aborted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    processor = await routed()
    await processor.handle(response_headers("500"))
    before = requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", "aborted")
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    assert requests_total("acme", "prov-us", "us-east-1", "gpt-4o-mini", "aborted") - before == 1
    fields = fields_of(caplog.records[0])
    assert (fields["status"], fields["error"], fields["aborted"]) == (500, None, True)


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
        "subject": "acme-1",
        "identity_source": "virtual_key",
        "team": None,
        "model": "gpt-4o-mini",
        "provider": "prov-us",
        "region": "us-east-1",
        "upstream_model": "gpt-4o-mini",
        "route_reason": "first in order prov-us; fallbacks prov-eu",
        "credential": "cred-us@1",
        "status": 200,
        "upstream_status": 200,
        "error": None,
        "aborted": False,
        "stream": False,
        "charged_micro_usd": None,  # no budget: nothing held or charged in the ledger
        "cost_micro_usd": 4,  # the usage at the price: 3 x 0.15 -> 1, 4 x 0.6 -> 3 (rounded up)
        "estimated_input_tokens": None,
        "dialect": "openai",
        "endpoint": "chat",
        "prompt_tokens": 3,
        "cached_prompt_tokens": 0,
        "completion_tokens": 4,
        "streamed_tokens": None,
        "attempts": None,
        "stream_truncated": None,
        "guardrails": None,
        "duration_ms": 1500.0,
    }


async def test_streamed_request_log_line(caplog: pytest.LogCaptureFixture) -> None:
    processor = make_processor()
    await processor.handle(request_headers("pinned"))
    await processor.handle(request_body(chat("gpt-4o", stream=True)))
    await processor.handle(response_headers("200", "text/event-stream"))
    await processor.handle(response_body(
        b'data: {"choices":[{"delta":{"content":"a"}}]}\n\n'
        b'data: {"choices":[{"delta":{"tool_calls":[{"index":0}]}}]}\n\n'
        b'data: {"choices":[{"delta":{"content":""}}]}\n\n', end_of_stream=False))
    await processor.handle(response_body(
        b'data: {"choices":[],"usage":{"prompt_tokens":10,"completion_tokens":2,'
        b'"prompt_tokens_details":{"cached_tokens":4}}}\n\ndata: [DONE]\n\n',
        end_of_stream=True))
    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    [record] = caplog.records
    fields = fields_of(record)
    assert {name: fields[name] for name in (
        "stream", "dialect", "prompt_tokens", "cached_prompt_tokens", "completion_tokens",
        "streamed_tokens", "status", "aborted")} == {
        "stream": True, "dialect": "openai", "prompt_tokens": 10, "cached_prompt_tokens": 4,
        "completion_tokens": 2, "streamed_tokens": 2, "status": 200, "aborted": False}


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


async def test_a_deployment_with_its_own_price_is_charged_at_that_price() -> None:
    """`deployments[].price` orders `prefer: cost`; the request is billed at it too."""
    config = parse_config(CONFIG.replace(
        "      - {provider: prov-eu, model: gpt-4o-mini-eu}",
        "      - {provider: prov-eu, model: gpt-4o-mini-eu,\n"
        "         price: {input_per_mtok: 1, output_per_mtok: 2}}"))
    processor = RequestProcessor(Runtime.build(config, environ=ENVIRON), clock=FakeClock())
    assert isinstance(await processor.handle(request_headers("euco")), Continue)
    assert isinstance(await processor.handle(request_body(chat())), Continue)
    assert processor.route is not None
    assert processor.route.provider.name == "prov-eu"
    await processor.handle(response_headers("200"))
    reply = await processor.handle(response_body(
        b'{"usage":{"prompt_tokens":100,"completion_tokens":10}}', end_of_stream=True))
    # 100 x 1 + 10 x 2 micro-USD (the model's price would give 15 + 6 = 21).
    assert reply == Continue(set_headers=[("x-asc-cost-usd", "0.000120")])
