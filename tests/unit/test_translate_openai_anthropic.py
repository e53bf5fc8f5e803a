"""OpenAI door -> Anthropic backend: golden requests, responses and streams, round trips."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from extproc.errors import GatewayError
from extproc.translate.anthropic_openai import AnthropicToOpenAI
from extproc.translate.base import Backend, Usage
from extproc.translate.openai_anthropic import OpenAIToAnthropic
from extproc.translate.sse import SseDecoder

CREATED = 1_700_000_000


def translator() -> OpenAIToAnthropic:
    return OpenAIToAnthropic(clock=lambda: CREATED)


def to_anthropic(body: dict[str, Any], model: str = "claude-up") -> dict[str, Any]:
    upstream = translator().request(body, upstream_model=model, api_version=None)
    assert upstream.path == "/v1/messages"
    assert upstream.headers == (("anthropic-version", "2023-06-01"),)
    result: dict[str, Any] = json.loads(upstream.body)
    return result


TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city", "strict": True,
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]

CONVERSATION: list[dict[str, Any]] = [
    {"role": "system", "content": "Be terse."},
    {"role": "developer", "content": [{"type": "text", "text": "Use tools."}]},
    {"role": "user", "content": [
        {"type": "text", "text": "Weather in Paris and Rome? See"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
    ]},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}},
    ]},
    {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
    {"role": "tool", "tool_call_id": "call_2", "content": [{"type": "text", "text": "Rain"}]},
    {"role": "user", "content": "Thanks"},
    {"role": "assistant", "content": "You're welcome."},
    {"role": "user", "content": "Bye", "name": "bob"},
]


def test_golden_request_with_tools_images_and_tool_results() -> None:
    body = {
        "model": "claude-sonnet", "messages": CONVERSATION, "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "parallel_tool_calls": False, "temperature": 0.2, "top_p": 0.9, "stop": ["END", "STOP"],
        "max_completion_tokens": 300, "max_tokens": 500, "user": "u-1", "stream": True,
        "stream_options": {"include_usage": True}, "store": False, "n": 1,
    }
    assert to_anthropic(body) == {
        "model": "claude-up",
        "max_tokens": 300,
        "system": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Use tools."}],
        "messages": [
            {"role": "user", "content": [
                {"type": "text", "text": "Weather in Paris and Rome? See"},
                {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png",
                                             "data": "iVBORw0K"}},
            ]},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Checking."},
                {"type": "tool_use", "id": "call_1", "name": "get_weather",
                 "input": {"city": "Paris"}},
                {"type": "tool_use", "id": "call_2", "name": "get_weather",
                 "input": {"city": "Rome"}},
            ]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "call_1", "content": "Sunny"},
                {"type": "tool_result", "tool_use_id": "call_2", "content": "Rain"},
                {"type": "text", "text": "Thanks"},
            ]},
            {"role": "assistant", "content": "You're welcome."},
            {"role": "user", "content": "Bye"},
        ],
        "tools": [{"name": "get_weather", "description": "Weather for a city",
                   "input_schema": {"type": "object",
                                    "properties": {"city": {"type": "string"}}}}],
        "tool_choice": {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        "temperature": 0.2,
        "top_p": 0.9,
        "stop_sequences": ["END", "STOP"],
        "metadata": {"user_id": "u-1"},
        "stream": True,
    }


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        (None, None, None),
        ("auto", None, {"type": "auto"}),
        ("none", None, {"type": "none"}),
        ("required", None, {"type": "any"}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("required", False, {"type": "any", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        ("auto", True, {"type": "auto"}),
    ],
)
def test_tool_choice_mapping(choice: object, parallel: bool | None, expected: object) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}],
                            "tools": TOOLS}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert to_anthropic(body).get("tool_choice") == expected


def test_minimal_request_defaults() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": "x",
            "tool_choice": "auto", "stream": False}
    assert to_anthropic(body) == {
        "model": "claude-up", "max_tokens": 4096,
        "messages": [{"role": "user", "content": "hi"}], "stop_sequences": ["x"],
    }


def test_tool_without_parameters_gets_empty_object_schema() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "now"}}]}
    assert to_anthropic(body)["tools"] == [
        {"name": "now", "input_schema": {"type": "object", "properties": {}}}]


def test_empty_assistant_turn_is_skipped_and_users_merge() -> None:
    body = {"model": "m", "messages": [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": ""},
        {"role": "user", "content": [{"type": "text", "text": "b"}]}]}
    assert to_anthropic(body)["messages"] == [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]


# --------------------------------------------------------------------------- responses


def message(content: list[dict[str, Any]], stop_reason: str | None,
            usage: dict[str, Any] | None = None) -> bytes:
    return json.dumps({
        "id": "msg_1", "type": "message", "role": "assistant", "model": "claude-up",
        "content": content, "stop_reason": stop_reason, "stop_sequence": None,
        "usage": usage or {"input_tokens": 10, "output_tokens": 5},
    }).encode()


def test_golden_response_with_text_tools_and_cached_usage() -> None:
    body = message(
        [{"type": "thinking", "thinking": "hmm", "signature": "s"},
         {"type": "text", "text": "Let me "}, {"type": "text", "text": "check."},
         {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}}],
        "tool_use",
        {"input_tokens": 10, "output_tokens": 20, "cache_read_input_tokens": 100,
         "cache_creation_input_tokens": 5},
    )
    result = translator().response(200, body)
    assert result.usage == Usage(input_tokens=115, output_tokens=20, cached_input_tokens=100,
                                 cache_write_input_tokens=5)
    completion = json.loads(result.body)
    assert completion == {
        "id": "msg_1", "object": "chat.completion", "created": CREATED, "model": "claude-up",
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": "Let me check.",
            "tool_calls": [{"id": "toolu_1", "type": "function", "function": {
                "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}}],
        "usage": {"prompt_tokens": 115, "completion_tokens": 20, "total_tokens": 135,
                  "prompt_tokens_details": {"cached_tokens": 100}},
    }
    ChatCompletion.model_validate(completion)


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [("end_turn", "stop"), ("stop_sequence", "stop"), ("max_tokens", "length"),
     ("tool_use", "tool_calls"), ("pause_turn", "stop"), ("refusal", "content_filter"),
     (None, "stop"), ("something_new", "stop")],
)
def test_stop_reasons(stop_reason: str | None, finish: str) -> None:
    body = message([{"type": "text", "text": "x"}], stop_reason)
    assert json.loads(translator().response(200, body).body)["choices"][0][
        "finish_reason"] == finish


def test_tool_only_response_has_null_content() -> None:
    body = message([{"type": "tool_use", "id": "t", "name": "f", "input": {}}], "tool_use")
    reply = json.loads(translator().response(200, body).body)["choices"][0]["message"]
    assert reply["content"] is None
    assert reply["tool_calls"][0]["function"]["arguments"] == "{}"


@pytest.mark.parametrize("body", [b"not json", b"[]", b'{"content": "x"}'])
def test_invalid_success_body_is_provider_error(body: bytes) -> None:
    with pytest.raises(GatewayError) as caught:
        translator().response(200, body)
    assert caught.value.status == 502
    assert caught.value.message == "The provider sent an invalid response."


# --------------------------------------------------------------------------- streams


def ev(kind: str, **payload: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()


ANTHROPIC_STREAM = b"".join([
    ev("message_start", message={
        "id": "msg_9", "type": "message", "role": "assistant", "model": "claude-up",
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": {"input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 8,
                  "cache_creation_input_tokens": 0}}),
    ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    ev("ping"),
    ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hé"}),
    ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "llo"}),
    ev("content_block_stop", index=0),
    ev("content_block_start", index=1, content_block={
        "type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}),
    ev("content_block_delta", index=1, delta={"type": "input_json_delta", "partial_json": ""}),
    ev("content_block_delta", index=1,
       delta={"type": "input_json_delta", "partial_json": "{\"city\": "}),
    ev("content_block_delta", index=1,
       delta={"type": "input_json_delta", "partial_json": "\"Paris\"}"}),
    ev("content_block_stop", index=1),
    ev("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None},
       usage={"output_tokens": 30}),
    ev("message_stop"),
])


def decode(data: bytes) -> list[str]:
    decoder = SseDecoder()
    events = decoder.feed(data) + decoder.flush()
    assert all(e.event is None for e in events)
    return [e.data for e in events]


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "msg_9", "object": "chat.completion.chunk", "created": CREATED,
            "model": "claude-up",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


@pytest.mark.parametrize("include_usage", [False, True])
def test_golden_stream(include_usage: bool) -> None:
    t = translator()
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "x"}],
                            "stream": True}
    if include_usage:
        body["stream_options"] = {"include_usage": True}
    t.request(body, upstream_model="claude-up", api_version=None)
    stream = t.stream()
    assert not stream.first_token_seen
    out = stream.feed(ANTHROPIC_STREAM) + stream.flush()
    data = decode(out)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    expected = [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hé"}),
        chunk({"content": "llo"}),
        chunk({"tool_calls": [{"index": 0, "id": "toolu_1", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\": "}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
        chunk({}, "tool_calls"),
    ]
    if include_usage:
        expected.append({
            "id": "msg_9", "object": "chat.completion.chunk", "created": CREATED,
            "model": "claude-up", "choices": [],
            "usage": {"prompt_tokens": 20, "completion_tokens": 30, "total_tokens": 50,
                      "prompt_tokens_details": {"cached_tokens": 8}}})
    assert chunks == expected
    for item in chunks:
        ChatCompletionChunk.model_validate(item)
    assert stream.usage == Usage(input_tokens=20, output_tokens=30, cached_input_tokens=8)
    assert stream.output_tokens_so_far == 5
    assert stream.first_token_seen


def test_stream_counts_deltas_before_an_abort() -> None:
    stream = translator().stream()
    cut = ANTHROPIC_STREAM.index(b"event: content_block_stop")
    out = stream.feed(ANTHROPIC_STREAM[:cut])
    assert stream.usage is None
    assert stream.output_tokens_so_far == 2
    assert stream.first_token_seen
    assert b"[DONE]" not in out + stream.flush()


def test_stream_error_event_becomes_openai_error_and_ends() -> None:
    stream = translator().stream()
    data = ANTHROPIC_STREAM.split(b"event: content_block_stop")[0] + ev(
        "error", error={"type": "overloaded_error", "message": "Overloaded"}) + ev("message_stop")
    events = decode(stream.feed(data) + stream.flush())
    assert json.loads(events[-1]) == {"error": {
        "message": "Overloaded", "type": "upstream_error", "param": None,
        "code": "provider_error"}}
    assert "[DONE]" not in events


# --------------------------------------------------------------------------- round trips


def test_request_round_trip_through_both_translators() -> None:
    """OpenAI -> Anthropic -> OpenAI keeps the conversation (system merged, names dropped)."""
    original = {"model": "m", "messages": CONVERSATION, "tools": TOOLS, "max_tokens": 99,
                "temperature": 0.5, "stop": ["END"], "tool_choice": "required"}
    anthropic_body = to_anthropic(original)
    back = json.loads(AnthropicToOpenAI(Backend.OPENAI_COMPATIBLE).request(
        anthropic_body, upstream_model="m", api_version=None).body)
    assert back["messages"][0] == {"role": "system", "content": "Be terse.\n\nUse tools."}
    assert back["messages"][1] == {"role": "user", "content": [
        {"type": "text", "text": "Weather in Paris and Rome? See"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}}]}
    assert back["messages"][2] == {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
        {"id": "call_2", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Rome\"}"}}]}
    assert back["messages"][3:] == [
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Rain"},
        {"role": "user", "content": "Thanks"},
        {"role": "assistant", "content": "You're welcome."},
        {"role": "user", "content": "Bye"},
    ]
    assert back["tools"] == [{"type": "function", "function": {
        "name": "get_weather", "description": "Weather for a city",
        "parameters": TOOLS[0]["function"]["parameters"]}}]
    assert (back["tool_choice"], back["max_tokens"], back["temperature"], back["stop"]) == (
        "required", 99, 0.5, ["END"])


def test_response_round_trip_through_both_translators() -> None:
    original = json.loads(message(
        [{"type": "text", "text": "Hi"},
         {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": [1, 2]}}],
        "tool_use",
        {"input_tokens": 3, "output_tokens": 4, "cache_read_input_tokens": 2,
         "cache_creation_input_tokens": 0}))
    completion = translator().response(200, json.dumps(original).encode()).body
    back = json.loads(AnthropicToOpenAI(Backend.OPENAI).response(200, completion).body)
    assert back == original


def test_error_uses_openai_dialect() -> None:
    status, body = translator().error(
        429, b'{"type":"error","error":{"type":"rate_limit_error","message":"Slow down"}}', {})
    assert status == 429
    assert json.loads(body)["error"]["message"] == (
        "The provider's rate limit was reached; retry later.")
