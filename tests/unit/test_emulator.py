"""Unit tests for the LLM provider emulator (``extproc.emulator``).

The emulator is the upstream for every demo, e2e test and benchmark, so its
contract (exact bodies, usage numbers, SSE framing, faults, recording, keys) is
pinned here.  Everything runs on loopback: in-process via aiohttp's TestServer,
plus one real ``python -m extproc.emulator`` subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from extproc.emulator import EmulatorConfig, make_app
from extproc.emulator import app as emulator_app
from extproc.emulator.app import key_fingerprint

KEY = "sk-emu-test-key"
CANARY = "sk-CANARY-7f3a9c1e55d04b2a"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = "/v1/chat/completions"
REPLY = "Hello from the emulator."
REPO_ROOT = Path(__file__).resolve().parents[2]


def chat_body(**extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    body.update(extra)
    return body


def invalid(message: str, param: str | None) -> dict[str, Any]:
    return {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": param,
            "code": None,
        }
    }


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Any]]:
    clients: list[TestClient[web.Request, web.Application]] = []

    async def factory(
        app: web.Application | None = None, **config: Any
    ) -> TestClient[web.Request, web.Application]:
        config.setdefault("keys", frozenset({KEY}))
        client = TestClient(TestServer(app or make_app(EmulatorConfig(**config))))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def client(
    make_client: Callable[..., Any],
) -> TestClient[web.Request, web.Application]:
    result: TestClient[web.Request, web.Application] = await make_client()
    return result


async def post_chat(
    client: TestClient[web.Request, web.Application],
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> aiohttp.ClientResponse:
    return await client.post(
        CHAT, json=chat_body() if body is None else body, headers=AUTH | (headers or {})
    )


def parse_sse(text: str) -> list[str]:
    """Return the ``data:`` payloads; asserts strict ``data: ...\\n\\n`` framing."""
    assert text.endswith("\n\n")
    events = text[:-2].split("\n\n")
    payloads = []
    for event in events:
        assert event.startswith("data: "), event
        assert "\n" not in event
        payloads.append(event[len("data: ") :])
    return payloads


# --------------------------------------------------------------------------- happy path


async def test_non_streaming_exact_body(client: TestClient[web.Request, web.Application]) -> None:
    before = int(time.time())
    resp = await post_chat(client)
    assert resp.status == 200
    assert resp.content_type == "application/json"
    body = await resp.json()
    assert before <= body.pop("created") <= int(time.time())
    assert body == {
        "id": "chatcmpl-emu-1",
        "object": "chat.completion",
        "model": "gpt-4o-mini",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": REPLY},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 4, "total_tokens": 5},
    }
    second = await (await post_chat(client)).json()
    assert second["id"] == "chatcmpl-emu-2"


async def test_usage_counts_text_of_strings_and_text_parts(
    client: TestClient[web.Request, web.Application],
) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},  # 14 chars
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Say hello"},  # 9 chars
                {"type": "image_url", "image_url": {"url": "https://example.invalid/a.png"}},
            ],
        },
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "ok"},  # 2 chars
    ]
    resp = await post_chat(client, chat_body(messages=messages, temperature=0, seed=1))
    assert resp.status == 200
    # 25 chars -> ceil(25 / 4) = 7
    assert (await resp.json())["usage"] == {
        "prompt_tokens": 7,
        "completion_tokens": 4,
        "total_tokens": 11,
    }


async def test_prompt_tokens_minimum_is_one(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await post_chat(client, chat_body(messages=[{"role": "user", "content": ""}]))
    assert (await resp.json())["usage"]["prompt_tokens"] == 1


@pytest.mark.parametrize(
    ("limits", "content", "finish", "words"),
    [
        ({"max_tokens": 2}, "Hello from", "length", 2),
        ({"max_completion_tokens": 1}, "Hello", "length", 1),
        ({"max_tokens": 3, "max_completion_tokens": 2}, "Hello from", "length", 2),
        ({"max_tokens": 4}, REPLY, "stop", 4),
        ({"max_completion_tokens": 100}, REPLY, "stop", 4),
        ({"max_tokens": None}, REPLY, "stop", 4),
    ],
)
async def test_max_tokens_truncates_words(
    client: TestClient[web.Request, web.Application],
    limits: dict[str, Any],
    content: str,
    finish: str,
    words: int,
) -> None:
    resp = await post_chat(client, chat_body(**limits))
    assert resp.status == 200
    body = await resp.json()
    assert body["choices"][0]["message"]["content"] == content
    assert body["choices"][0]["finish_reason"] == finish
    assert body["usage"] == {
        "prompt_tokens": 1,
        "completion_tokens": words,
        "total_tokens": 1 + words,
    }


async def test_custom_reply_and_latency(make_client: Callable[..., Any]) -> None:
    client = await make_client(reply="one two three", latency_ms=50)
    start = time.monotonic()
    body = await (await post_chat(client)).json()
    assert time.monotonic() - start >= 0.045
    assert body["choices"][0]["message"]["content"] == "one two three"
    assert body["usage"]["completion_tokens"] == 3


# --------------------------------------------------------------------------- streaming


async def stream_payloads(
    client: TestClient[web.Request, web.Application], **extra: Any
) -> list[str]:
    resp = await post_chat(client, chat_body(stream=True, **extra))
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    return parse_sse(await resp.text())


async def test_streaming_chunk_sequence(client: TestClient[web.Request, web.Application]) -> None:
    plain = await (await post_chat(client)).json()
    payloads = await stream_payloads(client)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert len(chunks) == 1 + 4 + 1  # role, words, finish
    for chunk in chunks:
        assert chunk["id"] == "chatcmpl-emu-2"
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "gpt-4o-mini"
        assert isinstance(chunk["created"], int)
        assert set(chunk) == {"id", "object", "created", "model", "choices"}
    assert chunks[0]["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
    ]
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert deltas == ["Hello", " from", " the", " emulator."]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    assert "".join(deltas) == plain["choices"][0]["message"]["content"]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert not any("usage" in c for c in chunks)


async def test_streaming_usage_chunk_only_with_include_usage(
    client: TestClient[web.Request, web.Application],
) -> None:
    payloads = await stream_payloads(client, stream_options={"include_usage": True}, max_tokens=3)
    assert payloads[-1] == "[DONE]"
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert [c["choices"][0]["delta"].get("content") for c in chunks[1:4]] == [
        "Hello",
        " from",
        " the",
    ]
    assert chunks[4]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "length"}]
    usage_chunk = chunks[5]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}
    assert len(chunks) == 6

    without = await stream_payloads(client, stream_options={"include_usage": False})
    assert not any("usage" in json.loads(p) for p in without[:-1])
    assert without[-1] == "[DONE]"


class PauseGate:
    """Stands in for the emulator's pause between streamed events: records each pause
    and holds it until the test opens the gate, so pacing is checked without clocks."""

    def __init__(self) -> None:
        self.pauses: list[float] = []
        self.waiting = asyncio.Event()
        self.open = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.pauses.append(seconds)
        self.waiting.set()
        await self.open.wait()


@pytest.fixture
def pause_gate(monkeypatch: pytest.MonkeyPatch) -> PauseGate:
    gate = PauseGate()
    monkeypatch.setattr(emulator_app, "chunk_pause", gate)
    return gate


async def test_streaming_chunk_delay_paces_every_gap(
    make_client: Callable[..., Any], pause_gate: PauseGate
) -> None:
    pause_gate.open.set()
    client = await make_client(chunk_delay_ms=20)
    payloads = await stream_payloads(client)
    assert len(payloads) == 7
    assert pause_gate.pauses == [0.02] * 6  # six gaps between seven events, none before


async def test_streaming_sends_chunks_as_produced(
    make_client: Callable[..., Any], pause_gate: PauseGate
) -> None:
    client = await make_client(chunk_delay_ms=150)
    resp = await post_chat(client, chat_body(stream=True))
    # The first event arrives while the second one is still held back by the gate.
    first = await asyncio.wait_for(resp.content.readline(), timeout=30)
    assert first.startswith(b"data: ")
    assert b'"role":"assistant"' in first
    await asyncio.wait_for(pause_gate.waiting.wait(), timeout=30)
    assert pause_gate.pauses == [0.15]
    assert resp.content.at_eof() is False
    pause_gate.open.set()
    rest = await resp.content.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert len(parse_sse((first + rest).decode())) == 7


# --------------------------------------------------------------------------- auth


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": f"Bearer {CANARY}"},
        {"Authorization": f"Bearer {KEY}x"},
        {"Authorization": KEY},
        {"Authorization": f"Basic {KEY}"},
        {"Authorization": "Bearer "},
        {"x-api-key": CANARY},
        {},
    ],
)
async def test_bad_or_missing_key_is_401_without_echo(
    client: TestClient[web.Request, web.Application], headers: dict[str, str]
) -> None:
    resp = await client.post(CHAT, json=chat_body(), headers=headers)
    assert resp.status == 401
    text = await resp.text()
    assert json.loads(text) == {
        "error": {
            "message": "Incorrect API key provided.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    assert CANARY not in text
    assert CANARY[:8] not in text
    assert CANARY[-8:] not in text
    assert CANARY not in str(dict(resp.headers))
    recorded = await (await client.get("/_emulator/requests")).text()
    assert CANARY not in recorded
    assert CANARY[-6:] not in recorded


async def test_bearer_scheme_is_case_insensitive(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.post(CHAT, json=chat_body(), headers={"Authorization": f"bearer {KEY}"})
    assert resp.status == 200


# --------------------------------------------------------------------------- validation


async def test_missing_messages_is_400(client: TestClient[web.Request, web.Application]) -> None:
    resp = await post_chat(client, {"model": "gpt-4o-mini"})
    assert resp.status == 400
    assert await resp.json() == invalid("Missing required parameter: 'messages'.", "messages")


async def test_unknown_field_is_400(client: TestClient[web.Request, web.Application]) -> None:
    resp = await post_chat(client, chat_body(frobnicate=True))
    assert resp.status == 400
    assert await resp.json() == invalid("Unrecognized request argument supplied: frobnicate", None)


@pytest.mark.parametrize(
    ("body", "param", "message_part"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "model parameter"),
        (chat_body(model=""), "model", "Invalid type for 'model'"),
        (chat_body(model=3), "model", "Invalid type for 'model'"),
        (chat_body(messages=[]), "messages", "empty array"),
        (chat_body(messages="hi"), "messages", "expected an array"),
        (chat_body(messages=["hi"]), "messages[0]", "expected an object"),
        (chat_body(messages=[{"content": "x"}]), "messages[0].role", "Missing required"),
        (chat_body(messages=[{"role": 1, "content": "x"}]), "messages[0].role", "Invalid type"),
        (chat_body(messages=[{"role": "robot", "content": "x"}]), "messages[0].role", "Supported"),
        (chat_body(messages=[{"role": "user"}]), "messages[0].content", "Missing required"),
        (chat_body(messages=[{"role": "user", "content": None}]), "messages[0].content", "null"),
        (
            chat_body(messages=[{"role": "assistant", "content": None}]),
            "messages[0].content",
            "Invalid type",
        ),
        (chat_body(messages=[{"role": "user", "content": 5}]), "messages[0].content", "integer"),
        (chat_body(messages=[{"role": "user", "content": []}]), "messages[0].content", "empty"),
        (
            chat_body(messages=[{"role": "user", "content": [{"type": "text", "text": 1}]}]),
            "messages[0].content[0].text",
            "Invalid type",
        ),
        (
            chat_body(messages=[{"role": "user", "content": [{"text": "x"}]}]),
            "messages[0].content[0]",
            "Missing required",
        ),
        (chat_body(max_tokens=0), "max_tokens", "below minimum"),
        (chat_body(max_completion_tokens="5"), "max_completion_tokens", "Invalid type"),
        (chat_body(max_tokens=True), "max_tokens", "Invalid type"),
        (chat_body(stream="yes"), "stream", "Invalid type"),
        (chat_body(stream_options={"include_usage": True}), "stream_options", "only allowed"),
        (
            chat_body(stream=True, stream_options={"include_usage": "y"}),
            "stream_options.include_usage",
            "Invalid type",
        ),
        ([chat_body()], None, "JSON object"),
    ],
)
async def test_validation_errors(
    client: TestClient[web.Request, web.Application],
    body: Any,
    param: str | None,
    message_part: str,
) -> None:
    resp = await post_chat(client, body)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["code"] is None
    assert message_part in error["message"]


async def test_invalid_json_is_400(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.post(CHAT, data=b"{not json", headers=AUTH)
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["message"].startswith("We could not parse the JSON body")
    assert error["param"] is None


async def test_every_known_field_is_accepted(
    client: TestClient[web.Request, web.Application],
) -> None:
    body = chat_body(
        max_tokens=10,
        max_completion_tokens=10,
        temperature=0.5,
        top_p=1,
        n=1,
        stream=False,
        stop=["\n"],
        presence_penalty=0,
        frequency_penalty=0,
        logit_bias={},
        logprobs=False,
        top_logprobs=None,
        user="u",
        seed=7,
        tools=[],
        tool_choice="auto",
        parallel_tool_calls=True,
        response_format={"type": "text"},
        service_tier="auto",
        store=False,
        metadata={},
        modalities=["text"],
        reasoning_effort="low",
        prediction=None,
        audio=None,
    )
    resp = await post_chat(client, body)
    assert resp.status == 200, await resp.text()


async def test_unknown_path_and_method_are_openai_404(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.post("/v1/nope", json={}, headers=AUTH)
    assert resp.status == 404
    assert await resp.json() == invalid("Invalid URL (POST /v1/nope)", None)
    resp = await client.get(CHAT, headers=AUTH)
    assert resp.status == 404
    assert await resp.json() == invalid("Invalid URL (GET /v1/chat/completions)", None)
    resp = await client.get("/_emulator/nope")
    assert resp.status == 404


# --------------------------------------------------------------------------- header faults


async def test_fault_status_5xx_before_auth(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await client.post(CHAT, json={}, headers={"x-emulator-status": "503"})
    assert resp.status == 503
    assert resp.content_type == "application/json"
    assert await resp.json() == {
        "error": {
            "message": "The server had an error while processing your request. Sorry about that!",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    assert "retry-after" not in resp.headers


async def test_fault_429_has_retry_after(client: TestClient[web.Request, web.Application]) -> None:
    resp = await post_chat(client, headers={"x-emulator-status": "429"})
    assert resp.status == 429
    assert resp.headers["retry-after"] == "1"
    error = (await resp.json())["error"]
    assert error["code"] == "rate_limit_exceeded"
    assert error["type"] == "requests"

    resp = await post_chat(
        client, headers={"x-emulator-status": "429", "x-emulator-retry-after": "7"}
    )
    assert resp.status == 429
    assert resp.headers["retry-after"] == "7"


async def test_fault_4xx_is_invalid_request_error(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await post_chat(client, headers={"x-emulator-status": "400"})
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"
    resp = await post_chat(client, headers={"x-emulator-status": "401"})
    assert resp.status == 401
    assert (await resp.json())["error"]["code"] == "invalid_api_key"


async def test_fault_html(client: TestClient[web.Request, web.Application]) -> None:
    resp = await post_chat(client, headers={"x-emulator-status": "502", "x-emulator-html": "1"})
    assert resp.status == 502
    assert resp.content_type == "text/html"
    assert await resp.text() == "<html><body><h1>502 Bad Gateway</h1></body></html>"

    resp = await post_chat(client, headers={"x-emulator-status": "503", "x-emulator-html": "true"})
    assert resp.status == 503
    assert await resp.text() == "<html><body><h1>503 Service Unavailable</h1></body></html>"

    resp = await post_chat(client, headers={"x-emulator-html": "1"})  # no status -> 502
    assert resp.status == 502
    assert resp.content_type == "text/html"


async def test_fault_delay(client: TestClient[web.Request, web.Application]) -> None:
    start = time.monotonic()
    resp = await post_chat(client, headers={"x-emulator-delay-ms": "120"})
    assert resp.status == 200
    assert time.monotonic() - start >= 0.11
    # delay composes with a status fault
    start = time.monotonic()
    resp = await post_chat(
        client, headers={"x-emulator-delay-ms": "60", "x-emulator-status": "500"}
    )
    assert resp.status == 500
    assert time.monotonic() - start >= 0.055


async def test_fault_reset(client: TestClient[web.Request, web.Application]) -> None:
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post_chat(client, headers={"x-emulator-reset": "1"})
    assert (await post_chat(client)).status == 200


async def read_events_until_reset(resp: aiohttp.ClientResponse) -> list[str]:
    """Collect ``data:`` payloads; the stream must end in a connection reset."""
    events: list[str] = []
    reset = False
    try:
        async for line in resp.content:
            if line.startswith(b"data: "):
                events.append(line[6:].decode().strip())
    except aiohttp.ClientPayloadError:
        reset = True
    assert reset, "stream completed instead of being reset"
    return events


@pytest.mark.parametrize("after", [0, 1, 3])
async def test_fault_reset_after_chunks(
    client: TestClient[web.Request, web.Application], after: int
) -> None:
    resp = await post_chat(
        client, chat_body(stream=True), headers={"x-emulator-reset-after-chunks": str(after)}
    )
    assert resp.status == 200
    events = await read_events_until_reset(resp)
    assert len(events) == after
    assert "[DONE]" not in events


async def test_reset_after_chunks_ignored_without_stream(
    client: TestClient[web.Request, web.Application],
) -> None:
    resp = await post_chat(client, headers={"x-emulator-reset-after-chunks": "1"})
    assert resp.status == 200


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("x-emulator-status", "abc"),
        ("x-emulator-status", "200"),
        ("x-emulator-html", "maybe"),
        ("x-emulator-delay-ms", "-1"),
        ("x-emulator-reset-after-chunks", "x"),
    ],
)
async def test_bad_fault_header_is_400(
    client: TestClient[web.Request, web.Application], name: str, value: str
) -> None:
    resp = await post_chat(client, headers={name: value})
    assert resp.status == 400
    assert name in (await resp.json())["error"]["message"]


# --------------------------------------------------------------------------- control faults


async def test_control_fault_count(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.post("/_emulator/faults", json={"status": 500, "count": 2})
    assert resp.status == 200
    pending = (await resp.json())["faults"]
    assert pending == [
        {
            "status": 500,
            "html": False,
            "delay_ms": 0,
            "reset": False,
            "reset_after_chunks": None,
            "end_after_chunks": None,
            "retry_after": None,
            "pad_bytes": 0,
            "message": None,
            "stream_error": None,
            "stream_error_split": None,
            "stream_error_id": False,
            "remaining": 2,
        }
    ]
    # a header fault wins and does not consume the queued one
    assert (await post_chat(client, headers={"x-emulator-status": "418"})).status == 418
    assert [(await post_chat(client)).status for _ in range(3)] == [500, 500, 200]
    assert (await (await client.get("/_emulator/faults")).json()) == {"faults": []}


async def test_control_fault_default_count_and_kinds(
    client: TestClient[web.Request, web.Application],
) -> None:
    for fault in (
        {"status": 429},
        {"status": 503, "html": True},
        {"delay_ms": 80},
        {"reset": True},
        {"reset_after_chunks": 2},
    ):
        assert (await client.post("/_emulator/faults", json=fault)).status == 200

    resp = await post_chat(client)
    assert (resp.status, resp.headers["retry-after"]) == (429, "1")
    resp = await post_chat(client)
    assert (resp.status, resp.content_type) == (503, "text/html")
    start = time.monotonic()
    assert (await post_chat(client)).status == 200
    assert time.monotonic() - start >= 0.075
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await post_chat(client)
    resp = await post_chat(client, chat_body(stream=True))
    assert len(await read_events_until_reset(resp)) == 2
    assert (await post_chat(client)).status == 200


async def test_control_fault_clear_and_scope(
    client: TestClient[web.Request, web.Application],
) -> None:
    await client.post("/_emulator/faults", json={"status": 500, "count": 5})
    # control and unknown paths do not consume chat faults
    assert (await client.get("/_emulator/health")).status == 200
    assert (await client.post("/v1/nope", json={})).status == 404
    assert (await (await client.get("/_emulator/faults")).json())["faults"][0]["remaining"] == 5
    resp = await client.delete("/_emulator/faults")
    assert resp.status == 204
    assert (await post_chat(client)).status == 200


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"count": 3},
        {"status": 200},
        {"status": "500"},
        {"html": 1},
        {"delay_ms": -5},
        {"status": 500, "count": 0},
        {"status": 500, "bogus": 1},
        [{"status": 500}],
    ],
)
async def test_control_fault_rejects_bad_body(
    client: TestClient[web.Request, web.Application], body: Any
) -> None:
    resp = await client.post("/_emulator/faults", json=body)
    assert resp.status == 400
    assert (await (await client.get("/_emulator/faults")).json()) == {"faults": []}


# --------------------------------------------------------------------------- recording


async def test_recording_and_clearing(client: TestClient[web.Request, web.Application]) -> None:
    before = time.time()
    await client.post(
        CHAT + "?trace=1",
        data=b'{"model": "m"}',
        headers={"Authorization": f"Bearer {KEY}", "X-Custom": "Yes"},
    )
    await client.post(CHAT, data=b"\xff\xfe not utf-8", headers={"Authorization": "Bearer nope"})
    await client.get("/v1/models")
    await client.get("/_emulator/health")  # control paths are not recorded
    resp = await client.get("/_emulator/requests")
    assert resp.status == 200
    records = (await resp.json())["requests"]
    assert [(r["method"], r["path"]) for r in records] == [
        ("POST", CHAT),
        ("POST", CHAT),
        ("GET", "/v1/models"),
    ]
    first = records[0]
    assert set(first) == {"method", "path", "query", "headers", "body", "ts"}
    assert first["query"] == "trace=1"
    assert first["body"] == '{"model": "m"}'
    assert first["headers"]["x-custom"] == "Yes"
    assert all(name == name.lower() for name in first["headers"])
    # credentials are recorded as a fingerprint, never verbatim
    assert first["headers"]["authorization"] == f"Bearer {key_fingerprint(KEY)}"
    assert KEY not in json.dumps(records)
    assert before <= first["ts"] <= time.time()
    assert records[1]["body"] == "\ufffd\ufffd not utf-8"
    assert records[2]["query"] == ""

    assert (await client.delete("/_emulator/requests")).status == 204
    assert (await (await client.get("/_emulator/requests")).json()) == {"requests": []}


async def test_recording_redacts_query_keys_and_is_bounded(
    make_client: Callable[..., Any],
) -> None:
    client = await make_client(record_limit=2)
    await client.post(CHAT + f"?api-key={CANARY}&x=1", json={})
    await client.post(CHAT, json={}, headers={"x-emulator-status": "500"})
    await client.post(CHAT, json={}, headers={"x-api-key": CANARY})
    text = await (await client.get("/_emulator/requests")).text()
    records = json.loads(text)["requests"]
    assert len(records) == 2
    assert records[0]["headers"]["x-emulator-status"] == "500"
    assert records[1]["headers"]["x-api-key"] == key_fingerprint(CANARY)
    assert CANARY not in text


# --------------------------------------------------------------------------- keys / health


async def test_key_replacement(client: TestClient[web.Request, web.Application]) -> None:
    assert (await post_chat(client)).status == 200
    resp = await client.put("/_emulator/keys", json={"keys": ["new-1", "new-2"]})
    assert resp.status == 204
    assert (await post_chat(client)).status == 401
    for key in ("new-1", "new-2"):
        resp = await client.post(CHAT, json=chat_body(), headers={"Authorization": f"Bearer {key}"})
        assert resp.status == 200
    assert (await client.put("/_emulator/keys", json={"keys": []})).status == 204
    resp = await client.post(CHAT, json=chat_body(), headers={"Authorization": "Bearer new-1"})
    assert resp.status == 401


@pytest.mark.parametrize("body", [{}, {"keys": "k"}, {"keys": [1]}, {"keys": [""]}, ["k"]])
async def test_key_replacement_rejects_bad_body(
    client: TestClient[web.Request, web.Application], body: Any
) -> None:
    resp = await client.put("/_emulator/keys", json=body)
    assert resp.status == 400
    assert (await post_chat(client)).status == 200


async def test_health(client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.get("/_emulator/health")
    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_apps_have_independent_state(make_client: Callable[..., Any]) -> None:
    one = await make_client()
    two = await make_client()
    await one.put("/_emulator/keys", json={"keys": ["other"]})
    assert (await post_chat(one)).status == 401
    assert (await post_chat(two)).status == 200


def test_config_rejects_negative_values() -> None:
    with pytest.raises(ValueError, match="latency_ms"):
        EmulatorConfig(keys=frozenset(), latency_ms=-1)
    with pytest.raises(ValueError, match="record_limit"):
        EmulatorConfig(keys=frozenset(), record_limit=-1)


async def test_accepted_sockets_have_tcp_nodelay(make_client: Callable[..., Any]) -> None:
    app = make_app(EmulatorConfig(keys=frozenset({KEY})))
    seen: list[int] = []

    async def probe(request: web.Request) -> web.Response:
        assert request.transport is not None
        sock = request.transport.get_extra_info("socket")
        seen.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return web.Response(text="ok")

    app.router.add_get("/_test/nodelay", probe)
    client = await make_client(app)
    assert (await client.get("/_test/nodelay")).status == 200
    assert len(seen) == 1
    assert seen[0] != 0


# --------------------------------------------------------------------------- real process


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> bytes:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, "emulator did not print its listening line in time"
    return proc.stdout.readline()


def test_cli_subprocess_serves_and_exits_on_sigterm() -> None:
    port = free_port()
    env = dict(os.environ, EMULATOR_KEYS=f"{KEY}, other-key")
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.emulator", "--host", "127.0.0.1", "--port", str(port)],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        line = read_line(proc, timeout=20)
        assert line == f"emulator listening on http://127.0.0.1:{port}\n".encode()

        request = urllib.request.Request(
            f"http://127.0.0.1:{port}{CHAT}",
            data=json.dumps(chat_body()).encode(),
            headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as resp:  # noqa: S310
            assert resp.status == 200
            body = json.loads(resp.read())
        assert body["choices"][0]["message"]["content"] == REPLY

        bad = urllib.request.Request(
            f"http://127.0.0.1:{port}{CHAT}?key={CANARY}",
            data=b"{}",
            headers={"Authorization": f"Bearer {CANARY}"},
            method="POST",
        )
        with pytest.raises(urllib.error.HTTPError) as excinfo:
            urllib.request.urlopen(bad, timeout=10)  # noqa: S310
        assert excinfo.value.code == 401
        assert CANARY.encode() not in excinfo.value.read()

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert out == b""  # exactly one stdout line, already consumed
    assert CANARY.encode() not in err
    assert KEY.encode() not in err


def test_cli_rejects_missing_keys_file(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "extproc.emulator", "--keys-file", str(tmp_path / "missing")],
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stdout == b""


def test_load_keys_merges_sources(tmp_path: Path) -> None:
    from extproc.emulator.__main__ import load_keys

    keys_file = tmp_path / "keys"
    keys_file.write_text("# comment\nfile-key\n\n  spaced  \n", encoding="utf-8")
    assert load_keys(["cli"], keys_file, "env-a, env-b,,") == frozenset(
        {"cli", "file-key", "spaced", "env-a", "env-b"}
    )
    assert load_keys([], None, None) == frozenset()


async def test_control_fault_pads_a_json_answer(
        client: TestClient[web.Request, web.Application]) -> None:
    resp = await client.post("/_emulator/faults", json={"pad_bytes": 100_000})
    assert resp.status == 200
    padded = await post_chat(client)
    body = await padded.json()
    assert padded.status == 200
    assert body["emulator_padding"] == "x" * 100_000
    assert body["usage"]["completion_tokens"] == 4
    assert "emulator_padding" not in await (await post_chat(client)).json()


async def test_control_fault_message_replaces_the_shape_message(
    client: TestClient[web.Request, web.Application],
) -> None:
    queued = await client.post("/_emulator/faults",
                               json={"status": 400, "message": "Unrecognized: xyz"})
    assert queued.status == 200
    resp = await post_chat(client)
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == "Unrecognized: xyz"
    refused = await client.post("/_emulator/faults", json={"status": 400, "message": ""})
    assert refused.status == 400
    assert (await refused.json())["error"]["message"] == (
        "'message' must be a string of 1 to 16777216 characters")


@pytest.mark.parametrize("model", ["o1", "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini"])
async def test_reasoning_models_refuse_max_tokens_like_openai(
    client: TestClient[web.Request, web.Application], model: str
) -> None:
    resp = await post_chat(client, chat_body(model=model, max_tokens=5))
    assert resp.status == 400
    assert await resp.json() == {"error": {
        "message": "Unsupported parameter: 'max_tokens' is not supported with this model. "
                   "Use 'max_completion_tokens' instead.",
        "type": "invalid_request_error", "param": "max_tokens",
        "code": "unsupported_parameter"}}
    accepted = await post_chat(client, chat_body(model=model, max_completion_tokens=5))
    assert accepted.status == 200


async def test_every_provider_answer_names_the_account(
    client: TestClient[web.Request, web.Application],
) -> None:
    ok = await post_chat(client)
    assert {name: ok.headers.get(name) for name in emulator_app.OPENAI_ACCOUNT_HEADERS} == \
        dict(emulator_app.OPENAI_ACCOUNT_HEADERS)
    await client.post("/_emulator/faults", json={"status": 429})
    limited = await post_chat(client)
    assert limited.status == 429
    assert limited.headers["openai-organization"] == "org-emulat0r5hared4cc0unt"
    assert "org-emulat0r5hared4cc0unt" in (await limited.json())["error"]["message"]
    control = await client.get("/_emulator/health")
    assert "openai-organization" not in control.headers


async def test_control_fault_stream_error_ends_the_stream_with_an_error_event(
    client: TestClient[web.Request, web.Application],
) -> None:
    queued = await client.post("/_emulator/faults", json={"stream_error": "Overloaded now"})
    assert queued.status == 200
    resp = await post_chat(client, chat_body(stream=True))
    assert resp.status == 200
    payloads = parse_sse(await resp.text())
    assert len(payloads) == 2
    assert json.loads(payloads[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert json.loads(payloads[1]) == {"error": {
        "message": "Overloaded now", "type": "server_error", "param": None, "code": None}}
