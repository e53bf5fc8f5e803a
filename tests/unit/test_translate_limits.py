"""Wire rules the budget depends on, owned by the translators: the output-limit field per
model family, `n`, the prompt estimate; and scrubbed in-stream errors of passthroughs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.errors import Dialect, ErrorCode, GatewayError
from extproc.translate.anthropic_openai import AnthropicToOpenAI
from extproc.translate.anthropic_passthrough import AnthropicPassthrough
from extproc.translate.base import Backend, translator_for
from extproc.translate.limits import OutputLimit, family_output_field
from extproc.translate.openai_anthropic import OpenAIToAnthropic
from extproc.translate.openai_passthrough import OpenAIPassthrough
from extproc.translate.sse import SseDecoder
from extproc.translate.types import NO_OUTPUT_LIMIT

USER = [{"role": "user", "content": "Hi"}]


def upstream_body(translator: Any, body: dict[str, Any], model: str,
                  limit: OutputLimit = NO_OUTPUT_LIMIT) -> dict[str, Any]:
    request = translator.request(body, upstream_model=model, api_version=None,
                                 output_limit=limit)
    result: dict[str, Any] = json.loads(request.body)
    return result


@pytest.mark.parametrize(("model", "field"), [
    ("o1", "max_completion_tokens"), ("o3-mini", "max_completion_tokens"),
    ("o4-mini-2025-04-16", "max_completion_tokens"), ("gpt-5", "max_completion_tokens"),
    ("GPT-5-mini", "max_completion_tokens"), ("gpt-4o-mini", "max_tokens"),
    ("omni-moderation", "max_tokens"), ("llama-3.1-8b", "max_tokens"),
])
def test_family_output_field(model: str, field: str) -> None:
    assert family_output_field(model) == field


@pytest.mark.parametrize("backend", [Backend.OPENAI, Backend.AZURE, Backend.OPENAI_COMPATIBLE])
def test_reasoning_models_get_max_completion_tokens(backend: Backend) -> None:
    body = upstream_body(OpenAIPassthrough(backend),
                         {"model": "m", "messages": USER, "max_tokens": 50}, "o3-mini")
    assert body.get("max_tokens") is None
    assert body["max_completion_tokens"] == 50
    both = upstream_body(OpenAIPassthrough(backend), {
        "model": "m", "messages": USER, "max_tokens": 50, "max_completion_tokens": 40},
        "gpt-5")
    assert (both.get("max_tokens"), both["max_completion_tokens"]) == (None, 40)


def test_other_models_keep_the_client_fields() -> None:
    sent = {"model": "m", "messages": USER, "max_tokens": 50, "max_completion_tokens": 40}
    assert upstream_body(OpenAIPassthrough(Backend.OPENAI), sent, "gpt-4o") == {
        **sent, "model": "gpt-4o"}


def test_configured_field_wins_over_the_family() -> None:
    body = upstream_body(OpenAIPassthrough(Backend.OPENAI_COMPATIBLE),
                         {"model": "m", "messages": USER, "max_completion_tokens": 30},
                         "o1-local", OutputLimit(field="max_tokens"))
    assert (body["max_tokens"], body.get("max_completion_tokens")) == (30, None)
    body = upstream_body(OpenAIPassthrough(Backend.OPENAI),
                         {"model": "m", "messages": USER, "max_tokens": 30},
                         "my-reasoner", OutputLimit(field="max_completion_tokens"))
    assert (body.get("max_tokens"), body["max_completion_tokens"]) == (None, 30)


@pytest.mark.parametrize(("translator", "model", "field"), [
    (OpenAIPassthrough(Backend.OPENAI), "gpt-4o", "max_tokens"),
    (OpenAIPassthrough(Backend.OPENAI), "o3", "max_completion_tokens"),
    (OpenAIPassthrough(Backend.AZURE), "gpt-5-prod", "max_completion_tokens"),
    (OpenAIPassthrough(Backend.MISTRAL), "mistral-small", "max_tokens"),
    (OpenAIToAnthropic(), "claude-haiku", "max_tokens"),
])
def test_gateway_limit_is_written_in_the_field_of_the_model(
    translator: Any, model: str, field: str
) -> None:
    body = upstream_body(translator, {"model": "m", "messages": USER}, model,
                         OutputLimit(default=77))
    assert body[field] == 77
    assert [name for name in ("max_tokens", "max_completion_tokens") if name in body] == [field]


def test_anthropic_door_uses_the_configured_field() -> None:
    sent = {"model": "m", "messages": USER, "max_tokens": 20}
    assert upstream_body(AnthropicToOpenAI(Backend.OPENAI_COMPATIBLE), sent, "x",
                         OutputLimit(field="max_completion_tokens"))["max_completion_tokens"] == 20
    assert upstream_body(AnthropicToOpenAI(Backend.MISTRAL), sent, "x",
                         OutputLimit(field="max_completion_tokens"))["max_tokens"] == 20


@pytest.mark.parametrize(("front", "body", "asked"), [
    (Dialect.OPENAI, {"max_tokens": 5, "max_completion_tokens": 9}, 9),
    (Dialect.OPENAI, {}, None),
    (Dialect.ANTHROPIC, {"max_tokens": 5, "max_completion_tokens": 9}, 5),
])
def test_output_limit_asked_by_door(front: Dialect, body: dict[str, Any],
                                    asked: int | None) -> None:
    for backend in (Backend.OPENAI, Backend.ANTHROPIC):
        assert translator_for(front, backend).output_limit(body, cap=100) == asked


def test_output_limit_refuses_bad_values() -> None:
    translator = translator_for(Dialect.OPENAI, Backend.OPENAI)
    with pytest.raises(GatewayError) as caught:
        translator.output_limit({"max_completion_tokens": 101}, cap=100)
    assert (caught.value.code, caught.value.message, caught.value.param) == (
        ErrorCode.INVALID_REQUEST, "'max_completion_tokens' must not exceed 100 for your key.",
        "max_completion_tokens")


@pytest.mark.parametrize(("front", "body", "choices"), [
    (Dialect.OPENAI, {}, 1), (Dialect.OPENAI, {"n": 3}, 3), (Dialect.OPENAI, {"n": None}, 1),
    (Dialect.ANTHROPIC, {"n": 3}, 1),
])
def test_choices(front: Dialect, body: dict[str, Any], choices: int) -> None:
    assert translator_for(front, Backend.OPENAI).choices(body) == choices


@pytest.mark.parametrize("n", [0, 129, "2", 2.0, True])
def test_choices_refuses_bad_n(n: object) -> None:
    with pytest.raises(GatewayError) as caught:
        translator_for(Dialect.OPENAI, Backend.OPENAI).choices({"n": n})
    assert (caught.value.message, caught.value.param) == (
        "'n' must be an integer from 1 to 128.", "n")


def test_input_estimate_counts_image_parts_of_the_door() -> None:
    openai_raw = json.dumps({"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
        {"type": "image_url", "image_url": {"url": "https://x/b.png"}},
        {"type": "text", "text": "what?"}]}]}).encode()
    base = -(-len(openai_raw) // 3)
    assert translator_for(Dialect.OPENAI, Backend.OPENAI).input_estimate(openai_raw) == \
        base + 2 * 1600
    anthropic_raw = b'{"messages":[{"content":[{"type": "image","source":{}}]}]}'
    assert translator_for(Dialect.ANTHROPIC, Backend.ANTHROPIC).input_estimate(
        anthropic_raw) == -(-len(anthropic_raw) // 3) + 1600
    # Another door's image part is plain text there.
    assert translator_for(Dialect.ANTHROPIC, Backend.OPENAI).input_estimate(openai_raw) == base


def _events(raw: bytes) -> list[tuple[str | None, Any]]:
    decoder = SseDecoder()
    events = decoder.feed(raw) + decoder.flush()
    return [(e.event, e.data if e.data == "[DONE]" else json.loads(e.data)) for e in events]


LEAKY = ("Rate limit reached in organization org-AbC123xyz for key sk-live-abcdef123456: "
         "Limit 10000, Used 9990")


def test_openai_passthrough_scrubs_in_stream_errors() -> None:
    translator = OpenAIPassthrough(Backend.OPENAI)
    translator.request({"model": "m", "messages": USER, "stream": True,
                        "stream_options": {"include_usage": True}},
                       upstream_model="gpt-4o", api_version=None)
    stream = translator.stream()
    error = {"error": {"message": LEAKY, "type": "rate_limit_error", "code": "x" * 100}}
    raw = b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"
    out = b"".join(stream.feed(raw[i:i + 7]) for i in range(0, len(raw), 7)) + stream.flush()
    assert _events(out) == [
        (None, {"error": {"message": "Rate limit reached in organization [redacted] for key "
                                     "[redacted]: Limit [redacted], Used [redacted]",
                          "type": "rate_limit_error"}}),
        (None, "[DONE]")]
    assert b"org-AbC123xyz" not in out
    assert b"sk-live" not in out


def test_anthropic_passthrough_scrubs_error_events() -> None:
    stream = AnthropicPassthrough().stream()
    raw = (b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
           b'"message":"Overloaded for proj_abcdef0123 key sk-ant-abcdefghij"}}\n\n'
           b"event: error\ndata: not json\n\n")
    out = stream.feed(raw) + stream.flush()
    assert _events(out) == [
        ("error", {"type": "error", "error": {
            "message": "Overloaded for [redacted] key [redacted]", "type": "overloaded_error"}}),
        ("error", {"type": "error", "error": {
            "message": "The provider failed while streaming."}}),
    ]


def test_a_chunk_with_a_null_error_is_not_an_error() -> None:
    translator = OpenAIPassthrough(Backend.OPENAI)
    translator.request({"model": "m", "messages": USER, "stream": True,
                        "stream_options": {"include_usage": True}},
                       upstream_model="gpt-4o", api_version=None)
    stream = translator.stream()
    raw = b'data: {"error":null,"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'
    assert stream.feed(raw) == raw


def test_anthropic_door_stream_ignores_a_null_error() -> None:
    stream = AnthropicToOpenAI(Backend.OPENAI).stream()
    raw = (b'data: {"id":"c","model":"m","error":null,'
           b'"choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n')
    kinds = [kind for kind, _ in _events(stream.feed(raw))]
    assert "error" not in kinds
    assert "content_block_delta" in kinds
