"""Anthropic door -> Anthropic backend: model replaced, bytes forwarded, usage read."""

from __future__ import annotations

import json
from typing import Any

from extproc.translate.anthropic_passthrough import AnthropicPassthrough
from extproc.translate.base import Usage


def test_request_replaces_model_only() -> None:
    body: dict[str, Any] = {
        "model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}],
        "top_k": 5, "thinking": {"type": "enabled", "budget_tokens": 1024}, "system": "s"}
    upstream = AnthropicPassthrough().request(body, upstream_model="claude-up", api_version=None)
    assert upstream.path == "/v1/messages"
    assert upstream.headers == (("anthropic-version", "2023-06-01"),)
    assert json.loads(upstream.body) == {**body, "model": "claude-up"}
    assert body["model"] == "claude"


def test_response_passes_bytes_and_counts_cache_tokens() -> None:
    body = (b'{"id":"m","type":"message","content":[],"usage":{"input_tokens":10,'
            b'"output_tokens":3,"cache_read_input_tokens":50,"cache_creation_input_tokens":7}}')
    result = AnthropicPassthrough().response(200, body)
    assert result.body is body
    assert result.usage == Usage(input_tokens=67, output_tokens=3, cached_input_tokens=50,
                                 cache_write_input_tokens=7)


def test_response_without_usage() -> None:
    assert AnthropicPassthrough().response(200, b"{}").usage is None
    assert AnthropicPassthrough().response(200, b"not json").usage is None


def ev(kind: str, **payload: Any) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload})}\n\n".encode()


STREAM = b"".join([
    ev("message_start", message={"id": "m", "usage": {
        "input_tokens": 12, "output_tokens": 1, "cache_read_input_tokens": 4}}),
    ev("content_block_start", index=0, content_block={"type": "text", "text": ""}),
    ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "a"}),
    ev("content_block_delta", index=0, delta={"type": "text_delta", "text": "b"}),
    ev("content_block_stop", index=0),
    ev("message_delta", delta={"stop_reason": "end_turn"},
       usage={"output_tokens": 9, "input_tokens": 14, "cache_read_input_tokens": None}),
    ev("message_stop"),
])


def test_stream_forwarded_with_usage_from_start_and_delta() -> None:
    stream = AnthropicPassthrough().stream()
    first = stream.feed(STREAM[:50])
    assert not stream.first_token_seen
    assert first + stream.feed(STREAM[50:]) == STREAM  # whole events, the same bytes
    assert stream.flush() == b""
    assert stream.usage == Usage(input_tokens=18, output_tokens=9, cached_input_tokens=4)
    assert stream.output_tokens_so_far == 2
    assert stream.first_token_seen


def test_stream_usage_needs_message_delta() -> None:
    stream = AnthropicPassthrough().stream()
    stream.feed(STREAM[: STREAM.index(b"event: message_delta")])
    assert stream.usage is None
    assert stream.output_tokens_so_far == 2


def test_stream_without_event_names_is_read_from_data() -> None:
    raw = b"".join(line for line in STREAM.splitlines(keepends=True)
                   if not line.startswith(b"event:"))
    stream = AnthropicPassthrough().stream()
    stream.feed(raw)
    assert stream.usage == Usage(input_tokens=18, output_tokens=9, cached_input_tokens=4)
    assert stream.output_tokens_so_far == 2
