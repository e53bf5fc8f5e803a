"""Anthropic door -> OpenAI-shaped backends: golden requests, responses and streams."""

from __future__ import annotations

import json
from typing import Any

import pytest
from anthropic.types import Message

from extproc.translate.anthropic_openai import AnthropicToOpenAI
from extproc.translate.base import Backend, Usage
from extproc.translate.openai_anthropic import OpenAIToAnthropic
from extproc.translate.sse import SseDecoder


def to_openai(body: dict[str, Any], backend: Backend = Backend.OPENAI) -> dict[str, Any]:
    upstream = AnthropicToOpenAI(backend).request(body, upstream_model="gpt-up",
                                                  api_version="2024-10-21")
    result: dict[str, Any] = json.loads(upstream.body)
    return result


TOOLS = [{"name": "get_weather", "description": "Weather for a city",
          "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
          "cache_control": {"type": "ephemeral"}}]

CONVERSATION: list[dict[str, Any]] = [
    {"role": "user", "content": [
        {"type": "text", "text": "Weather in Paris? Look:"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/jpeg",
                                     "data": "/9j/4AAQ"}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/b.jpg"}},
    ]},
    {"role": "assistant", "content": [
        {"type": "thinking", "thinking": "The user wants weather.", "signature": "sig"},
        {"type": "text", "text": "Checking."},
        {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
    ]},
    {"role": "user", "content": [
        {"type": "tool_result", "tool_use_id": "toolu_1",
         "content": [{"type": "text", "text": "Sun"}, {"type": "text", "text": "ny"}]},
        {"type": "text", "text": "And tomorrow?", "cache_control": {"type": "ephemeral"}},
    ]},
    {"role": "assistant", "content": "Also sunny."},
    {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "x", "is_error": True,
                                  "content": "failed"}]},
]


def golden_body(stream: bool = True) -> dict[str, Any]:
    return {
        "model": "claude-sonnet", "max_tokens": 256, "messages": CONVERSATION,
        "system": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Be kind."}],
        "tools": TOOLS, "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "temperature": 0.3, "top_p": 0.8, "stop_sequences": ["END"],
        "metadata": {"user_id": "u-9"}, "stream": stream, "service_tier": "auto",
    }


EXPECTED_MESSAGES = [
    {"role": "system", "content": "Be terse.\n\nBe kind."},
    {"role": "user", "content": [
        {"type": "text", "text": "Weather in Paris? Look:"},
        {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,/9j/4AAQ"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/b.jpg"}},
    ]},
    {"role": "assistant", "content": "Checking.", "tool_calls": [
        {"id": "toolu_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "toolu_1", "content": "Sunny"},
    {"role": "user", "content": "And tomorrow?"},
    {"role": "assistant", "content": "Also sunny."},
    {"role": "tool", "tool_call_id": "x", "content": "failed"},
]
EXPECTED_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_golden_request_openai() -> None:
    assert to_openai(golden_body()) == {
        "model": "gpt-up",
        "messages": EXPECTED_MESSAGES,
        "max_completion_tokens": 256,
        "tools": EXPECTED_TOOLS,
        "tool_choice": "required",
        "parallel_tool_calls": False,
        "temperature": 0.3,
        "top_p": 0.8,
        "stop": ["END"],
        "user": "u-9",
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def test_golden_request_azure_has_no_model() -> None:
    upstream = AnthropicToOpenAI(Backend.AZURE).request(
        golden_body(stream=False), upstream_model="dep-1", api_version="2024-10-21")
    assert upstream.path == "/openai/deployments/dep-1/chat/completions?api-version=2024-10-21"
    body = json.loads(upstream.body)
    assert "model" not in body
    assert body["max_completion_tokens"] == 256
    assert "stream" not in body
    assert "stream_options" not in body


def test_golden_request_mistral() -> None:
    body = golden_body()
    body["tool_choice"] = {"type": "any"}
    assert to_openai(body, Backend.MISTRAL) == {
        "model": "gpt-up",
        "messages": EXPECTED_MESSAGES,
        "max_tokens": 256,
        "tools": EXPECTED_TOOLS,
        "tool_choice": "any",
        "temperature": 0.3,
        "top_p": 0.8,
        "stop": ["END"],
        "stream": True,
    }


def test_compatible_uses_max_tokens() -> None:
    body = {"model": "m", "max_tokens": 7, "messages": [{"role": "user", "content": "hi"}],
            "system": "sys"}
    assert to_openai(body, Backend.OPENAI_COMPATIBLE) == {
        "model": "gpt-up", "max_tokens": 7,
        "messages": [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("choice", "expected"),
    [({"type": "auto"}, "auto"), ({"type": "none"}, "none"), ({"type": "any"}, "required"),
     ({"type": "tool", "name": "get_weather"},
      {"type": "function", "function": {"name": "get_weather"}})],
)
def test_tool_choice_mapping(choice: dict[str, Any], expected: object) -> None:
    body = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}],
            "tools": TOOLS, "tool_choice": choice}
    assert to_openai(body)["tool_choice"] == expected


# --------------------------------------------------------------------------- responses


def completion(message: dict[str, Any], finish: str | None,
               usage: dict[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {
        "id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "gpt-up",
        "choices": [{"index": 0, "message": message, "finish_reason": finish}]}
    if usage is not None:
        body["usage"] = usage
    return json.dumps(body).encode()


def test_golden_response_with_tool_calls_and_cached_usage() -> None:
    body = completion(
        {"role": "assistant", "content": "On it.", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}},
            {"id": "call_2", "type": "function",
             "function": {"name": "get_weather", "arguments": "not json"}}]},
        "tool_calls",
        {"prompt_tokens": 120, "completion_tokens": 9, "total_tokens": 129,
         "prompt_tokens_details": {"cached_tokens": 100}})
    result = AnthropicToOpenAI(Backend.OPENAI).response(200, body)
    assert result.usage == Usage(input_tokens=120, output_tokens=9, cached_input_tokens=100)
    message = json.loads(result.body)
    assert message == {
        "id": "chatcmpl-1", "type": "message", "role": "assistant", "model": "gpt-up",
        "content": [
            {"type": "text", "text": "On it."},
            {"type": "tool_use", "id": "call_1", "name": "get_weather",
             "input": {"city": "Paris"}},
            {"type": "tool_use", "id": "call_2", "name": "get_weather", "input": {}},
        ],
        "stop_reason": "tool_use", "stop_sequence": None,
        "usage": {"input_tokens": 20, "output_tokens": 9, "cache_read_input_tokens": 100,
                  "cache_creation_input_tokens": 0},
    }
    Message.model_validate(message)


@pytest.mark.parametrize(
    ("finish", "stop_reason"),
    [("stop", "end_turn"), ("length", "max_tokens"), ("tool_calls", "tool_use"),
     ("function_call", "tool_use"), ("content_filter", "refusal"), (None, "end_turn"),
     ("eos", "end_turn")],
)
def test_stop_reasons(finish: str | None, stop_reason: str) -> None:
    body = completion({"role": "assistant", "content": "x"}, finish)
    message = json.loads(AnthropicToOpenAI(Backend.MISTRAL).response(200, body).body)
    assert message["stop_reason"] == stop_reason
    assert message["usage"] == {"input_tokens": 0, "output_tokens": 0,
                                "cache_read_input_tokens": 0, "cache_creation_input_tokens": 0}


def test_response_round_trip_through_both_translators() -> None:
    original = json.loads(completion(
        {"role": "assistant", "content": "Hi", "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        "tool_calls", {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11,
                       "prompt_tokens_details": {"cached_tokens": 4}}))
    message = AnthropicToOpenAI(Backend.OPENAI).response(200, json.dumps(original).encode())
    back = json.loads(OpenAIToAnthropic(clock=lambda: 1).response(200, message.body).body)
    original["choices"][0]["logprobs"] = None
    del original["object"]
    del back["object"]
    assert back == original


def test_request_round_trip_through_both_translators() -> None:
    anthropic_body = {"model": "m", "max_tokens": 100, "system": "Be terse.",
                      "messages": [
                          CONVERSATION[0], {"role": "assistant", "content": [
                              {"type": "text", "text": "Checking."},
                              {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
                               "input": {"city": "Paris"}}]},
                          CONVERSATION[2], CONVERSATION[3]],
                      "tools": [{k: v for k, v in TOOLS[0].items() if k != "cache_control"}],
                      "tool_choice": {"type": "auto"}, "stop_sequences": ["END"]}
    openai_body = to_openai(anthropic_body, Backend.OPENAI_COMPATIBLE)
    back = json.loads(OpenAIToAnthropic().request(
        openai_body, upstream_model="m", api_version=None).body)
    assert back == {
        "model": "m", "max_tokens": 100, "system": "Be terse.",
        "messages": [
            CONVERSATION[0],
            anthropic_body["messages"][1],
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "Sunny"},
                {"type": "text", "text": "And tomorrow?"}]},
            CONVERSATION[3],
        ],
        "tools": anthropic_body["tools"], "tool_choice": {"type": "auto"},
        "stop_sequences": ["END"],
    }


# --------------------------------------------------------------------------- streams


def data(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def c(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
    return data({"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1,
                 "model": "gpt-up", "choices": [{"index": 0, "delta": delta,
                                                 "finish_reason": finish}], **extra})


OPENAI_STREAM = b"".join([
    data({"id": "", "object": "", "created": 0, "model": "", "choices": [],
          "prompt_filter_results": [{"prompt_index": 0, "content_filter_results": {}}]}),
    c({"role": "assistant", "content": ""}),
    c({"content": "Hi"}),
    c({"content": " thére"}),
    c({"tool_calls": [{"index": 0, "id": "call_1", "type": "function",
                       "function": {"name": "get_weather", "arguments": ""}}]}),
    c({"tool_calls": [{"index": 0, "function": {"arguments": "{\"city\":"}}]}),
    c({"tool_calls": [{"index": 0, "function": {"arguments": "\"Paris\"}"}}]}),
    c({"tool_calls": [{"index": 1, "id": "call_2", "type": "function",
                       "function": {"name": "get_time", "arguments": "{}"}}]}),
    c({}, "tool_calls"),
    data({"id": "chatcmpl-7", "object": "chat.completion.chunk", "created": 1,
          "model": "gpt-up", "choices": [],
          "usage": {"prompt_tokens": 50, "completion_tokens": 12, "total_tokens": 62,
                    "prompt_tokens_details": {"cached_tokens": 30}}}),
    b"data: [DONE]\n\n",
])


def anthropic_events(raw: bytes) -> list[tuple[str | None, dict[str, Any]]]:
    decoder = SseDecoder()
    events = decoder.feed(raw) + decoder.flush()
    out = []
    for event in events:
        payload = json.loads(event.data)
        assert payload["type"] == event.event
        out.append((event.event, payload))
    return out


def e(kind: str, **payload: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **payload}


def test_golden_stream() -> None:
    stream = AnthropicToOpenAI(Backend.AZURE).stream()
    out = stream.feed(OPENAI_STREAM) + stream.flush()
    assert anthropic_events(out) == [
        e("message_start", message={
            "id": "chatcmpl-7", "type": "message", "role": "assistant", "model": "gpt-up",
            "content": [], "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 0, "output_tokens": 0}}),
        e("content_block_start", index=0, content_block={"type": "text", "text": ""}),
        e("content_block_delta", index=0, delta={"type": "text_delta", "text": "Hi"}),
        e("content_block_delta", index=0, delta={"type": "text_delta", "text": " thére"}),
        e("content_block_stop", index=0),
        e("content_block_start", index=1, content_block={
            "type": "tool_use", "id": "call_1", "name": "get_weather", "input": {}}),
        e("content_block_delta", index=1,
          delta={"type": "input_json_delta", "partial_json": "{\"city\":"}),
        e("content_block_delta", index=1,
          delta={"type": "input_json_delta", "partial_json": "\"Paris\"}"}),
        e("content_block_stop", index=1),
        e("content_block_start", index=2, content_block={
            "type": "tool_use", "id": "call_2", "name": "get_time", "input": {}}),
        e("content_block_delta", index=2,
          delta={"type": "input_json_delta", "partial_json": "{}"}),
        e("content_block_stop", index=2),
        e("message_delta", delta={"stop_reason": "tool_use", "stop_sequence": None},
          usage={"input_tokens": 20, "output_tokens": 12, "cache_read_input_tokens": 30,
                 "cache_creation_input_tokens": 0}),
        e("message_stop"),
    ]
    assert stream.usage == Usage(input_tokens=50, output_tokens=12, cached_input_tokens=30)
    assert stream.output_tokens_so_far == 6
    assert stream.first_token_seen


def test_mistral_stream_with_usage_in_last_chunk_and_no_done() -> None:
    raw = b"".join([
        c({"role": "assistant", "content": ""}),
        c({"content": "Hello"}),
        c({}, "stop", usage={"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}),
    ])
    stream = AnthropicToOpenAI(Backend.MISTRAL).stream()
    events = anthropic_events(stream.feed(raw) + stream.flush())
    assert [kind for kind, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
    assert events[-2][1]["usage"]["input_tokens"] == 5
    assert stream.usage == Usage(5, 1, 0)


def test_stream_usage_on_first_chunk_goes_into_message_start() -> None:
    stream = AnthropicToOpenAI(Backend.OPENAI_COMPATIBLE).stream()
    raw = c({"role": "assistant"}, usage={"prompt_tokens": 8, "completion_tokens": 0})
    events = anthropic_events(stream.feed(raw))
    assert events[0][1]["message"]["usage"] == {
        "input_tokens": 8, "output_tokens": 0, "cache_read_input_tokens": 0,
        "cache_creation_input_tokens": 0}


def test_truncated_stream_is_not_finished_by_the_gateway() -> None:
    stream = AnthropicToOpenAI(Backend.OPENAI).stream()
    out = stream.feed(OPENAI_STREAM[: OPENAI_STREAM.index(b"\"Paris")]) + stream.flush()
    kinds = [kind for kind, _ in anthropic_events(out)]
    assert "message_stop" not in kinds
    assert stream.usage is None
    assert stream.output_tokens_so_far == 4


def test_stream_error_chunk_becomes_error_event() -> None:
    stream = AnthropicToOpenAI(Backend.OPENAI).stream()
    raw = c({"content": "x"}) + data({"error": {"message": "Upstream overloaded",
                                               "type": "server_error"}}) + c({"content": "y"})
    events = anthropic_events(stream.feed(raw) + stream.flush())
    assert events[-1] == e("error", error={"type": "api_error",
                                           "message": "Upstream overloaded"})
    assert all(kind != "message_stop" for kind, _ in events)


def test_a_premium_service_tier_from_the_openai_backend_is_unpriced() -> None:
    """Anthropic door -> OpenAI backend: an account billed at the priority tier must not
    be charged at the configured (standard) prices (issue 8 item 5)."""
    document = json.loads(completion({"role": "assistant", "content": "x"}, "stop",
                                     {"prompt_tokens": 3, "completion_tokens": 4}))
    document["service_tier"] = "priority"
    result = AnthropicToOpenAI(Backend.OPENAI).response(200, json.dumps(document).encode())
    assert result.usage == Usage(input_tokens=3, output_tokens=4,
                                 unpriced=("service_tier:priority",))
    stream = AnthropicToOpenAI(Backend.OPENAI).stream()
    chunk = {"id": "c", "model": "gpt-up", "service_tier": "priority", "choices": [],
             "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    stream.feed(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
    stream.flush()
    assert stream.usage == Usage(input_tokens=3, output_tokens=4,
                                 unpriced=("service_tier:priority",))
