"""A Gemini backend through real Envoy, extproc, redis-server and the emulator's Gemini
shape: both front doors with the official SDKs, plain, streamed and with tools; the key
Google sees; budgets settled from `usageMetadata`; Google's errors in the client's
dialect."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pytest
import redis
from openai.types.chat import ChatCompletion, ChatCompletionMessageFunctionToolCall

from extproc.budgets.policy import estimate_input_tokens
from extproc.devstack import Stack
from extproc.emulator.app import key_fingerprint
from tests.conftest import (
    ACME_KEY,
    CANARIES,
    PROVIDER_KEY_EU,
    Gateway,
    gateway_config,
    start_gateway,
)
from tests.polling import wait_for

REPLY = "Hello from the emulator."
PROMPT = "Hello there"  # 11 characters: 3 prompt tokens in every emulator shape
UPSTREAM = "gemini-2.5-flash"  # a thinking model: the emulator reports 8 thought tokens
PRICE = {"input_per_mtok": 100, "output_per_mtok": 2000}
# 3 prompt tokens at 100 micro-USD + (4 answer + 8 thought) tokens at 2000 micro-USD.
PLAIN_COST = 3 * 100 + (4 + 8) * 2000
WEATHER_TOOL: Any = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}
GENERATE = f"/v1beta/models/{UPSTREAM}:generateContent"
STREAM = f"/v1beta/models/{UPSTREAM}:streamGenerateContent"


def _document(redis_port: int) -> Any:
    def document(emulator_port: int) -> dict[str, Any]:
        doc = gateway_config(emulator_port)
        doc["redis"] = {"url": f"redis://127.0.0.1:{redis_port}/0"}
        doc["providers"]["gem-eu"] = {
            "kind": "gemini", "base_url": f"http://127.0.0.1:{emulator_port}",
            "region": "europe-west4", "zone": "eu", "cluster": "gem_eu",
            "credentials": ["emu-eu-1"]}
        doc["models"]["gemini-flash"] = {
            "price": PRICE, "deployments": [{"provider": "gem-eu", "model": UPSTREAM}]}
        doc["tenants"]["acme"]["models"] = ["gemini-flash"]
        doc["tenants"]["acme"]["budgets"] = [
            {"scope": "tenant", "window": "month", "limit_usd": 10}]
        return doc
    return document


@pytest.fixture(scope="module")
def gemini(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, int]]:
    workdir = tmp_path_factory.mktemp("gemini")
    with Stack(workdir) as stack:
        _, redis_port = stack.start_redis()
        gateway = start_gateway(stack, workdir / "config", document=_document(redis_port),
                                emulator_args=("--shape", "gemini"))
        yield gateway, redis_port


@pytest.fixture
def gw(gemini: tuple[Gateway, int]) -> Gateway:
    gemini[0].emulator.clear()
    return gemini[0]


def _spent(redis_port: int) -> tuple[int, int]:
    """(spent, held) micro-USD of acme's monthly tenant budget."""
    client = redis.Redis(port=redis_port, decode_responses=True)
    try:
        keys = list(client.scan_iter("asc:{t:acme}:b:tenant:acme:m*"))
        if not keys:  # nothing charged yet this month
            return 0, 0
        [key] = keys
        spent, held = client.hmget(key, "spent", "held")
    finally:
        client.close()
    return int(spent or 0), int(held or 0)


def _settled(redis_port: int, spent: int) -> bool:
    return _spent(redis_port) == (spent, 0)


def _openai(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gw.base_url}/v1", api_key=ACME_KEY, max_retries=0,
                         default_headers={"x-goog-api-key": CANARIES[1]})


def _anthropic(gw: Gateway) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=gw.base_url, api_key=ACME_KEY, max_retries=0)


def _only_google_key(gw: Gateway, path: str, query: str = "") -> dict[str, Any]:
    """The one request the emulator saw: Gemini's path, only the gateway's Gemini key,
    no client credential; its body."""
    [seen] = gw.emulator.requests()
    assert (seen["method"], seen["path"], seen["query"]) == ("POST", path, query)
    headers = seen["headers"]
    assert headers["x-goog-api-key"] == key_fingerprint(PROVIDER_KEY_EU)
    assert not {"authorization", "x-api-key", "api-key"} & set(headers)
    for canary in CANARIES:
        assert canary not in json.dumps(seen)
    body: dict[str, Any] = json.loads(seen["body"])
    assert "model" not in body  # the model travels in the path
    return body


def _spent_before(redis_port: int) -> int:
    assert wait_for(lambda: _spent(redis_port)[1] == 0)
    return _spent(redis_port)[0]


def test_openai_sdk_plain_charges_usage_metadata(gemini: tuple[Gateway, int],
                                                 gw: Gateway) -> None:
    redis_port = gemini[1]
    before = _spent_before(redis_port)
    raw = _openai(gw).chat.completions.with_raw_response.create(
        model="gemini-flash", messages=[{"role": "system", "content": ""},
                                        {"role": "user", "content": PROMPT}],
        max_tokens=50, temperature=0.5)
    completion = raw.parse()
    assert completion.choices[0].message.content == REPLY
    assert completion.choices[0].finish_reason == "stop"
    assert completion.model == UPSTREAM
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 12)
    assert raw.headers["x-asc-provider"] == "gem-eu"
    assert raw.headers["x-asc-cost-usd"] == "0.024300"
    body = _only_google_key(gw, GENERATE)
    assert body == {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
                    "generationConfig": {"maxOutputTokens": 50, "temperature": 0.5}}
    assert wait_for(lambda: _settled(redis_port, before + PLAIN_COST))


def test_openai_sdk_stream_charges_usage_metadata(gemini: tuple[Gateway, int],
                                                  gw: Gateway) -> None:
    redis_port = gemini[1]
    before = _spent_before(redis_port)
    pieces, usage, finish = [], None, None
    for chunk in _openai(gw).chat.completions.create(
            model="gemini-flash", messages=[{"role": "user", "content": PROMPT}],
            stream=True, stream_options={"include_usage": True}):
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert ("".join(pieces), finish) == (REPLY, "stop")
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 12)
    body = _only_google_key(gw, STREAM, "alt=sse")
    # A budget tenant that set no limit gets the gateway's, so the hold covers the answer.
    assert body["generationConfig"] == {"maxOutputTokens": 4096}
    assert wait_for(lambda: _settled(redis_port, before + PLAIN_COST))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_openai_sdk_tools_round_trip(gw: Gateway, stream: bool) -> None:
    client = _openai(gw)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    completion: ChatCompletion
    if stream:
        with client.chat.completions.stream(model="gemini-flash", messages=messages,
                                            tools=[WEATHER_TOOL]) as events:
            completion = events.get_final_completion()
    else:
        completion = client.chat.completions.create(model="gemini-flash", messages=messages,
                                                    tools=[WEATHER_TOOL])
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    [call] = choice.message.tool_calls
    assert isinstance(call, ChatCompletionMessageFunctionToolCall)
    assert (call.function.name, json.loads(call.function.arguments)) == (
        "get_weather", {"city": "Paris"})
    body = _only_google_key(gw, STREAM if stream else GENERATE, "alt=sse" if stream else "")
    assert body["tools"] == [{"functionDeclarations": [WEATHER_TOOL["function"]]}]
    gw.emulator.clear()
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    answer = client.chat.completions.create(model="gemini-flash", messages=messages,
                                            tools=[WEATHER_TOOL])
    assert answer.choices[0].message.content == REPLY
    body = _only_google_key(gw, GENERATE)
    assert body["contents"][1:] == [
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather",
                                                      "args": {"city": "Paris"}}}]},
        {"role": "user", "parts": [{"functionResponse": {
            "name": "get_weather", "response": {"forecast": "sunny"}}}]},
    ]


def test_anthropic_sdk_plain(gemini: tuple[Gateway, int], gw: Gateway) -> None:
    redis_port = gemini[1]
    before = _spent_before(redis_port)
    message = _anthropic(gw).messages.create(
        model="gemini-flash", max_tokens=11, system="Be brief.", extra_body={"top_k": 5},
        messages=[{"role": "user", "content": PROMPT}])
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hello from the"  # type: ignore[union-attr]
    assert message.stop_reason == "max_tokens"
    # "Be brief." + "Hello there" = 20 characters: 5 tokens; 8 thoughts (within the
    # limit, as at Google) + 3 words.
    assert (message.usage.input_tokens, message.usage.output_tokens) == (5, 11)
    body = _only_google_key(gw, GENERATE)
    assert body == {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}],
                    "systemInstruction": {"parts": [{"text": "Be brief."}]},
                    "generationConfig": {"maxOutputTokens": 11, "topK": 5}}
    assert wait_for(lambda: _settled(redis_port, before + 5 * 100 + 11 * 2000))


def test_anthropic_sdk_stream(gemini: tuple[Gateway, int], gw: Gateway) -> None:
    redis_port = gemini[1]
    before = _spent_before(redis_port)
    with _anthropic(gw).messages.stream(
            model="gemini-flash", max_tokens=100,
            messages=[{"role": "user", "content": PROMPT}]) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == REPLY
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 12)
    _only_google_key(gw, STREAM, "alt=sse")
    assert wait_for(lambda: _settled(redis_port, before + PLAIN_COST))


def test_google_errors_in_the_client_dialect(gemini: tuple[Gateway, int],
                                             gw: Gateway) -> None:
    redis_port = gemini[1]
    before = _spent_before(redis_port)
    gw.emulator.queue_fault(status=429, retry_after=7)
    with pytest.raises(openai.RateLimitError) as limited:
        _openai(gw).chat.completions.create(
            model="gemini-flash", messages=[{"role": "user", "content": PROMPT}])
    assert limited.value.status_code == 429
    assert limited.value.body == {
        "message": "The provider's rate limit was reached; retry later.",
        "type": "rate_limit_error", "param": None, "code": "rate_limited"}
    assert limited.value.response.headers["retry-after"] == "7"

    gw.emulator.queue_fault(status=400, message="* GenerateContentRequest.contents[0]: bad")
    with pytest.raises(anthropic.BadRequestError) as refused:
        _anthropic(gw).messages.create(model="gemini-flash", max_tokens=5,
                                       messages=[{"role": "user", "content": PROMPT}])
    assert refused.value.status_code == 400
    assert refused.value.body == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "* GenerateContentRequest.contents[0]: bad"}}

    gw.emulator.queue_fault(status=503)
    with pytest.raises(anthropic.InternalServerError) as down:
        _anthropic(gw).messages.create(model="gemini-flash", max_tokens=5,
                                       messages=[{"role": "user", "content": PROMPT}])
    assert down.value.status_code == 502
    assert down.value.body == {"type": "error", "error": {
        "type": "api_error", "message": "The provider failed with status 503."}}
    # Provider errors cost nothing.
    assert wait_for(lambda: _settled(redis_port, before))


def test_google_invalid_key_answer_is_the_gateways_credential(gw: Gateway) -> None:
    """Google answers a wrong key with 400 API_KEY_INVALID: the client must not read it as
    its own bad request."""
    gw.emulator.client.put("/_emulator/keys", json={"keys": ["another-key"]})
    try:
        with pytest.raises(openai.InternalServerError) as caught:
            _openai(gw).chat.completions.create(
                model="gemini-flash", messages=[{"role": "user", "content": PROMPT}])
    finally:
        gw.emulator.client.put("/_emulator/keys", json={"keys": [PROVIDER_KEY_EU]})
    assert caught.value.status_code == 502
    assert caught.value.body == {
        "message": "The provider rejected the gateway's credential.",
        "type": "upstream_error", "param": None, "code": "provider_error"}


def test_untranslatable_request_is_refused_before_google(gw: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        _openai(gw).chat.completions.create(
            model="gemini-flash", messages=[{"role": "user", "content": PROMPT}],
            logit_bias={"1": 1})
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": "The parameter 'logit_bias' is not supported by Gemini.",
        "type": "invalid_request_error", "param": "logit_bias", "code": "invalid_request"}
    assert gw.emulator.requests() == []



CUT = "The provider ended the stream before it was complete; the answer is cut short."


@pytest.mark.parametrize(("path", "payload", "expected"), [
    ("/v1/chat/completions", {}, 'data: {"error": {"message": "' + CUT + '", "type": '
     '"server_error", "param": null, "code": "stream_interrupted"}}\n\n'),
    ("/v1/messages", {"max_tokens": 50}, 'event: error\ndata: {"type": "error", "error": '
     '{"type": "api_error", "message": "' + CUT + '"}}\n\n'),
], ids=["openai", "anthropic"])
def test_gemini_stream_cut_short_is_an_error_event_and_charged_as_seen(
        gemini: tuple[Gateway, int], gw: Gateway, path: str, payload: dict[str, Any],
        expected: str) -> None:
    """Gemini has no terminal event and repeats usageMetadata in every event: a stream
    that ends before a finishReason must still read as cut short, and is charged the
    prompt estimate plus the words that arrived, not the partial usage."""
    redis_port = gemini[1]
    before = _spent_before(redis_port)
    gw.emulator.queue_fault(end_after_chunks=2)
    body = json.dumps({"model": "gemini-flash", "stream": True, **payload,
                       "messages": [{"role": "user", "content": PROMPT}]}).encode()
    response = gw.client.post(path, content=body, headers={
        "authorization": f"Bearer {ACME_KEY}", "content-type": "application/json"})
    assert response.status_code == 200
    assert response.text.endswith(expected), response.text
    assert "[DONE]" not in response.text
    assert "message_stop" not in response.text
    estimate = estimate_input_tokens(len(body))
    assert wait_for(lambda: _settled(redis_port, before + estimate * 100 + 2 * 2000))


def test_gemini_in_stream_error_reaches_the_client_in_its_dialect(gw: Gateway) -> None:
    gw.emulator.queue_fault(stream_error="The model is overloaded.")
    with pytest.raises(openai.APIError) as caught:
        for _ in _openai(gw).chat.completions.create(
                model="gemini-flash", messages=[{"role": "user", "content": PROMPT}],
                stream=True):
            pass
    assert caught.value.message == "The model is overloaded."


def test_no_canary_in_logs_or_metrics(gw: Gateway) -> None:
    """Last in the file, so it runs last: every Gemini call above, including the
    wrong-key and error cases, left no tenant or provider key in a log or metric."""
    places = {"metrics": gw.metrics(),
              **{f"log {p.name}": p.log_text() for p in gw.stack.processes}}
    leaks = [(where, canary[:16]) for where, text in places.items()
             for canary in CANARIES if canary in text]
    assert leaks == []
    assert "request finished" in places["log extproc"]
