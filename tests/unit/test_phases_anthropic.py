"""The per-request processor across dialects: the Anthropic door, Anthropic backends, and
translation both ways, driven with plain messages (no Envoy, no sockets).

Each test feeds `Headers` / `Body` values to one processor and asserts the exact
`Continue` / `Respond` it returns; bodies are written out byte for byte.
"""

from __future__ import annotations

import functools
import json
import logging
from typing import Any

import pytest

from extproc.auth import hash_key
from extproc.config import Price, parse_config
from extproc.errors import Dialect
from extproc.messages import Body, BodyMode, Continue, Headers, Phase, Respond
from extproc.money import usage_cost
from extproc.phases import RequestProcessor
from extproc.runtime import Runtime
from extproc.secrets import Secret
from extproc.translate.base import TRANSLATORS, Backend, Usage
from extproc.translate.openai_anthropic import OpenAIToAnthropic

PEPPER = "pepper-phases-anthropic-tests"
KEY_OAI = "sk-canary-provider-oai-XYZ"
KEY_ANT = "sk-ant-canary-provider-XYZ"
TENANT_KEY = "sk-canary-tenant-acme-ant-XYZ"
ENVIRON = {"ASC_PEPPER": PEPPER, "KEY_OAI": KEY_OAI, "KEY_ANT": KEY_ANT}
JSON_CT = ("content-type", "application/json")
NOW = 1_700_000_000

CONFIG = f"""\
version: 1
auth: {{pepper: {{env: ASC_PEPPER}}}}
credentials:
  cred-oai: {{env: KEY_OAI}}
  cred-ant: {{env: KEY_ANT}}
providers:
  prov-oai:
    kind: openai
    base_url: "https://api.openai.example"
    region: us-east-1
    zone: us
    cluster: prov_oai
    credentials: [cred-oai]
  prov-ant:
    kind: anthropic
    base_url: "https://llm-proxy.example/anthropic"
    region: us-east-2
    zone: us
    cluster: prov_ant
    credentials: [cred-ant]
models:
  gpt-4o-mini:
    price: {{input_per_mtok: 0.15, output_per_mtok: 0.60, cached_input_per_mtok: 0.075}}
    deployments: [{{provider: prov-oai}}]
  claude-haiku:
    price: {{input_per_mtok: 0.8, output_per_mtok: 4, cached_input_per_mtok: 0.08}}
    deployments: [{{provider: prov-ant, model: claude-3-5-haiku-20241022}}]
tenants:
  acme:
    keys: [{{id: acme-1, hash: "{hash_key(Secret(PEPPER), TENANT_KEY)}"}}]
    models: [gpt-4o-mini, claude-haiku]
"""

PARSED = parse_config(CONFIG)


def make_processor() -> RequestProcessor:
    # A runtime per processor: key-pool health learnt from provider answers is not shared.
    return RequestProcessor(Runtime.build(PARSED, environ=ENVIRON), clock=lambda: 100.0)


def messages_headers(*, path: str = "/v1/messages", method: str = "POST",
                     key: str | None = TENANT_KEY, **extra: str) -> Headers:
    """What the Anthropic SDK sends: the key in `x-api-key`, plus `anthropic-version`."""
    headers = {":method": method, ":path": path, "content-type": "application/json"}
    if key is not None:
        headers["x-api-key"] = key
    headers["anthropic-version"] = "2023-06-01"
    headers.update({k.replace("_", "-"): v for k, v in extra.items()})
    return Headers(Phase.REQUEST_HEADERS, headers, False)


def chat_headers() -> Headers:
    return Headers(Phase.REQUEST_HEADERS, {
        ":method": "POST", ":path": "/v1/chat/completions",
        "content-type": "application/json", "authorization": f"Bearer {TENANT_KEY}",
    }, False)


def request_body(payload: dict[str, Any]) -> Body:
    return Body(Phase.REQUEST_BODY, json.dumps(payload).encode(), True)


def response_headers(status: str, content_type: str = "application/json",
                     **extra: str) -> Headers:
    headers = {":status": status, "content-type": content_type,
               **{k.replace("_", "-"): v for k, v in extra.items()}}
    return Headers(Phase.RESPONSE_HEADERS, headers, False)


def response_body(data: bytes, *, end_of_stream: bool = True) -> Body:
    return Body(Phase.RESPONSE_BODY, data, end_of_stream)


def anthropic_error(type_: str, message: str) -> bytes:
    return json.dumps({"type": "error", "error": {"type": type_, "message": message}},
                      separators=(",", ":")).encode()


def openai_error(message: str, type_: str, code: str) -> bytes:
    return json.dumps({"error": {"message": message, "type": type_, "param": None,
                                 "code": code}}, separators=(",", ":")).encode()


def messages(model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    return {"model": model, "max_tokens": 256,
            "messages": [{"role": "user", "content": "h\u00e9llo"}], **extra}


def oai_tags(processor: RequestProcessor) -> list[tuple[str, str]]:
    return [("x-asc-request-id", processor.request_id), ("x-asc-provider", "prov-oai"),
            ("x-asc-region", "us-east-1"), ("x-asc-credential", "cred-oai@1")]


def ant_tags(processor: RequestProcessor) -> list[tuple[str, str]]:
    return [("x-asc-request-id", processor.request_id), ("x-asc-provider", "prov-ant"),
            ("x-asc-region", "us-east-2"), ("x-asc-credential", "cred-ant@1")]


def oai_metadata(processor: RequestProcessor, **extra: str) -> dict[str, Any]:
    """Metadata of a Messages-door request served by the OpenAI backend."""
    return {"request_id": processor.request_id, "dialect": "anthropic", "tenant": "acme",
            "key_id": "acme-1",
            "model": "gpt-4o-mini", "provider": "prov-oai", "region": "us-east-1",
            "upstream_model": "gpt-4o-mini", "credential": "cred-oai@1", **extra}


def ant_metadata(processor: RequestProcessor, **extra: str) -> dict[str, Any]:
    return {"request_id": processor.request_id, "tenant": "acme", "key_id": "acme-1",
            "model": "claude-haiku", "provider": "prov-ant", "region": "us-east-2",
            "upstream_model": "claude-3-5-haiku-20241022", "credential": "cred-ant@1",
            **extra}


async def through_messages_door(payload: dict[str, Any]) -> RequestProcessor:
    """A processor whose Anthropic-door request went upstream."""
    processor = make_processor()
    assert isinstance(await processor.handle(messages_headers()), Continue)
    assert isinstance(await processor.handle(request_body(payload)), Continue)
    return processor


def sse(kind: str, payload: dict[str, Any]) -> bytes:
    """One Anthropic SSE event, framed the way the Messages API frames it."""
    data = json.dumps({"type": kind, **payload}, separators=(",", ":"), ensure_ascii=False)
    return f"event: {kind}\ndata: {data}\n\n".encode()


def chunk(payload: dict[str, Any]) -> bytes:
    """One OpenAI stream chunk event."""
    data = json.dumps(payload, separators=(",", ":"), ensure_ascii=False)
    return f"data: {data}\n\n".encode()


# -- the Anthropic door: request headers ---------------------------------------------------


async def test_messages_door_authenticates_with_x_api_key_and_strips_client_headers() -> None:
    processor = make_processor()
    reply = await processor.handle(messages_headers(
        anthropic_beta="prompt-caching-2024-07-31", x_asc_tenant="forged"))
    assert reply == Continue(remove_headers=["x-api-key", "anthropic-version", "x-asc-tenant"],
                             request_body_mode=BodyMode.BUFFERED, clear_route_cache=True)
    assert processor.dialect is Dialect.ANTHROPIC
    assert processor.principal is not None
    assert (processor.principal.tenant.id, processor.principal.key_id) == ("acme", "acme-1")


async def test_messages_door_ignores_the_query_string() -> None:
    processor = make_processor()
    reply = await processor.handle(messages_headers(path="/v1/messages?beta=true"))
    assert isinstance(reply, Continue)
    assert processor.dialect is Dialect.ANTHROPIC


async def test_messages_door_missing_key_is_401_in_anthropic_shape() -> None:
    processor = make_processor()
    reply = await processor.handle(messages_headers(key=None))
    assert reply == Respond(
        status=401,
        body=anthropic_error(
            "authentication_error",
            "Missing API key: send it as 'Authorization: Bearer <key>' or 'x-api-key'."),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id)],
        details="asc_invalid_api_key",
        metadata={"request_id": processor.request_id, "dialect": "anthropic",
                  "error": "invalid_api_key"},
    )


async def test_messages_door_wrong_method_is_404_in_anthropic_shape() -> None:
    processor = make_processor()
    reply = await processor.handle(messages_headers(method="GET"))
    assert reply == Respond(
        status=404,
        body=b'{"type":"error","error":{"type":"not_found_error",'
             b'"message":"Unknown endpoint: GET /v1/messages"}}',
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id)],
        details="asc_not_found",
        metadata={"request_id": processor.request_id, "dialect": "anthropic", "error": "not_found"},
    )


# -- the Anthropic door: request body ------------------------------------------------------


async def test_messages_door_unknown_model_is_404_in_anthropic_shape() -> None:
    processor = make_processor()
    await processor.handle(messages_headers())
    reply = await processor.handle(request_body(messages("claude-9")))
    assert reply == Respond(
        status=404,
        body=anthropic_error("not_found_error", "The model 'claude-9' does not exist."),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id)],
        details="asc_model_not_found",
        metadata={"request_id": processor.request_id, "dialect": "anthropic",
                  "tenant": "acme", "key_id": "acme-1",
                  "model": "claude-9", "error": "model_not_found"},
    )


@pytest.mark.parametrize(("payload", "message"), [
    ({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]},
     "'max_tokens' must be a positive integer."),
    (messages(top_k=5), "The parameter 'top_k' is not supported by OpenAI."),
    (messages(messages=[{"role": "user", "content": [{"type": "document"}]}]),
     "Only 'text', 'image' and 'tool_result' content blocks are supported by OpenAI."),
])
async def test_messages_door_untranslatable_request_is_400_in_anthropic_shape(
    payload: dict[str, Any], message: str,
) -> None:
    processor = make_processor()
    await processor.handle(messages_headers())
    reply = await processor.handle(request_body(payload))
    # The route was chosen, but no key was taken for a request that cannot be sent.
    assert reply == Respond(
        status=400,
        body=anthropic_error("invalid_request_error", message),
        headers=[JSON_CT, ("x-asc-request-id", processor.request_id),
                 ("x-asc-provider", "prov-oai"), ("x-asc-region", "us-east-1")],
        details="asc_invalid_request",
        metadata={"request_id": processor.request_id, "dialect": "anthropic",
                  "tenant": "acme", "key_id": "acme-1",
                  "model": "gpt-4o-mini", "provider": "prov-oai", "region": "us-east-1",
                  "upstream_model": "gpt-4o-mini", "error": "invalid_request"},
    )
    assert processor.credential is None


async def test_messages_request_is_translated_for_an_openai_backend() -> None:
    processor = make_processor()
    await processor.handle(messages_headers())
    reply = await processor.handle(request_body(messages(
        system="Be brief.", stop_sequences=["END"], metadata={"user_id": "u-1"},
        temperature=0.2)))
    body = ('{"model":"gpt-4o-mini","messages":[{"role":"system","content":"Be brief."},'
            '{"role":"user","content":"h\u00e9llo"}],"max_completion_tokens":256,'
            '"temperature":0.2,"stop":["END"],"user":"u-1"}').encode()
    assert reply == Continue(
        set_headers=[
            ("x-asc-cluster", "prov_oai"),
            (":path", "/v1/chat/completions"),
            ("authorization", f"Bearer {KEY_OAI}"),
            ("content-length", str(len(body))),
        ],
        body=body,
        clear_route_cache=True,
        metadata=oai_metadata(processor),
    )
    assert processor.streaming is False


# -- the Anthropic door on an OpenAI backend: responses -------------------------------------


COMPLETION = json.dumps({
    "id": "chatcmpl-1", "object": "chat.completion", "created": 1,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi!"},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 20000, "completion_tokens": 500, "total_tokens": 20500,
              "prompt_tokens_details": {"cached_tokens": 8000}},
}).encode()


async def test_openai_completion_is_translated_back_to_an_anthropic_message() -> None:
    processor = await through_messages_door(messages())
    reply = await processor.handle(response_headers("200"))
    assert reply == Continue(set_headers=oai_tags(processor),
                             remove_headers=["content-length"],
                             response_body_mode=BodyMode.BUFFERED_PARTIAL)
    reply = await processor.handle(response_body(COMPLETION))
    message = (b'{"id":"chatcmpl-1","type":"message","role":"assistant",'
               b'"model":"gpt-4o-mini-2024-07-18","content":[{"type":"text","text":"Hi!"}],'
               b'"stop_reason":"end_turn","stop_sequence":null,"usage":{"input_tokens":12000,'
               b'"output_tokens":500,"cache_read_input_tokens":8000,'
               b'"cache_creation_input_tokens":0}}')
    # 12000 x 0.15 + 8000 x 0.075 (cached) + 500 x 0.60 = 1800 + 600 + 300 micro-USD.
    assert reply == Continue(
        set_headers=[("x-asc-cost-usd", "0.002700")],
        body=message)
    assert processor.usage == Usage(input_tokens=20000, output_tokens=500,
                                    cached_input_tokens=8000)


async def test_openai_tool_calls_become_tool_use_blocks() -> None:
    processor = await through_messages_door(messages(tools=[{
        "name": "get_weather", "input_schema": {"type": "object"}}]))
    await processor.handle(response_headers("200"))
    reply = await processor.handle(response_body(json.dumps({
        "id": "chatcmpl-2", "model": "gpt-4o-mini",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]}}],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
    }).encode()))
    message = (b'{"id":"chatcmpl-2","type":"message","role":"assistant","model":"gpt-4o-mini",'
               b'"content":[{"type":"tool_use","id":"call_1","name":"get_weather",'
               b'"input":{"city":"Paris"}}],"stop_reason":"tool_use","stop_sequence":null,'
               b'"usage":{"input_tokens":10,"output_tokens":5,"cache_read_input_tokens":0,'
               b'"cache_creation_input_tokens":0}}')
    # 10 x 0.15 -> 2, 5 x 0.60 -> 3 (each rounded up).
    assert reply == Continue(
        set_headers=[("x-asc-cost-usd", "0.000005")],
        body=message)


async def test_invalid_openai_completion_is_502_in_anthropic_shape() -> None:
    processor = await through_messages_door(messages())
    await processor.handle(response_headers("200"))
    reply = await processor.handle(response_body(b"<html>gateway timeout</html>"))
    assert reply == Respond(
        status=502,
        body=anthropic_error("api_error", "The provider sent an invalid response."),
        headers=[JSON_CT, *oai_tags(processor)],
        details="asc_provider_error",
        metadata=oai_metadata(processor, error="provider_error"),
    )


async def test_provider_429_is_an_anthropic_rate_limit_error_with_retry_after() -> None:
    processor = await through_messages_door(messages())
    reply = await processor.handle(response_headers("429", retry_after="20"))
    assert reply == Continue(response_body_mode=BodyMode.BUFFERED_PARTIAL)
    reply = await processor.handle(response_body(openai_error(
        "Rate limit reached for requests", "requests", "rate_limit_exceeded")))
    assert reply == Respond(
        status=429,
        body=anthropic_error("rate_limit_error",
                             "The provider's rate limit was reached; retry later."),
        headers=[JSON_CT, *oai_tags(processor), ("retry-after", "20")],
        details="asc_provider_status_429",
        metadata=oai_metadata(processor, error="rate_limited"),
    )
    assert (processor.status, processor.upstream_status) == (429, 429)


async def test_provider_auth_failure_is_an_anthropic_api_error() -> None:
    processor = await through_messages_door(messages())
    await processor.handle(response_headers("401"))
    reply = await processor.handle(response_body(openai_error(
        f"Incorrect API key provided: {KEY_OAI}.", "invalid_request_error", "invalid_api_key")))
    assert reply == Respond(
        status=502,
        body=anthropic_error("api_error", "The provider rejected the gateway's credential."),
        headers=[JSON_CT, *oai_tags(processor)],
        details="asc_provider_status_401",
        metadata=oai_metadata(processor, error="provider_error"),
    )


# -- the Anthropic door on an OpenAI backend: streams ---------------------------------------


async def test_openai_stream_becomes_anthropic_events_chunk_by_chunk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    processor = make_processor()
    await processor.handle(messages_headers())
    reply = await processor.handle(request_body(messages(stream=True)))
    assert isinstance(reply, Continue)
    assert reply.body == ('{"model":"gpt-4o-mini","messages":[{"role":"user",'
                          '"content":"h\u00e9llo"}],"max_completion_tokens":256,"stream":true,'
                          '"stream_options":{"include_usage":true}}').encode()
    assert processor.streaming is True
    reply = await processor.handle(response_headers("200", "text/event-stream"))
    assert reply == Continue(set_headers=oai_tags(processor),
                             response_body_mode=BodyMode.STREAMED)

    base = {"id": "chatcmpl-9", "object": "chat.completion.chunk", "created": 1,
            "model": "gpt-4o-mini"}
    role = chunk({**base, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                             "content": ""},
                                       "finish_reason": None}]})
    hel = chunk({**base, "choices": [{"index": 0, "delta": {"content": "Hel"},
                                      "finish_reason": None}]})
    lo = chunk({**base, "choices": [{"index": 0, "delta": {"content": "l\u00f6"},
                                     "finish_reason": None}]})
    stop = chunk({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    usage = chunk({**base, "choices": [], "usage": {
        "prompt_tokens": 30, "completion_tokens": 2, "total_tokens": 32,
        "prompt_tokens_details": {"cached_tokens": 10}}})
    upstream = role + hel + lo + stop + usage + b"data: [DONE]\n\n"
    cuts = [
        len(role) + 20,                          # inside the "Hel" chunk
        len(role) + len(hel) + 30,               # inside the "lö" chunk
        upstream.index("\u00f6".encode()) + 1,   # inside the UTF-8 sequence of "ö"
        upstream.index(b"[DONE]") + 3,           # inside [DONE]
    ]
    assert cuts == sorted(cuts)
    pieces = [upstream[a:b] for a, b in zip([0, *cuts], [*cuts, len(upstream)], strict=True)]

    message_start = sse("message_start", {"message": {
        "id": "chatcmpl-9", "type": "message", "role": "assistant", "model": "gpt-4o-mini",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 0, "output_tokens": 0}}})
    text_start = sse("content_block_start", {
        "index": 0, "content_block": {"type": "text", "text": ""}})
    delta_hel = sse("content_block_delta", {
        "index": 0, "delta": {"type": "text_delta", "text": "Hel"}})
    delta_lo = sse("content_block_delta", {
        "index": 0, "delta": {"type": "text_delta", "text": "l\u00f6"}})
    ending = (
        sse("content_block_stop", {"index": 0})
        + sse("message_delta", {
            "delta": {"stop_reason": "end_turn", "stop_sequence": None},
            "usage": {"input_tokens": 20, "output_tokens": 2, "cache_read_input_tokens": 10,
                      "cache_creation_input_tokens": 0}})
        + sse("message_stop", {})
    )
    expected = [message_start, text_start + delta_hel, b"", delta_lo, ending]
    for piece, out in zip(pieces, expected, strict=True):
        reply = await processor.handle(response_body(piece, end_of_stream=False))
        assert reply == Continue(body=out)
    assert await processor.handle(response_body(b"", end_of_stream=True)) == Continue()
    assert processor.usage == Usage(input_tokens=30, output_tokens=2, cached_input_tokens=10)

    with caplog.at_level(logging.INFO, logger="extproc.request"):
        await processor.finish()
    [record] = caplog.records
    fields = record.__dict__["fields"]
    assert {name: fields[name] for name in (
        "dialect", "stream", "status", "aborted", "prompt_tokens", "cached_prompt_tokens",
        "completion_tokens", "streamed_tokens")} == {
        "dialect": "anthropic", "stream": True, "status": 200, "aborted": False,
        "prompt_tokens": 30, "cached_prompt_tokens": 10, "completion_tokens": 2,
        "streamed_tokens": 2}


async def test_openai_stream_cut_before_done_is_closed_on_flush() -> None:
    processor = await through_messages_door(messages(stream=True))
    await processor.handle(response_headers("200", "text/event-stream"))
    text = chunk({"id": "c", "model": "m", "choices": [
        {"index": 0, "delta": {"content": "ok"}, "finish_reason": "length"}]})
    reply = await processor.handle(response_body(text, end_of_stream=True))
    assert reply == Continue(body=(
        sse("message_start", {"message": {
            "id": "c", "type": "message", "role": "assistant", "model": "m", "content": [],
            "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}})
        + sse("content_block_start", {"index": 0,
                                      "content_block": {"type": "text", "text": ""}})
        + sse("content_block_delta", {"index": 0,
                                      "delta": {"type": "text_delta", "text": "ok"}})
        + sse("content_block_stop", {"index": 0})
        + sse("message_delta", {"delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                                "usage": {"output_tokens": 1}})
        + sse("message_stop", {})))
    assert processor.usage is None


# -- Anthropic backends ---------------------------------------------------------------------


async def test_messages_request_to_anthropic_keeps_its_shape_with_the_provider_key() -> None:
    processor = make_processor()
    await processor.handle(messages_headers())
    reply = await processor.handle(request_body(messages("claude-haiku", top_k=5)))
    body = ('{"model":"claude-3-5-haiku-20241022","max_tokens":256,"messages":[{"role":"user",'
            '"content":"h\u00e9llo"}],"top_k":5}').encode()
    assert reply == Continue(
        set_headers=[
            ("x-asc-cluster", "prov_ant"),
            (":path", "/anthropic/v1/messages"),
            ("anthropic-version", "2023-06-01"),
            ("x-api-key", KEY_ANT),
            ("content-length", str(len(body))),
        ],
        body=body,
        clear_route_cache=True,
        metadata=ant_metadata(processor, dialect="anthropic"),
    )


async def test_anthropic_message_passes_through_and_is_billed_with_its_cache() -> None:
    processor = await through_messages_door(messages("claude-haiku"))
    reply = await processor.handle(response_headers("200"))
    assert reply == Continue(set_headers=ant_tags(processor),
                             remove_headers=["content-length"],
                             response_body_mode=BodyMode.BUFFERED_PARTIAL)
    document = (b'{"id":"msg_1","type":"message","role":"assistant","content":[{"type":"text",'
                b'"text":"Hi"}],"stop_reason":"end_turn","usage":{"input_tokens":10,'
                b'"output_tokens":20,"cache_read_input_tokens":1000,'
                b'"cache_creation_input_tokens":100}}')
    reply = await processor.handle(response_body(document))
    # 10 x 0.8 + 1000 x 0.08 (cache reads) + 100 x 1.6 (cache writes, at the default of
    # twice the input price) + 20 x 4 = 8 + 80 + 160 + 80 micro-USD.
    assert reply == Continue(set_headers=[("x-asc-cost-usd", "0.000328")])
    assert processor.usage == Usage(input_tokens=1110, output_tokens=20,
                                    cached_input_tokens=1000, cache_write_input_tokens=100)


async def test_anthropic_stream_passes_through_untouched() -> None:
    processor = await through_messages_door(messages("claude-haiku", stream=True))
    await processor.handle(response_headers("200", "text/event-stream"))
    stream = (
        sse("message_start", {"message": {"id": "msg_1", "usage": {
            "input_tokens": 25, "output_tokens": 1, "cache_read_input_tokens": 5}}})
        + sse("content_block_start", {"index": 0,
                                      "content_block": {"type": "text", "text": ""}})
        + sse("content_block_delta", {"index": 0,
                                      "delta": {"type": "text_delta", "text": "Hi"}})
        + sse("message_delta", {"delta": {"stop_reason": "end_turn"},
                                "usage": {"output_tokens": 7}})
        + sse("message_stop", {})
    )
    sent = []
    for start in range(0, len(stream), 50):
        piece = stream[start:start + 50]
        reply = await processor.handle(response_body(piece, end_of_stream=False))
        assert isinstance(reply, Continue)
        sent.append(piece if reply.body is None else reply.body)
    assert await processor.handle(response_body(b"", end_of_stream=True)) == Continue()
    assert b"".join(sent) == stream  # re-framed event by event: the same bytes
    assert processor.usage == Usage(input_tokens=30, output_tokens=7, cached_input_tokens=5)


async def test_anthropic_overloaded_is_503_in_anthropic_shape() -> None:
    processor = await through_messages_door(messages("claude-haiku"))
    await processor.handle(response_headers("529", retry_after="3"))
    reply = await processor.handle(response_body(
        anthropic_error("overloaded_error", "Overloaded")))
    assert reply == Respond(
        status=503,
        body=anthropic_error("overloaded_error", "The provider is overloaded; retry later."),
        headers=[JSON_CT, *ant_tags(processor), ("retry-after", "3")],
        details="asc_provider_status_529",
        metadata=ant_metadata(processor, error="gateway_unavailable", dialect="anthropic"),
    )


# -- the OpenAI door on an Anthropic backend ------------------------------------------------


@pytest.fixture
def fixed_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """`created` of translated completions comes from the translator's clock."""
    monkeypatch.setitem(TRANSLATORS, (Dialect.OPENAI, Backend.ANTHROPIC),
                        functools.partial(OpenAIToAnthropic, clock=lambda: float(NOW)))


async def through_chat_door(payload: dict[str, Any]) -> tuple[RequestProcessor, Continue]:
    processor = make_processor()
    assert isinstance(await processor.handle(chat_headers()), Continue)
    reply = await processor.handle(request_body(payload))
    assert isinstance(reply, Continue)
    return processor, reply


async def test_chat_request_to_anthropic_is_translated(fixed_clock: None) -> None:
    processor, reply = await through_chat_door({
        "model": "claude-haiku", "user": "u-7",
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "h\u00e9llo"}]})
    body = ('{"model":"claude-3-5-haiku-20241022","max_tokens":4096,"system":"Be brief.",'
            '"messages":[{"role":"user","content":"h\u00e9llo"}],'
            '"metadata":{"user_id":"u-7"}}').encode()
    assert reply == Continue(
        set_headers=[
            ("x-asc-cluster", "prov_ant"),
            (":path", "/anthropic/v1/messages"),
            ("anthropic-version", "2023-06-01"),
            ("x-api-key", KEY_ANT),
            ("content-length", str(len(body))),
        ],
        body=body,
        clear_route_cache=True,
        metadata=ant_metadata(processor),
    )
    assert processor.dialect is Dialect.OPENAI


async def test_anthropic_message_is_translated_to_a_chat_completion(fixed_clock: None) -> None:
    processor, _ = await through_chat_door({
        "model": "claude-haiku", "messages": [{"role": "user", "content": "hi"}]})
    await processor.handle(response_headers("200"))
    reply = await processor.handle(response_body(
        b'{"id":"msg_01","type":"message","role":"assistant",'
        b'"model":"claude-3-5-haiku-20241022","content":[{"type":"text","text":"Hi!"}],'
        b'"stop_reason":"end_turn","stop_sequence":null,'
        b'"usage":{"input_tokens":10,"output_tokens":3}}'))
    completion = (
        b'{"id":"msg_01","object":"chat.completion","created":1700000000,'
        b'"model":"claude-3-5-haiku-20241022","choices":[{"index":0,"message":'
        b'{"role":"assistant","content":"Hi!"},"logprobs":null,"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":10,"completion_tokens":3,"total_tokens":13,'
        b'"prompt_tokens_details":{"cached_tokens":0}}}')
    # 10 x 0.8 + 3 x 4 micro-USD.
    assert reply == Continue(
        set_headers=[("x-asc-cost-usd", "0.000020")],
        body=completion)
    assert processor.usage == Usage(10, 3)


@pytest.mark.parametrize(("upstream", "body", "status", "expected"), [
    ("400", anthropic_error("invalid_request_error", "max_tokens: 999999 > 8192"), 400,
     openai_error("max_tokens: 999999 > 8192", "invalid_request_error", "invalid_request")),
    ("529", anthropic_error("overloaded_error", "Overloaded"), 503,
     openai_error("The provider is overloaded; retry later.", "service_unavailable",
                  "gateway_unavailable")),
])
async def test_anthropic_errors_are_rendered_for_the_openai_door(
    upstream: str, body: bytes, status: int, expected: bytes,
) -> None:
    processor, _ = await through_chat_door({
        "model": "claude-haiku", "messages": [{"role": "user", "content": "hi"}]})
    assert await processor.handle(response_headers(upstream)) == Continue(
        response_body_mode=BodyMode.BUFFERED_PARTIAL)
    reply = await processor.handle(response_body(body))
    assert reply == Respond(
        status=status,
        body=expected,
        headers=[JSON_CT, *ant_tags(processor)],
        details=f"asc_provider_status_{upstream}",
        metadata=ant_metadata(processor, error=json.loads(expected)["error"]["code"]),
    )


@pytest.mark.parametrize(("cache_write", "expected"), [
    (None, 8 + 80 + 160 + 80),      # default: twice the input price
    (1_000_000, 8 + 80 + 100 + 80),  # configured: 1.25 x input (Anthropic's 5-minute write)
])
def test_cache_writes_are_priced_at_the_cache_write_price(
        cache_write: int | None, expected: int) -> None:
    price = Price(input_micro_per_mtok=800_000, output_micro_per_mtok=4_000_000,
                  cached_input_micro_per_mtok=80_000, cache_write_micro_per_mtok=cache_write)
    usage = Usage(input_tokens=1110, output_tokens=20, cached_input_tokens=1000,
                  cache_write_input_tokens=100)
    assert usage_cost(price, usage) == expected


def test_cache_write_price_is_read_from_config() -> None:
    config = parse_config(CONFIG.replace(
        "cached_input_per_mtok: 0.08}", "cached_input_per_mtok: 0.08, "
        "cache_write_per_mtok: 1.0}"))
    assert config.models["claude-haiku"].price.cache_write_rate == 1_000_000
    assert parse_config(CONFIG).models["claude-haiku"].price.cache_write_rate == 1_600_000
