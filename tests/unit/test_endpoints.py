"""The endpoint table (`extproc.endpoints`) and the processor's dispatch over it: models
answered from config, embeddings held by their input alone, count_tokens never held,
refused (endpoint, backend) pairs answered before any provider is chosen a key."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from extproc.auth import hash_key
from extproc.config import parse_config
from extproc.endpoints import (
    ENDPOINTS,
    SUPPORT,
    Endpoint,
    Support,
    UnknownEndpoint,
    match_endpoint,
    translator_for_endpoint,
)
from extproc.errors import Dialect, GatewayError
from extproc.messages import Body, Continue, Headers, Phase, Respond
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from extproc.secrets import Secret
from extproc.translate.base import Backend
from extproc.translate.embeddings import embedding_input_tokens
from tests.unit.test_phases import FakeClock, RecordingGuard

PEPPER = "pepper-endpoints-tests"
KEYS = {"big": "sk-canary-tenant-big-XYZ", "small": "sk-canary-tenant-small-XYZ",
        "narrow": "sk-canary-tenant-big-narrow-XYZ"}
ENVIRON = {"ASC_PEPPER": PEPPER, "KEY_O": "sk-canary-openai-XYZ", "KEY_A": "sk-canary-anth-XYZ"}
CONFIG = f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
redis: {{url: "redis://127.0.0.1:1"}}
credentials:
  cred-o: {{env: KEY_O}}
  cred-a: {{env: KEY_A}}
providers:
  p-openai: {{kind: openai, base_url: "http://127.0.0.1:1", region: r1, zone: eu,
             cluster: c_openai, credentials: [cred-o]}}
  p-anthropic: {{kind: anthropic, base_url: "http://127.0.0.1:2", region: r1, zone: eu,
                cluster: c_anthropic, credentials: [cred-a]}}
models:
  chat-o:
    price: {{input_per_mtok: 100, output_per_mtok: 2000}}
    deployments: [{{provider: p-openai, model: up-chat}}]
  chat-a:
    price: {{input_per_mtok: 100, output_per_mtok: 2000}}
    deployments: [{{provider: p-anthropic, model: up-claude}}]
  emb-o:
    kind: embedding
    price: {{input_per_mtok: 50}}
    deployments: [{{provider: p-openai, model: up-emb}}]
  emb-a:
    kind: embedding
    price: {{input_per_mtok: 50}}
    deployments: [{{provider: p-anthropic}}]
tenants:
  big:
    keys:
      - {{id: big-1, hash: "{hash_key(Secret(PEPPER), KEYS["big"])}"}}
      - {{id: big-2, team: narrow, hash: "{hash_key(Secret(PEPPER), KEYS["narrow"])}"}}
    models: [chat-o, chat-a, emb-o, emb-a]
    teams: {{narrow: {{models: [chat-o]}}}}
    budgets: [{{scope: tenant, window: day, limit_usd: 10}}]
  small:
    keys: [{{id: small-1, hash: "{hash_key(Secret(PEPPER), KEYS["small"])}"}}]
    models: [emb-o]
"""


def processor(guard: RecordingGuard | None = None) -> RequestProcessor:
    runtime = Runtime.build(parse_config(CONFIG), environ=ENVIRON)
    if guard is not None:
        runtime = dataclasses.replace(runtime, budgets=guard)  # type: ignore[arg-type]
    return RequestProcessor(runtime, clock=FakeClock())


def headers(path: str, method: str = "POST", tenant: str = "big", **extra: str) -> Headers:
    values = {":method": method, ":path": path, "authorization": f"Bearer {KEYS[tenant]}",
              **{k.replace("_", "-"): v for k, v in extra.items()}}
    return Headers(Phase.REQUEST_HEADERS, values, end_of_stream=method == "GET")


def body(payload: dict[str, Any]) -> Body:
    return Body(Phase.REQUEST_BODY, json.dumps(payload).encode(), True)


# -- the table ----------------------------------------------------------------------------

def test_every_endpoint_has_a_support_entry_for_every_backend() -> None:
    missing = [(e.value, b.value) for e in Endpoint for b in Backend if (e, b) not in SUPPORT]
    assert missing == []


@pytest.mark.parametrize(("endpoint", "backend"), [
    pair for pair, support in SUPPORT.items()
    if support in (Support.SERVED, Support.TRANSLATED)])
def test_every_served_pair_has_a_translator(endpoint: Endpoint, backend: Backend) -> None:
    [spec] = [s for s in ENDPOINTS.values() if s.endpoint is endpoint]
    tenant = parse_config(CONFIG).tenants["big"]
    translator = translator_for_endpoint(spec, spec.dialect or Dialect.OPENAI, backend,
                                         tenant=tenant)
    assert callable(translator.request)


@pytest.mark.parametrize(("method", "path", "extra", "expected"), [
    ("POST", "/v1/chat/completions", {}, (Endpoint.CHAT, Dialect.OPENAI, None)),
    ("POST", "/v1/messages?beta=true", {}, (Endpoint.MESSAGES, Dialect.ANTHROPIC, None)),
    ("POST", "/v1/embeddings", {}, (Endpoint.EMBEDDINGS, Dialect.OPENAI, None)),
    ("POST", "/v1/responses", {}, (Endpoint.RESPONSES, Dialect.OPENAI, None)),
    ("POST", "/v1/messages/count_tokens", {},
     (Endpoint.COUNT_TOKENS, Dialect.ANTHROPIC, None)),
    ("GET", "/v1/models", {}, (Endpoint.MODELS, Dialect.OPENAI, None)),
    ("GET", "/v1/models", {"anthropic-version": "2023-06-01"},
     (Endpoint.MODELS, Dialect.ANTHROPIC, None)),
    ("GET", "/v1/models/org%2Fmodel-1", {}, (Endpoint.MODELS, Dialect.OPENAI, "org/model-1")),
])
def test_match_endpoint(method: str, path: str, extra: dict[str, str],
                        expected: tuple[Endpoint, Dialect, str | None]) -> None:
    match = match_endpoint(method, path, extra)
    assert (match.spec.endpoint, match.dialect, match.model_id) == expected


@pytest.mark.parametrize(("method", "path", "dialect"), [
    ("GET", "/v1/chat/completions", Dialect.OPENAI),
    ("GET", "/v1/messages", Dialect.ANTHROPIC),
    ("POST", "/v1/models", Dialect.OPENAI),
    ("DELETE", "/v1/responses", Dialect.OPENAI),
    ("GET", "/v1/files", Dialect.OPENAI),
    ("GET", "/v1/models/", Dialect.OPENAI),
])
def test_unknown_endpoints_are_404_in_the_doors_dialect(method: str, path: str,
                                                        dialect: Dialect) -> None:
    with pytest.raises(UnknownEndpoint) as caught:
        match_endpoint(method, path, {})
    assert (caught.value.status, caught.value.dialect) == (404, dialect)
    assert caught.value.message == f"Unknown endpoint: {method} {path}"


# -- embeddings estimate ------------------------------------------------------------------

@pytest.mark.parametrize(("value", "expected"), [
    ("abcdef", (2, False)),                      # 6 bytes / 3
    ("\u00e9\u00e9\u00e9", (2, False)),          # 6 UTF-8 bytes / 3
    (["abc", "abcd"], (1 + 2, False)),
    ([1, 2, 3, 4], (4, True)),
    ([[1, 2, 3], [4, 5]], (5, True)),
    (["abc", [1, 2]], (1 + 2, True)),
])
def test_embedding_inputs_are_estimated_per_item(value: object,
                                                 expected: tuple[int, bool]) -> None:
    assert embedding_input_tokens(value) == expected


@pytest.mark.parametrize("value", ["", [], [""], [[]], [1.5], [["a"]], {"a": 1}, None,
                                   ["a"] * 2049, [-1]])
def test_malformed_embedding_inputs_are_400(value: object) -> None:
    with pytest.raises(GatewayError) as caught:
        embedding_input_tokens(value)
    assert (caught.value.status, caught.value.param) == (400, "input")


# -- the processor ------------------------------------------------------------------------

async def test_models_list_is_answered_from_the_tenants_config() -> None:
    reply = await processor().handle(headers("/v1/models", "GET", tenant="small"))
    assert isinstance(reply, Respond)
    assert reply.status == 200
    assert json.loads(reply.body) == {"object": "list", "data": [
        {"id": "emb-o", "object": "model", "created": 0, "owned_by": "asc"}]}
    assert reply.metadata is not None
    assert reply.metadata["answered"] == "models"


async def test_a_teams_key_sees_its_teams_models_only() -> None:
    reply = await processor().handle(headers("/v1/models", "GET", tenant="narrow"))
    assert isinstance(reply, Respond)
    assert [m["id"] for m in json.loads(reply.body)["data"]] == ["chat-o"]
    refused = await processor().handle(headers("/v1/models/chat-a", "GET", tenant="narrow"))
    assert isinstance(refused, Respond)
    assert refused.status == 404


async def test_anthropic_models_list_for_the_anthropic_sdk() -> None:
    reply = await processor().handle(headers("/v1/models", "GET", anthropic_version="2023-06-01"))
    assert isinstance(reply, Respond)
    assert json.loads(reply.body)["data"][0] == {
        "type": "model", "id": "chat-a", "display_name": "chat-a",
        "created_at": "1970-01-01T00:00:00Z"}


async def test_another_tenants_model_is_404_like_an_unknown_one() -> None:
    replies = [await processor().handle(headers(f"/v1/models/{name}", "GET", tenant="small"))
               for name in ("chat-o", "no-such-model")]
    bodies = [json.loads(r.body) for r in replies if isinstance(r, Respond)]
    assert [r.status for r in replies if isinstance(r, Respond)] == [404, 404]
    assert [b["error"]["code"] for b in bodies] == ["model_not_found"] * 2


async def test_models_need_a_key() -> None:
    reply = await processor().handle(Headers(Phase.REQUEST_HEADERS, {
        ":method": "GET", ":path": "/v1/models"}, end_of_stream=True))
    assert isinstance(reply, Respond)
    assert reply.status == 401


async def test_embeddings_hold_the_input_estimate_only_and_settle_prompt_tokens() -> None:
    guard = RecordingGuard()
    request = processor(guard)
    await request.handle(headers("/v1/embeddings"))
    reply = await request.handle(body({"model": "emb-o", "input": [[1, 2, 3], "abcdef"],
                                       "encoding_format": "base64"}))
    assert isinstance(reply, Continue)
    assert reply.body is not None
    assert json.loads(reply.body) == {"model": "up-emb", "input": [[1, 2, 3], "abcdef"],
                                      "encoding_format": "base64"}
    assert dict(reply.set_headers)[":path"] == "/v1/embeddings"
    [held] = guard.reserved
    assert (held["cost_micro_usd"], held["estimated_tokens"]) == (5 * 50, 5)
    await request.handle(Headers(Phase.RESPONSE_HEADERS, {
        ":status": "200", "content-type": "application/json"}, False))
    await request.handle(Body(Phase.RESPONSE_BODY, json.dumps({
        "object": "list", "data": [], "usage": {"prompt_tokens": 7, "total_tokens": 7}}
    ).encode(), True))
    await request.finish()
    assert guard.settled == [(7 * 50, 7)]
    assert request.endpoint == "embeddings"


async def test_embeddings_on_anthropic_are_refused_before_any_hold() -> None:
    guard = RecordingGuard()
    request = processor(guard)
    await request.handle(headers("/v1/embeddings"))
    reply = await request.handle(body({"model": "emb-a", "input": "hi"}))
    assert isinstance(reply, Respond)
    assert (reply.status, json.loads(reply.body)) == (400, {"error": {
        "message": "The endpoint POST /v1/embeddings is not available for the model "
                   "'emb-a': Anthropic does not serve it.",
        "type": "invalid_request_error", "param": "model", "code": "invalid_request"}})
    assert request.credential is None
    assert guard.reserved == []


@pytest.mark.parametrize(("path", "payload", "message"), [
    ("/v1/chat/completions", {"model": "emb-o", "messages": [{"role": "user", "content": "x"}]},
     "The endpoint POST /v1/chat/completions does not serve the embedding model 'emb-o': "
     "use POST /v1/embeddings."),
    ("/v1/embeddings", {"model": "chat-o", "input": "x"},
     "The endpoint POST /v1/embeddings does not serve the chat model 'chat-o': it is not "
     "an embedding model."),
])
async def test_a_model_of_the_wrong_kind_is_400(path: str, payload: dict[str, Any],
                                                message: str) -> None:
    request = processor()
    await request.handle(headers(path))
    reply = await request.handle(body(payload))
    assert isinstance(reply, Respond)
    assert (reply.status, json.loads(reply.body)["error"]["message"]) == (400, message)


async def test_count_tokens_at_anthropic_is_forwarded_without_a_hold() -> None:
    guard = RecordingGuard()
    request = processor(guard)
    await request.handle(headers("/v1/messages/count_tokens"))
    reply = await request.handle(body({"model": "chat-a",
                                       "messages": [{"role": "user", "content": "hi"}]}))
    assert isinstance(reply, Continue)
    sent = dict(reply.set_headers)
    assert (sent[":path"], sent["x-api-key"]) == ("/v1/messages/count_tokens",
                                                  "sk-canary-anth-XYZ")
    assert guard.reserved == []
    await request.finish()
    assert guard.settled == []


async def test_count_tokens_elsewhere_is_the_gateways_estimate_without_a_hold() -> None:
    guard = RecordingGuard()
    request = processor(guard)
    await request.handle(headers("/v1/messages/count_tokens"))
    raw = json.dumps({"model": "chat-o", "messages": [{"role": "user", "content": "hi"}]})
    reply = await request.handle(Body(Phase.REQUEST_BODY, raw.encode(), True))
    assert isinstance(reply, Respond)
    assert (reply.status, json.loads(reply.body)) == (200, {"input_tokens": -(-len(raw) // 3)})
    assert guard.reserved == []
    assert request.credential is None


async def test_responses_hold_max_output_tokens_and_force_store_off() -> None:
    guard = RecordingGuard()
    request = processor(guard)
    await request.handle(headers("/v1/responses"))
    reply = await request.handle(body({"model": "chat-o", "input": "abcdef",
                                       "max_output_tokens": 100}))
    assert isinstance(reply, Continue)
    assert reply.body is not None
    assert json.loads(reply.body)["store"] is False
    assert dict(reply.set_headers)[":path"] == "/v1/responses"
    [held] = guard.reserved
    assert held["estimated_tokens"] == request.estimated_input_tokens + 100


# -- config -------------------------------------------------------------------------------

def test_a_chat_model_needs_an_output_price_an_embedding_model_does_not() -> None:
    from extproc.config import ConfigError

    broken = CONFIG.replace("  chat-o:\n    price: {input_per_mtok: 100, output_per_mtok: 2000}",
                            "  chat-o:\n    price: {input_per_mtok: 100}")
    with pytest.raises(ConfigError) as caught:
        parse_config(broken)
    assert [(i.path, i.message, i.hint) for i in caught.value.issues] == [
        ("models.chat-o.price.output_per_mtok", "is required for a chat model",
         "embedding models set kind: embedding")]
    model = parse_config(CONFIG).models["emb-o"]
    assert (model.kind, model.price.input_micro_per_mtok, model.price.output_micro_per_mtok) == (
        "embedding", 50_000_000, 0)


def test_an_unknown_model_kind_is_refused() -> None:
    from extproc.config import ConfigError

    with pytest.raises(ConfigError) as caught:
        parse_config(CONFIG.replace("kind: embedding", "kind: rerank", 1))
    assert [(i.path, i.message) for i in caught.value.issues] == [
        ("models.emb-o.kind", "must be chat or embedding, got 'rerank'")]


async def test_new_endpoints_keep_residency() -> None:
    """A zone-eu tenant's Responses request goes to the eu deployment (tests/unit/
    test_phases.py config: gpt-4o-mini in us and eu)."""
    from tests.unit.test_phases import make_processor, request_headers

    request = make_processor()
    await request.handle(dataclasses.replace(
        request_headers("euco"), headers={**request_headers("euco").headers,
                                          ":path": "/v1/responses"}))
    reply = await request.handle(body({"model": "gpt-4o-mini", "input": "hi"}))
    assert isinstance(reply, Continue)
    sent = dict(reply.set_headers)
    assert (sent["x-asc-cluster"], sent[":path"]) == ("prov_eu", "/openai/v1/responses")
    assert reply.body is not None
    assert json.loads(reply.body)["model"] == "gpt-4o-mini-eu"
