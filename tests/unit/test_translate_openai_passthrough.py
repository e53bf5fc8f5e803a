"""OpenAI door -> OpenAI, OpenAI-compatible, Mistral and Azure backends."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.translate.base import Backend, Usage
from extproc.translate.openai_passthrough import OpenAIPassthrough
from extproc.translate.sse import SseDecoder

BODY: dict[str, Any] = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}],
    "temperature": 0.1,
}


def send(backend: Backend, body: dict[str, Any]) -> tuple[OpenAIPassthrough, dict[str, Any]]:
    translator = OpenAIPassthrough(backend)
    upstream = translator.request(body, upstream_model="up", api_version="2024-10-21")
    sent: dict[str, Any] = json.loads(upstream.body)
    return translator, sent


@pytest.mark.parametrize("backend", [Backend.OPENAI, Backend.OPENAI_COMPATIBLE])
def test_openai_and_compatible_pass_through(backend: Backend) -> None:
    body = {**BODY, "logit_bias": {"1": 2}, "user": "u", "seed": 3, "n": 2,
            "max_completion_tokens": 9, "vendor_extension": {"x": 1}}
    _, sent = send(backend, body)
    assert sent == {**body, "model": "up"}
    assert body["model"] == "gpt-4o-mini"  # the caller's dict is not changed


@pytest.mark.parametrize(
    ("options", "sent_options"),
    [
        (None, {"include_usage": True}),
        ({"include_usage": False}, {"include_usage": True}),
        ({"include_usage": True}, {"include_usage": True}),
        ({"include_obfuscation": False}, {"include_obfuscation": False, "include_usage": True}),
    ],
)
@pytest.mark.parametrize("backend", [Backend.OPENAI, Backend.OPENAI_COMPATIBLE, Backend.AZURE])
def test_streams_ask_for_usage(backend: Backend, options: dict[str, Any] | None,
                               sent_options: dict[str, Any]) -> None:
    body: dict[str, Any] = {**BODY, "stream": True}
    if options is not None:
        body["stream_options"] = options
    _, sent = send(backend, body)
    assert sent["stream_options"] == sent_options


def test_non_streaming_requests_are_not_given_stream_options() -> None:
    _, sent = send(Backend.OPENAI, dict(BODY))
    assert "stream_options" not in sent


def test_azure_moves_model_to_path() -> None:
    translator = OpenAIPassthrough(Backend.AZURE)
    upstream = translator.request({**BODY, "user": "u"}, upstream_model="prod-dep",
                                  api_version="2025-01-01-preview")
    assert upstream.path == (
        "/openai/deployments/prod-dep/chat/completions?api-version=2025-01-01-preview")
    assert json.loads(upstream.body) == {
        "messages": BODY["messages"], "temperature": 0.1, "user": "u"}


def test_mistral_renames_and_drops() -> None:
    body = {**BODY, "max_completion_tokens": 50, "max_tokens": 80, "seed": 42, "stream": True,
            "stream_options": {"include_usage": True}, "n": 1, "tools": [], "user": None}
    _, sent = send(Backend.MISTRAL, body)
    assert sent == {
        "model": "up", "messages": BODY["messages"], "temperature": 0.1, "max_tokens": 50,
        "random_seed": 42, "stream": True, "n": 1, "tools": []}


def test_mistral_seed_null_is_dropped() -> None:
    _, sent = send(Backend.MISTRAL, {**BODY, "seed": None, "max_tokens": 3})
    assert sent == {"model": "up", "messages": BODY["messages"], "temperature": 0.1,
                    "max_tokens": 3}


# --------------------------------------------------------------------------- responses


@pytest.mark.parametrize("backend", [b for b in Backend
                                     if b not in (Backend.ANTHROPIC, Backend.GEMINI)])
def test_response_passes_bytes_and_reads_usage(backend: Backend) -> None:
    body = (b'{"id":"x","object":"chat.completion","choices":[],"usage":{"prompt_tokens":30,'
            b'"completion_tokens":4,"total_tokens":34,"prompt_tokens_details":'
            b'{"cached_tokens":16}}}')
    result = OpenAIPassthrough(backend).response(200, body)
    assert result.body is body
    assert result.usage == Usage(input_tokens=30, output_tokens=4, cached_input_tokens=16)


@pytest.mark.parametrize(
    ("body", "usage"),
    [(b'{"usage":{"prompt_tokens":3,"completion_tokens":1}}', Usage(3, 1, 0)),
     (b'{"usage":null}', None), (b"{}", None), (b"oops", None), (b"[1]", None),
     (b'{"usage":{"prompt_tokens":"3","completion_tokens":1}}', None)],
)
def test_response_usage_edge_cases(body: bytes, usage: Usage | None) -> None:
    assert OpenAIPassthrough(Backend.OPENAI).response(200, body).usage == usage


# --------------------------------------------------------------------------- streams


def data(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload)}\n\n".encode()


def chunk(delta: dict[str, Any], finish: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9,
         "prompt_tokens_details": {"cached_tokens": 0}}
USAGE_CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "up",
               "choices": [], "usage": USAGE}
AZURE_FILTER = {"id": "", "object": "", "created": 0, "model": "", "choices": [],
                "prompt_filter_results": []}
STREAM = [AZURE_FILTER, chunk({"role": "assistant", "content": ""}), chunk({"content": "Hi"}),
          chunk({"tool_calls": [{"index": 0, "id": "t", "function": {"name": "f"}}]}),
          chunk({}, "stop"), USAGE_CHUNK]
RAW = b"".join(data(c) for c in STREAM) + b"data: [DONE]\n\n"


def decoded(raw: bytes) -> list[str]:
    decoder = SseDecoder()
    return [e.data for e in decoder.feed(raw) + decoder.flush()]


def stream_for(backend: Backend, include_usage: bool | None) -> Any:
    body: dict[str, Any] = {**BODY, "stream": True}
    if include_usage is not None:
        body["stream_options"] = {"include_usage": include_usage}
    translator, _ = send(backend, body)
    return translator.stream()


@pytest.mark.parametrize("include_usage", [None, False])
def test_stream_strips_usage_chunk_the_client_did_not_ask_for(include_usage: bool | None) -> None:
    stream = stream_for(Backend.OPENAI, include_usage)
    out = stream.feed(RAW) + stream.flush()
    assert decoded(out) == [json.dumps(c) for c in STREAM[:-1]] + ["[DONE]"]
    assert stream.usage == Usage(7, 2, 0)
    assert stream.output_tokens_so_far == 2
    assert stream.first_token_seen


def test_stream_is_forwarded_unchanged_when_client_asked_for_usage() -> None:
    stream = stream_for(Backend.AZURE, True)
    pieces = [RAW[:10], RAW[10:200], RAW[200:]]
    assert b"".join(stream.feed(p) for p in pieces) == RAW  # whole events, the same bytes
    assert stream.flush() == b""
    assert stream.usage == Usage(7, 2, 0)


def test_mistral_stream_is_forwarded_untouched() -> None:
    raw = data(chunk({"content": "Hi"})) + data(chunk({}, "stop", usage=USAGE)) + \
        b"data: [DONE]\n\n"
    stream = stream_for(Backend.MISTRAL, None)
    assert stream.feed(raw) == raw
    assert stream.usage == Usage(7, 2, 0)


def test_stream_abort_keeps_deltas_seen() -> None:
    stream = stream_for(Backend.OPENAI, None)
    cut = RAW.index(b'"finish_reason": "stop"')
    stream.feed(RAW[:cut])
    assert stream.usage is None
    assert stream.output_tokens_so_far == 2
