"""The pieces the translators share (chat_request, the SSE object reader, the answer
readers): the same request read the same way behind both OpenAI-door translators."""

from __future__ import annotations

from typing import Any

import pytest

from extproc.errors import ErrorCode, GatewayError
from extproc.translate.chat_request import check_parameters, is_value, tool_choice
from extproc.translate.gemini import OpenAIToGemini
from extproc.translate.openai_anthropic import OpenAIToAnthropic
from extproc.translate.openai_passthrough import place_model
from extproc.translate.provider_errors import provider_document
from extproc.translate.sse import SseEvent, json_objects
from extproc.translate.types import Backend
from extproc.translate.validation import json_object, stream_options

BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize("translator", [OpenAIToAnthropic(), OpenAIToGemini()])
@pytest.mark.parametrize(("extra", "message", "param"), [
    ({"messages": [{"role": "function", "content": "x"}]},
     "Messages with role 'function' are not supported by {name}; use 'tool' messages.",
     "messages[0].role"),
    ({"tools": [{"type": "retrieval"}]},
     "Only 'function' tools are supported by {name}.", "tools[0].type"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
     "Only 'text' and 'image_url' content parts are supported by {name}.",
     "messages[0].content[0].type"),
    ({"bad name!": 1}, "The request has a parameter {name} does not support.", None),
    ({"tool_choice": "sometimes", "tools": [{"type": "function", "function": {"name": "f"}}]},
     "'tool_choice' must be 'auto', 'none', 'required' or a function choice.", "tool_choice"),
])
def test_both_openai_door_translators_refuse_alike(
        translator: OpenAIToAnthropic | OpenAIToGemini, extra: dict[str, Any], message: str,
        param: str | None) -> None:
    with pytest.raises(GatewayError) as caught:
        translator.request({**BODY, **extra}, upstream_model="up", api_version=None)
    assert caught.value.code is ErrorCode.INVALID_REQUEST
    assert caught.value.message == message.format(name=translator.backend.display_name)
    assert caught.value.param == param


def test_a_neutral_value_is_checked_before_the_passed_names() -> None:
    honoured = {"parallel_tool_calls": is_value(True)}
    passed = frozenset({"parallel_tool_calls"})
    check_parameters({"parallel_tool_calls": True}, Backend.GEMINI, honoured, passed)
    with pytest.raises(GatewayError) as caught:
        check_parameters({"parallel_tool_calls": False}, Backend.GEMINI, honoured, passed)
    assert caught.value.message == (
        "The parameter 'parallel_tool_calls' is not supported by Gemini.")


@pytest.mark.parametrize(("choice", "expected"), [
    (None, None), ("auto", ("auto", None)), ("none", ("none", None)),
    ("required", ("required", None)),
    ({"type": "function", "function": {"name": "f"}}, ("function", "f")),
])
def test_tool_choice_modes(choice: object, expected: tuple[str, str | None] | None) -> None:
    assert tool_choice(choice) == expected


def test_json_objects_skips_what_is_not_an_object() -> None:
    events = [SseEvent("[DONE]"), SseEvent("[1]"), SseEvent('{"a":1}'), SseEvent("{bad")]
    assert list(json_objects(events)) == [{"a": 1}]


def test_answer_readers() -> None:
    assert json_object(b'{"a":1}') == {"a": 1}
    assert json_object(b"[1]") is None
    assert json_object(b"\xff") is None
    for body in (b"[1]", b"nope", b"\xff"):
        with pytest.raises(GatewayError) as caught:
            provider_document(body)
        assert caught.value.code is ErrorCode.PROVIDER_ERROR
        assert caught.value.message == "The provider sent an invalid response."


def test_stream_options() -> None:
    assert stream_options({}) == (None, False)
    assert stream_options({"stream_options": {"include_usage": True, "x": 1}}) == (
        {"include_usage": True, "x": 1}, True)
    with pytest.raises(GatewayError) as caught:
        stream_options({"stream_options": []})
    assert (caught.value.message, caught.value.param) == (
        "'stream_options' must be an object.", "stream_options")


def test_place_model_puts_azure_deployments_in_the_path() -> None:
    request: dict[str, Any] = {"model": "client"}
    assert place_model(request, Backend.AZURE, "dep/1", "v", path="/x",
                       azure_operation="embeddings") == (
        "/openai/deployments/dep%2F1/embeddings?api-version=v")
    assert request == {}
    assert place_model(request, Backend.OPENAI, "up", None, path="/x",
                       azure_operation="embeddings") == "/x"
    assert request == {"model": "up"}
