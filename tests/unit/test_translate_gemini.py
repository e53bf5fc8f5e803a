"""Gemini translation, both doors: request golden bodies and refusals, responses, usage
(`usageMetadata` incl. cached, thought and tool-prompt tokens), streams fed in any split,
and Google's errors in the client's dialect."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extproc.errors import GatewayError
from extproc.translate.anthropic_gemini import AnthropicToGemini
from extproc.translate.gemini import (
    GeminiChunksToOpenAIChunks,
    OpenAIToGemini,
    gemini_path,
    usage_from_gemini,
)
from extproc.translate.sse import SseDecoder
from extproc.translate.types import NO_OUTPUT_LIMIT, OutputLimit, Usage

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def clock() -> float:
    return 1_700_000_000.0


def openai_request(body: dict[str, Any], *, model: str = "gemini-2.0-flash",
                   limit: OutputLimit = NO_OUTPUT_LIMIT) -> tuple[str, dict[str, Any]]:
    upstream = OpenAIToGemini(clock=clock).request(
        {"model": "m", **body}, upstream_model=model, api_version=None, output_limit=limit)
    assert upstream.headers == ()
    return upstream.path, json.loads(upstream.body)


def anthropic_request(body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    upstream = AnthropicToGemini(clock=clock).request(
        {"model": "m", "max_tokens": 100, **body}, upstream_model="gemini-2.0-flash",
        api_version=None)
    return upstream.path, json.loads(upstream.body)


def refused(body: dict[str, Any], *, door: str = "openai") -> tuple[str, str | None]:
    build = openai_request if door == "openai" else anthropic_request
    with pytest.raises(GatewayError) as caught:
        build(body)
    assert caught.value.status == 400
    return caught.value.message, caught.value.param


# --------------------------------------------------------------------------- request


def test_paths_carry_model_method_and_alt_sse() -> None:
    assert gemini_path("gemini-2.0-flash", stream=False) == \
        "/v1beta/models/gemini-2.0-flash:generateContent"
    assert gemini_path("gemini-2.0-flash", stream=True) == \
        "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    assert gemini_path("tunedModels/my-model", stream=False) == \
        "/v1beta/tunedModels/my-model:generateContent"
    assert gemini_path("a b?c", stream=False) == "/v1beta/models/a%20b%3Fc:generateContent"


def test_golden_openai_request() -> None:
    path, body = openai_request({
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": [{"type": "text", "text": "No lists."}]},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather here?"},
                {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBO Rw=="}}]},
            {"role": "assistant", "content": "Checking.", "tool_calls": [
                {"id": "call_a", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]},
            {"role": "tool", "tool_call_id": "call_a", "content": '{"temp": 3}'},
            {"role": "tool", "tool_call_id": "call_a", "content": "plain text"},
            {"role": "user", "content": "Thanks"},
        ],
        "max_tokens": 300, "max_completion_tokens": 200, "temperature": 1.5, "top_p": 0.9,
        "stop": "END", "n": 2, "seed": 7, "presence_penalty": 0.5, "frequency_penalty": 0,
        "response_format": {"type": "json_object"}, "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": True, "user": "u1", "store": False, "stream": True,
        "stream_options": {"include_usage": True},
    })
    assert path == "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    assert body == {
        "contents": [
            {"role": "user", "parts": [
                {"text": "Weather here?"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw=="}}]},
            {"role": "model", "parts": [
                {"text": "Checking."},
                {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"temp": 3}}},
                {"functionResponse": {"name": "get_weather",
                                      "response": {"content": "plain text"}}},
                {"text": "Thanks"}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}, {"text": "No lists."}]},
        "tools": [{"functionDeclarations": [{
            "name": "get_weather", "description": "Weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY",
                                                 "allowedFunctionNames": ["get_weather"]}},
        "generationConfig": {
            "maxOutputTokens": 200, "temperature": 1.5, "topP": 0.9, "presencePenalty": 0.5,
            "frequencyPenalty": 0, "stopSequences": ["END"], "candidateCount": 2, "seed": 7,
            "responseMimeType": "application/json"},
    }


@pytest.mark.parametrize(("choice", "config"), [
    ("auto", {"mode": "AUTO"}), ("none", {"mode": "NONE"}), ("required", {"mode": "ANY"})])
def test_tool_choice_modes(choice: str, config: dict[str, Any]) -> None:
    _, body = openai_request({"messages": [{"role": "user", "content": "hi"}],
                              "tools": [WEATHER], "tool_choice": choice})
    assert body["toolConfig"] == {"functionCallingConfig": config}


def test_minimal_request_and_the_gateways_default_limit() -> None:
    path, body = openai_request({"messages": [{"role": "user", "content": "hi"}]})
    assert path == "/v1beta/models/gemini-2.0-flash:generateContent"
    assert body == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}
    _, held = openai_request({"messages": [{"role": "user", "content": "hi"}]},
                             limit=OutputLimit(default=512))
    assert held["generationConfig"] == {"maxOutputTokens": 512}
    _, own = openai_request({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9},
                            limit=OutputLimit(field="max_completion_tokens"))
    assert own["generationConfig"] == {"maxOutputTokens": 9}


def test_tool_without_arguments_sends_no_empty_object_schema() -> None:
    tool = {"type": "function", "function": {
        "name": "now", "parameters": {"type": "object", "properties": {}}}}
    _, body = openai_request({"messages": [{"role": "user", "content": "hi"}], "tools": [tool]})
    assert body["tools"] == [{"functionDeclarations": [{"name": "now"}]}]


@pytest.mark.parametrize(("extra", "message", "param"), [
    ({"logit_bias": {"1": 2}}, "The parameter 'logit_bias' is not supported by Gemini.",
     "logit_bias"),
    ({"parallel_tool_calls": False},
     "The parameter 'parallel_tool_calls' is not supported by Gemini.", "parallel_tool_calls"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "The parameter 'response_format' is not supported by Gemini.", "response_format"),
    ({"reasoning_effort": "low"}, "The parameter 'reasoning_effort' is not supported by Gemini.",
     "reasoning_effort"),
    ({"top_k": 3}, "The parameter 'top_k' is not supported by Gemini.", "top_k"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]}]},
     "Gemini accepts images only as base64 data: URLs.", "messages[0].content[0].image_url.url"),
    ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]},
     "Only 'text' and 'image_url' content parts are supported by Gemini.",
     "messages[0].content[0].type"),
    ({"messages": [{"role": "function", "name": "f", "content": "x"}]},
     "Messages with role 'function' are not supported by Gemini; use 'tool' messages.",
     "messages[0].role"),
    ({"messages": [{"role": "user", "content": "hi"},
                   {"role": "tool", "tool_call_id": "call_x", "content": "r"}]},
     "'messages[1].tool_call_id' does not name a tool call of an earlier assistant message.",
     "messages[1].tool_call_id"),
    ({"tools": [{"type": "code_interpreter"}]}, "Only 'function' tools are supported by Gemini.",
     "tools[0].type"),
    ({"seed": 1.5}, "'seed' must be an integer.", "seed"),
])
def test_untranslatable_requests_are_refused(extra: dict[str, Any], message: str,
                                             param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    assert refused(body) == (message, param)


def test_neutral_values_pass() -> None:
    _, body = openai_request({"messages": [{"role": "user", "content": "hi"}],
                              "logprobs": False, "logit_bias": {}, "modalities": ["text"],
                              "response_format": {"type": "text"}, "n": 1})
    assert body == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def test_golden_anthropic_request() -> None:
    path, body = anthropic_request({
        "system": [{"type": "text", "text": "Be brief."}],
        "messages": [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "...", "signature": "s"},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                 "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "cold"},
                {"type": "text", "text": "And tomorrow?"}]},
        ],
        "tools": [{"name": "get_weather", "input_schema": {
            "type": "object", "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "any"}, "top_k": 4, "top_p": 0.5,
        "stop_sequences": ["X"], "metadata": {"user_id": "u"}, "stream": True,
    })
    assert path == "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
    assert body == {
        "contents": [
            {"role": "user", "parts": [{"text": "Weather?"}]},
            {"role": "model", "parts": [
                {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}}]},
            {"role": "user", "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"content": "cold"}}},
                {"text": "And tomorrow?"}]},
        ],
        "systemInstruction": {"parts": [{"text": "Be brief."}]},
        "tools": [{"functionDeclarations": [{"name": "get_weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}}}]}],
        "toolConfig": {"functionCallingConfig": {"mode": "ANY"}},
        "generationConfig": {"maxOutputTokens": 100, "topP": 0.5, "topK": 4,
                             "stopSequences": ["X"]},
    }


@pytest.mark.parametrize(("extra", "message", "param"), [
    ({"thinking": {"type": "enabled", "budget_tokens": 1024}},
     "The parameter 'thinking' is not supported by Gemini.", "thinking"),
    ({"top_k": 0}, "'top_k' must be a positive integer.", "top_k"),
    ({"system": "s", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "a"},
        {"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}]}]},
     "'messages[0].content[1].tool_use_id' does not name a tool_use block of an earlier "
     "assistant message.", "messages[0].content[1].tool_use_id"),
    ({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "url", "url": "https://x/cat.png"}}]}]},
     "Gemini accepts images only as base64 sources.", "messages[0].content[0].source"),
    ({"tools": [{"name": "f", "input_schema": {"type": "object"}}],
      "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}},
     "The parameter 'tool_choice.disable_parallel_tool_use' is not supported by Gemini.",
     "tool_choice.disable_parallel_tool_use"),
])
def test_anthropic_door_refusals(extra: dict[str, Any], message: str, param: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], **extra}
    assert refused(body, door="anthropic") == (message, param)


# --------------------------------------------------------------------------- response

RESPONSE = {
    "candidates": [{
        "content": {"role": "model", "parts": [
            {"text": "Let me think", "thought": True},
            {"text": "Checking "}, {"text": "now."},
            {"functionCall": {"name": "get_weather", "args": {"city": "Oslo"}}},
            {"functionCall": {"id": "fc-7", "name": "get_time", "args": {}}}]},
        "finishReason": "STOP", "index": 0}],
    "usageMetadata": {"promptTokenCount": 120, "candidatesTokenCount": 30,
                      "cachedContentTokenCount": 100, "thoughtsTokenCount": 50,
                      "toolUsePromptTokenCount": 5, "totalTokenCount": 205},
    "modelVersion": "gemini-2.5-pro", "responseId": "resp-1",
}


def test_usage_metadata_counts_thoughts_as_output_and_cache_as_input() -> None:
    assert usage_from_gemini(RESPONSE["usageMetadata"]) == Usage(
        input_tokens=125, output_tokens=80, cached_input_tokens=100)
    assert usage_from_gemini({"promptTokenCount": 4}) == Usage(4, 0, 0)
    assert usage_from_gemini({"candidatesTokenCount": 4}) is None
    assert usage_from_gemini(None) is None


def test_golden_openai_response() -> None:
    translated = OpenAIToGemini(clock=clock).response(200, json.dumps(RESPONSE).encode())
    assert translated.usage == Usage(125, 80, 100)
    assert json.loads(translated.body) == {
        "id": "resp-1", "object": "chat.completion", "created": 1_700_000_000,
        "model": "gemini-2.5-pro",
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Checking now.", "tool_calls": [
                {"id": "call_0", "type": "function",
                 "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
                {"id": "fc-7", "type": "function",
                 "function": {"name": "get_time", "arguments": "{}"}}]}}],
        "usage": {"prompt_tokens": 125, "completion_tokens": 80, "total_tokens": 205,
                  "prompt_tokens_details": {"cached_tokens": 100}},
    }


def test_golden_anthropic_response() -> None:
    translated = AnthropicToGemini(clock=clock).response(200, json.dumps(RESPONSE).encode())
    assert translated.usage == Usage(125, 80, 100)
    assert json.loads(translated.body) == {
        "id": "resp-1", "type": "message", "role": "assistant", "model": "gemini-2.5-pro",
        "content": [
            {"type": "text", "text": "Checking now."},
            {"type": "tool_use", "id": "call_0", "name": "get_weather",
             "input": {"city": "Oslo"}},
            {"type": "tool_use", "id": "fc-7", "name": "get_time", "input": {}}],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 25, "output_tokens": 80, "cache_read_input_tokens": 100,
                  "cache_creation_input_tokens": 0},
    }


@pytest.mark.parametrize(("reason", "finish"), [
    ("STOP", "stop"), ("MAX_TOKENS", "length"), ("SAFETY", "content_filter"),
    ("RECITATION", "content_filter"), ("PROHIBITED_CONTENT", "content_filter"),
    ("MALFORMED_FUNCTION_CALL", "stop"), ("OTHER", "stop"), (None, "stop")])
def test_finish_reasons(reason: str | None, finish: str) -> None:
    response = {"candidates": [{"content": {"parts": [{"text": "x"}]}, "finishReason": reason}],
                "usageMetadata": {"promptTokenCount": 1, "candidatesTokenCount": 1}}
    body = json.loads(OpenAIToGemini(clock=clock).response(200, json.dumps(response).encode())
                      .body)
    assert body["choices"][0]["finish_reason"] == finish


def test_several_candidates_are_several_choices() -> None:
    response = {"candidates": [
        {"content": {"parts": [{"text": "a"}]}, "finishReason": "STOP", "index": 0},
        {"content": {"parts": [{"text": "b"}]}, "finishReason": "MAX_TOKENS", "index": 1}],
        "usageMetadata": {"promptTokenCount": 2, "candidatesTokenCount": 2}}
    body = json.loads(OpenAIToGemini(clock=clock).response(200, json.dumps(response).encode())
                      .body)
    assert [(c["index"], c["message"]["content"], c["finish_reason"])
            for c in body["choices"]] == [(0, "a", "stop"), (1, "b", "length")]


def test_blocked_prompt_is_content_filter() -> None:
    response = {"promptFeedback": {"blockReason": "SAFETY"},
                "usageMetadata": {"promptTokenCount": 7, "totalTokenCount": 7}}
    translated = OpenAIToGemini(clock=clock).response(200, json.dumps(response).encode())
    assert translated.usage == Usage(7, 0, 0)
    assert json.loads(translated.body)["choices"] == [{
        "index": 0, "message": {"role": "assistant", "content": None}, "logprobs": None,
        "finish_reason": "content_filter"}]


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"candidates": "x"}'])
def test_invalid_success_body_is_provider_error(body: bytes) -> None:
    for translator in (OpenAIToGemini(), AnthropicToGemini()):
        with pytest.raises(GatewayError) as caught:
            translator.response(200, body)
        assert (caught.value.status, caught.value.message) == (
            502, "The provider sent an invalid response.")


# --------------------------------------------------------------------------- errors

KEY_INVALID = json.dumps({"error": {
    "code": 400, "message": "API key not valid. Please pass a valid API key.",
    "status": "INVALID_ARGUMENT", "details": [{
        "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
        "domain": "googleapis.com"}]}}).encode()


def test_invalid_key_is_the_gateways_credential_in_both_dialects() -> None:
    status, body = OpenAIToGemini().error(400, KEY_INVALID, {})
    assert (status, json.loads(body)) == (502, {"error": {
        "message": "The provider rejected the gateway's credential.", "type": "upstream_error",
        "param": None, "code": "provider_error"}})
    status, body = AnthropicToGemini().error(400, KEY_INVALID, {})
    assert (status, json.loads(body)) == (502, {"type": "error", "error": {
        "type": "api_error", "message": "The provider rejected the gateway's credential."}})


def test_google_bad_request_keeps_its_scrubbed_message() -> None:
    body = json.dumps({"error": {"code": 400, "status": "INVALID_ARGUMENT", "message":
                                 "* GenerateContentRequest.contents: contents is not specified"
                                 }}).encode()
    status, out = OpenAIToGemini().error(400, body, {})
    assert (status, json.loads(out)["error"]["message"]) == (
        400, "* GenerateContentRequest.contents: contents is not specified")
    quota = json.dumps({"error": {"code": 429, "status": "RESOURCE_EXHAUSTED",
                                  "message": "Quota exceeded for project 1234567"}}).encode()
    status, out = AnthropicToGemini().error(429, quota, {})
    assert (status, json.loads(out)["error"]["message"]) == (
        429, "The provider's rate limit was reached; retry later.")


# --------------------------------------------------------------------------- stream


def sse(payload: object) -> str:
    return f"data: {json.dumps(payload)}\r\n\r\n"


def gemini_stream(texts: list[str], *, call: bool = False, finish: str | None = "STOP",
                  usage: dict[str, int] | None = None) -> bytes:
    usage = usage or {"promptTokenCount": 3, "candidatesTokenCount": len(texts),
                      "cachedContentTokenCount": 1, "thoughtsTokenCount": 2}
    events = []
    for i, text in enumerate(texts):
        events.append({"candidates": [{"content": {"role": "model", "parts": [{"text": text}]},
                                       "index": 0}],
                       "usageMetadata": {"promptTokenCount": 3},
                       "modelVersion": "gemini-x", "responseId": "r1"})
        if i == 0:
            events[0]["candidates"][0]["content"]["parts"].insert(
                0, {"text": "hmm", "thought": True})
    last: dict[str, Any] = {"candidates": [{"content": {"role": "model", "parts": []},
                                            "index": 0}],
                            "usageMetadata": usage, "modelVersion": "gemini-x",
                            "responseId": "r1"}
    if call:
        last["candidates"][0]["content"]["parts"] = [
            {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]
    if finish is not None:
        last["candidates"][0]["finishReason"] = finish
    events.append(last)
    return "".join(sse(event) for event in events).encode()


def events(raw: bytes) -> list[Any]:
    decoder = SseDecoder()
    out = decoder.feed(raw) + decoder.flush()
    return [e.data if e.data == "[DONE]" else json.loads(e.data) for e in out]


def test_golden_openai_stream_with_usage() -> None:
    translator = OpenAIToGemini(clock=clock)
    translator.request({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                        "stream": True, "stream_options": {"include_usage": True}},
                       upstream_model="gemini-x", api_version=None)
    stream = translator.stream()
    out = stream.feed(gemini_stream(["Hello", " you"]))
    assert stream.usage is None  # not before the upstream stream ended
    out += stream.flush()
    head = {"id": "r1", "object": "chat.completion.chunk", "created": 1_700_000_000,
            "model": "gemini-x"}
    assert events(out) == [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                              "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"content": "Hello"},
                              "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"content": " you"},
                              "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {**head, "choices": [], "usage": {
            "prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
            "prompt_tokens_details": {"cached_tokens": 1}}},
        "[DONE]",
    ]
    assert stream.usage == Usage(3, 4, 1)
    assert stream.output_tokens_so_far == 2


def test_openai_stream_tool_call_without_usage_chunk() -> None:
    stream = GeminiChunksToOpenAIChunks(model="m", include_usage=False, clock=clock)
    out = events(stream.feed(gemini_stream([], call=True)) + stream.flush())
    assert [event["choices"] for event in out[:-1]] == [
        [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}],
        [{"index": 0, "delta": {"tool_calls": [{
            "index": 0, "id": "call_0", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
          "finish_reason": None}],
        [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}],
    ]
    assert out[-1] == "[DONE]"
    assert stream.usage == Usage(3, 2, 1)


def test_stream_cut_before_its_finish_reports_no_usage_and_no_done() -> None:
    stream = GeminiChunksToOpenAIChunks(model="m", include_usage=True, clock=clock)
    out = stream.feed(gemini_stream(["Hello", " you"], finish=None)) + stream.flush()
    assert b"[DONE]" not in out
    assert stream.usage is None
    assert stream.output_tokens_so_far == 2


def test_stream_error_event_is_scrubbed_and_ends() -> None:
    stream = GeminiChunksToOpenAIChunks(model="m", include_usage=True, clock=clock)
    error = sse({"error": {"code": 500, "status": "INTERNAL",
                           "message": "boom key sk-abcdef1234567890"}}).encode()
    out = stream.feed(error) + stream.feed(gemini_stream(["late"])) + stream.flush()
    assert events(out) == [{"error": {"message": "boom key [redacted]", "type": "upstream_error",
                                      "param": None, "code": "provider_error"}}]
    assert stream.usage is None


def test_golden_anthropic_stream() -> None:
    translator = AnthropicToGemini(clock=clock)
    translator.request({"model": "m", "max_tokens": 5, "stream": True,
                        "messages": [{"role": "user", "content": "hi"}]},
                       upstream_model="gemini-x", api_version=None)
    stream = translator.stream()
    raw = gemini_stream(["Hello", " you"], usage={"promptTokenCount": 3,
                                                  "candidatesTokenCount": 2})
    out = b"".join(stream.feed(raw[i:i + 5]) for i in range(0, len(raw), 5)) + stream.flush()
    kinds = [event["type"] for event in events(out)]
    assert kinds == ["message_start", "content_block_start", "content_block_delta",
                     "content_block_delta", "content_block_stop", "message_delta",
                     "message_stop"]
    delta = events(out)[5]
    assert delta == {"type": "message_delta",
                     "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                     "usage": {"input_tokens": 3, "output_tokens": 2,
                               "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}}
    assert stream.usage == Usage(3, 2, 0)
    assert (stream.output_tokens_so_far, stream.first_token_seen) == (2, True)


def test_anthropic_stream_cut_short_has_no_message_stop() -> None:
    stream = AnthropicToGemini(clock=clock).stream()
    out = stream.feed(gemini_stream(["Hello"], finish=None)) + stream.flush()
    assert b"message_stop" not in out
    assert stream.usage is None


@settings(max_examples=40, deadline=None)
@given(texts=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=5),
       call=st.booleans(), cuts=st.lists(st.integers(min_value=1, max_value=40), max_size=12))
def test_streams_are_the_same_however_the_bytes_split(texts: list[str], call: bool,
                                                      cuts: list[int]) -> None:
    raw = gemini_stream(texts, call=call)
    for make in (lambda: GeminiChunksToOpenAIChunks(model="m", include_usage=True, clock=clock),
                 lambda: AnthropicToGemini(clock=clock).stream()):
        whole = make()
        expected = whole.feed(raw) + whole.flush()
        pieces, at = make(), 0
        out = b""
        for cut in cuts:
            out += pieces.feed(raw[at:at + cut])
            at += cut
        out += pieces.feed(raw[at:]) + pieces.flush()
        assert events(out) == events(expected)
        assert (pieces.usage, pieces.output_tokens_so_far) == (
            whole.usage, whole.output_tokens_so_far)


def test_anthropic_base64_image_becomes_inline_data() -> None:
    _, body = anthropic_request({"messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/webp",
                                     "data": "UklGRg=="}},
        {"type": "text", "text": "What is it?"}]}]})
    assert body["contents"] == [{"role": "user", "parts": [
        {"inlineData": {"mimeType": "image/webp", "data": "UklGRg=="}},
        {"text": "What is it?"}]}]
