"""The Responses API translators (`extproc.translate.responses`), without sockets:
passthrough store rules and usage, Responses -> Chat request mapping and refusals, and
Chat answers/streams rewritten as Responses objects/`response.*` events (streams fed in
7-byte pieces)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.errors import GatewayError
from extproc.translate.base import Backend, Usage
from extproc.translate.limits import OutputLimit
from extproc.translate.responses import (
    ResponsesPassthrough,
    ResponsesPassthroughStream,
    ResponsesToChat,
)

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def pieces(data: bytes, size: int = 7) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


def events(raw: bytes) -> list[dict[str, Any]]:
    out = []
    for block in raw.decode().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        if "data" in lines:
            payload = json.loads(lines["data"])
            assert lines.get("event") == payload["type"]
            out.append(payload)
    return out


def sse(*chunks: dict[str, Any] | str) -> bytes:
    return b"".join(
        f"data: {c if isinstance(c, str) else json.dumps(c)}\n\n".encode() for c in chunks)


# -- passthrough --------------------------------------------------------------------------

def test_passthrough_forces_store_off_and_writes_the_budget_limit() -> None:
    upstream = ResponsesPassthrough(Backend.AZURE).request(
        {"model": "m", "input": "hi"}, upstream_model="dep-1", api_version=None,
        output_limit=OutputLimit(default=256))
    assert upstream.path == "/openai/v1/responses"
    assert json.loads(upstream.body) == {"model": "dep-1", "input": "hi", "store": False,
                                         "max_output_tokens": 256}


@pytest.mark.parametrize(("field", "value"), [("store", True),
                                              ("previous_response_id", "resp_1"),
                                              ("conversation", "conv_1")])
def test_passthrough_refuses_stored_state_without_the_tenant_flag(field: str,
                                                                  value: object) -> None:
    with pytest.raises(GatewayError) as caught:
        ResponsesPassthrough(Backend.OPENAI).request(
            {"model": "m", "input": "hi", field: value}, upstream_model="u", api_version=None)
    assert (caught.value.status, caught.value.param) == (400, field)
    assert "shared" in caught.value.message


def test_passthrough_keeps_store_for_an_allowed_tenant() -> None:
    upstream = ResponsesPassthrough(Backend.OPENAI, store_allowed=True).request(
        {"model": "m", "input": "hi", "store": True, "previous_response_id": "resp_1"},
        upstream_model="u", api_version=None)
    assert json.loads(upstream.body) == {"model": "u", "input": "hi", "store": True,
                                         "previous_response_id": "resp_1"}


def test_passthrough_stream_reads_usage_from_response_completed() -> None:
    completed = {"type": "response.completed", "sequence_number": 3, "response": {
        "usage": {"input_tokens": 12, "output_tokens": 5,
                  "input_tokens_details": {"cached_tokens": 4}}, "output": []}}
    raw = (b"event: response.output_text.delta\ndata: "
           b'{"type":"response.output_text.delta","delta":"Hi"}\n\n'
           + b"event: response.completed\ndata: " + json.dumps(completed).encode() + b"\n\n")
    stream = ResponsesPassthroughStream()
    out = b"".join(stream.feed(p) for p in pieces(raw)) + stream.flush()
    assert [e["type"] for e in events(out)] == ["response.output_text.delta",
                                                "response.completed"]
    assert stream.usage == Usage(input_tokens=12, output_tokens=5, cached_input_tokens=4)
    assert stream.output_tokens_so_far == 1


def test_passthrough_usage_with_a_built_in_tool_call_is_unpriced() -> None:
    answer = {"output": [{"type": "web_search_call"}],
              "usage": {"input_tokens": 1, "output_tokens": 2}}
    translated = ResponsesPassthrough(Backend.OPENAI).response(200, json.dumps(answer).encode())
    assert translated.usage == Usage(1, 2, unpriced=("server_tool_calls",))


# -- Responses -> Chat --------------------------------------------------------------------

def test_request_is_rewritten_as_chat_completions() -> None:
    translator = ResponsesToChat(Backend.OPENAI_COMPATIBLE)
    upstream = translator.request({
        "model": "m", "instructions": "Be brief.", "max_output_tokens": 50, "temperature": 0.2,
        "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
        "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
        "input": [
            {"role": "user", "content": [{"type": "input_text", "text": "Weather?"},
                                         {"type": "input_image", "image_url": "http://i/x.png"}]},
            {"type": "function_call", "call_id": "c1", "name": "get_weather",
             "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "Sunny"},
            {"type": "reasoning", "id": "rs_1", "summary": []},
            {"role": "assistant", "content": [{"type": "output_text", "text": "Sunny."}]},
        ]}, upstream_model="up", api_version=None)
    assert upstream.path == "/v1/chat/completions"
    assert json.loads(upstream.body) == {
        "model": "up",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [
                {"type": "text", "text": "Weather?"},
                {"type": "image_url", "image_url": {"url": "http://i/x.png"}}]},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function",
                 "function": {"name": "get_weather", "arguments": "{}"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "Sunny"},
            {"role": "assistant", "content": "Sunny."}],
        "tools": [{"type": "function", "function": {
            "name": "get_weather", "description": "Weather",
            "parameters": WEATHER["parameters"]}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
        "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": {"type": "object"}}},
        "max_tokens": 50,
        "temperature": 0.2,
    }


def test_request_to_anthropic_goes_through_the_chat_translator() -> None:
    upstream = ResponsesToChat(Backend.ANTHROPIC).request(
        {"model": "m", "input": "hi", "stream": True}, upstream_model="claude",
        api_version=None, output_limit=OutputLimit(default=64))
    body = json.loads(upstream.body)
    assert upstream.path == "/v1/messages"
    assert (body["model"], body["max_tokens"], body["stream"]) == ("claude", 64, True)
    assert body["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize(("extra", "param", "message"), [
    ({"tools": [{"type": "web_search"}]}, "tools[0].type",
     "The tool type 'web_search' (tools[0]) is not supported by Mistral: built-in tools run "
     "only on OpenAI and Azure OpenAI; use function tools."),
    ({"tools": [WEATHER, {"type": "file_search", "vector_store_ids": ["v"]}]}, "tools[1].type",
     None),
    ({"background": True}, "background",
     "The parameter 'background' is not supported by Mistral."),
    ({"include": ["reasoning.encrypted_content"]}, "include", None),
    ({"previous_response_id": "resp_1"}, "previous_response_id", None),
    ({"store": True}, "store", None),
    ({"truncation": "auto"}, "truncation", None),
    ({"prompt": {"id": "p"}}, "prompt", None),
    ({"frobnicate": 1}, "frobnicate",
     "The parameter 'frobnicate' of the Responses API cannot be translated for Mistral."),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]},
     "input[0].content[0].type", None),
    ({"input": [{"type": "computer_call_output", "call_id": "c"}]}, "input[0].type", None),
])
def test_untranslatable_fields_are_refused_by_name(extra: dict[str, Any], param: str,
                                                   message: str | None) -> None:
    with pytest.raises(GatewayError) as caught:
        ResponsesToChat(Backend.MISTRAL).request({"model": "m", "input": "hi", **extra},
                                                 upstream_model="u", api_version=None)
    assert (caught.value.status, caught.value.param) == (400, param)
    if message is not None:
        assert caught.value.message == message


def chat_translator(**body: Any) -> ResponsesToChat:
    translator = ResponsesToChat(Backend.OPENAI_COMPATIBLE, clock=lambda: 1700000000.0)
    translator.request({"model": "m-alias", "input": "hi", **body}, upstream_model="up",
                       api_version=None)
    return translator


def test_chat_answer_becomes_a_responses_object() -> None:
    answer = {"id": "chatcmpl-1", "choices": [{"index": 0, "finish_reason": "tool_calls",
              "message": {"role": "assistant", "content": "Let me see.", "tool_calls": [
                  {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 4}}
    translated = chat_translator().response(200, json.dumps(answer).encode())
    document = json.loads(translated.body)
    assert translated.usage == Usage(3, 4)
    assert (document["id"], document["object"], document["status"], document["model"],
            document["created_at"]) == ("resp_chatcmpl-1", "response", "completed",
                                        "m-alias", 1700000000)
    assert document["output"] == [
        {"type": "message", "id": "msg_chatcmpl-1", "status": "completed", "role": "assistant",
         "content": [{"type": "output_text", "text": "Let me see.", "annotations": []}]},
        {"type": "function_call", "id": "fc_call_1", "call_id": "call_1",
         "name": "get_weather", "arguments": "{\"city\":\"Paris\"}", "status": "completed"}]
    assert document["usage"] == {
        "input_tokens": 3, "input_tokens_details": {"cached_tokens": 0}, "output_tokens": 4,
        "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 7}
    assert document["store"] is False


def test_a_cut_answer_is_incomplete() -> None:
    answer = {"id": "c", "choices": [{"finish_reason": "length",
                                      "message": {"role": "assistant", "content": "Hel"}}],
              "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
    document = json.loads(chat_translator().response(200, json.dumps(answer).encode()).body)
    assert (document["status"], document["incomplete_details"]) == (
        "incomplete", {"reason": "max_output_tokens"})


def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
    return {"id": "chatcmpl-9", "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


def test_chat_stream_becomes_response_events() -> None:
    stream = chat_translator(stream=True).stream()
    raw = sse(chunk({"role": "assistant", "content": ""}), chunk({"content": "Hello"}),
              chunk({"content": " there"}), chunk({}, "stop"),
              {"id": "chatcmpl-9", "choices": [],
               "usage": {"prompt_tokens": 3, "completion_tokens": 2}}, "[DONE]")
    out = b"".join(stream.feed(p) for p in pieces(raw)) + stream.flush()
    got = events(out)
    assert [e["type"] for e in got] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.completed"]
    assert [e["sequence_number"] for e in got] == list(range(10))
    assert [e["delta"] for e in got if e["type"] == "response.output_text.delta"] == [
        "Hello", " there"]
    final = got[-1]["response"]
    assert final["output"] == [{"type": "message", "id": "msg_resp_chatcmpl-9",
                                "status": "completed", "role": "assistant",
                                "content": [{"type": "output_text", "text": "Hello there",
                                             "annotations": []}]}]
    assert final["usage"]["input_tokens"] == 3
    assert final["usage"]["output_tokens"] == 2
    assert stream.usage == Usage(3, 2)


def test_chat_tool_call_stream_becomes_function_call_events() -> None:
    stream = chat_translator(stream=True, tools=[WEATHER]).stream()
    raw = sse(chunk({"role": "assistant", "content": None}),
              chunk({"tool_calls": [{"index": 0, "id": "call_7", "type": "function",
                                     "function": {"name": "get_weather", "arguments": ""}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": "{\"ci"}}]}),
              chunk({"tool_calls": [{"index": 0, "function": {"arguments": "ty\":1}"}}]}),
              chunk({}, "tool_calls"),
              {"id": "chatcmpl-9", "choices": [],
               "usage": {"prompt_tokens": 3, "completion_tokens": 4}}, "[DONE]")
    got = events(b"".join(stream.feed(p) for p in pieces(raw)) + stream.flush())
    assert [e["type"] for e in got] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.function_call_arguments.delta", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed"]
    assert got[5]["arguments"] == "{\"city\":1}"
    assert got[-1]["response"]["output"][0]["call_id"] == "call_7"


def test_a_chat_stream_error_becomes_an_error_event() -> None:
    stream = chat_translator(stream=True).stream()
    raw = sse(chunk({"content": "Hi"}),
              {"error": {"message": "overloaded", "type": "server_error", "code": None}})
    got = events(b"".join(stream.feed(p) for p in pieces(raw)) + stream.flush())
    assert got[-1]["type"] == "error"
    assert got[-1]["message"] == "overloaded"
    assert stream.usage is None
