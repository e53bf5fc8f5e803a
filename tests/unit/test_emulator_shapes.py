"""The emulator's Anthropic, Mistral and Azure shapes, the weather tool trick and --shape."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from extproc.emulator import EmulatorConfig, make_app
from extproc.emulator.__main__ import main
from extproc.emulator.app import SHAPES, key_fingerprint, shapes_named

KEY = "sk-emu-shape-key"
CANARY = "sk-CANARY-0c4f1d2e9a8b7765"
REPO_ROOT = Path(__file__).resolve().parents[2]
MESSAGES = "/v1/messages"
CHAT = "/v1/chat/completions"
AZURE = "/openai/deployments/prod-4o/chat/completions?api-version=2024-10-21"
ANTHROPIC_HEADERS = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
BEARER = {"Authorization": f"Bearer {KEY}"}
AZURE_HEADERS = {"api-key": KEY}
WEATHER_TOOL_OPENAI = [{"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
WEATHER_TOOL_ANTHROPIC = [{"name": "get_weather", "input_schema": {"type": "object"}}]

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def make_client() -> AsyncIterator[Callable[..., Any]]:
    clients: list[Client] = []

    async def factory(*names: str, **config: Any) -> Client:
        config.setdefault("keys", frozenset({KEY}))
        shapes = shapes_named(names) if names else SHAPES
        client: Client = TestClient(TestServer(make_app(EmulatorConfig(**config), shapes)))
        await client.start_server()
        clients.append(client)
        return client

    yield factory
    for client in clients:
        await client.close()


@pytest.fixture
async def client(make_client: Callable[..., Any]) -> Client:
    result: Client = await make_client()
    return result


@pytest.fixture
async def mistral(make_client: Callable[..., Any]) -> Client:
    result: Client = await make_client("mistral")
    return result


def sse(text: str) -> list[tuple[str | None, str]]:
    """(event, data) pairs; asserts the strict framing the shapes write."""
    assert text.endswith("\n\n")
    out = []
    for block in text[:-2].split("\n\n"):
        lines = block.split("\n")
        event = lines[0][len("event: "):] if lines[0].startswith("event: ") else None
        data = lines[-1]
        assert data.startswith("data: ")
        out.append((event, data[len("data: "):]))
    return out


def anthropic_body(**extra: Any) -> dict[str, Any]:
    return {"model": "claude-x", "max_tokens": 100,
            "messages": [{"role": "user", "content": "hi"}], **extra}


def anthropic_error(message: str, type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


# --------------------------------------------------------------------------- registration


def test_default_shapes_and_selection() -> None:
    assert [s.name for s in SHAPES] == ["openai", "anthropic", "azure"]
    assert [s.name for s in shapes_named(["mistral", "anthropic"])] == ["mistral", "anthropic"]
    with pytest.raises(ValueError, match="both serve POST /v1/chat/completions"):
        shapes_named(["openai", "mistral"])
    with pytest.raises(ValueError, match="unknown shape 'bedrock'"):
        shapes_named(["bedrock"])
    with pytest.raises(ValueError, match="listed twice"):
        shapes_named(["azure", "azure"])
    with pytest.raises(ValueError, match="at least one"):
        shapes_named([])


@pytest.mark.parametrize("value", ["openai,mistral", "nope", ","])
def test_cli_rejects_bad_shape_sets(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--key", "k", "--shape", value]) == 2
    assert capsys.readouterr().err.startswith("emulator: ")


def test_cli_serves_the_chosen_shapes() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "extproc.emulator", "--port", "0", "--shape", "mistral,anthropic"],
        cwd=REPO_ROOT, env={"EMULATOR_KEYS": KEY, "PATH": "/usr/bin:/bin"},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line.startswith("emulator listening on http://127.0.0.1:")
        base = line.split()[-1]
        request = urllib.request.Request(  # noqa: S310 - base is the emulator's http URL
            base + CHAT, method="POST", headers=BEARER | {"Content-Type": "application/json"},
            data=json.dumps({"model": "mistral-small", "messages": [
                {"role": "user", "content": "hi"}], "stream_options": {}}).encode())
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)  # noqa: S310
        assert caught.value.code == 422  # Mistral refuses stream_options: it is the Mistral shape
        proc.terminate()
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- anthropic


async def test_anthropic_non_streaming_exact_body(client: Client) -> None:
    resp = await client.post(MESSAGES, json=anthropic_body(system="Be nice."),
                             headers=ANTHROPIC_HEADERS)
    assert resp.status == 200
    assert await resp.json() == {
        "id": "msg_emu_1", "type": "message", "role": "assistant", "model": "claude-x",
        "content": [{"type": "text", "text": "Hello from the emulator."}],
        "stop_reason": "end_turn", "stop_sequence": None,
        # "Be nice." + "hi" = 10 chars -> 3 tokens
        "usage": {"input_tokens": 3, "output_tokens": 4, "cache_creation_input_tokens": 0,
                  "cache_read_input_tokens": 0},
    }


@pytest.mark.parametrize(
    ("extra", "text", "stop_reason", "stop_sequence"),
    [
        ({"max_tokens": 2}, "Hello from", "max_tokens", None),
        ({"stop_sequences": ["the"]}, "Hello from", "stop_sequence", "the"),
        ({"stop_sequences": ["nothing"]}, "Hello from the emulator.", "end_turn", None),
    ],
)
async def test_anthropic_stop_reasons(client: Client, extra: dict[str, Any], text: str,
                                      stop_reason: str, stop_sequence: str | None) -> None:
    body = await (await client.post(MESSAGES, json=anthropic_body(**extra),
                                    headers=ANTHROPIC_HEADERS)).json()
    assert body["content"] == [{"type": "text", "text": text}]
    assert (body["stop_reason"], body["stop_sequence"]) == (stop_reason, stop_sequence)
    assert body["usage"]["output_tokens"] == len(text.split())


async def test_anthropic_stream_sequence(client: Client) -> None:
    resp = await client.post(MESSAGES, json=anthropic_body(stream=True, max_tokens=3),
                             headers=ANTHROPIC_HEADERS)
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    events = sse(await resp.text())
    assert [e for e, _ in events] == [
        "message_start", "content_block_start", "ping", "content_block_delta",
        "content_block_delta", "content_block_delta", "content_block_stop", "message_delta",
        "message_stop"]
    payloads = [json.loads(d) for _, d in events]
    assert all(p["type"] == e for (e, _), p in zip(events, payloads, strict=True))
    assert payloads[0]["message"]["usage"]["input_tokens"] == 1
    assert payloads[0]["message"]["usage"]["output_tokens"] == 1
    assert [p["delta"]["text"] for p in payloads[3:6]] == ["Hello", " from", " the"]
    assert payloads[7] == {"type": "message_delta",
                           "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                           "usage": {"output_tokens": 3}}


async def test_anthropic_weather_tool_call_and_result(client: Client) -> None:
    ask = anthropic_body(tools=WEATHER_TOOL_ANTHROPIC, messages=[
        {"role": "user", "content": [{"type": "text", "text": "What's the Weather in Paris?"}]}])
    body = await (await client.post(MESSAGES, json=ask, headers=ANTHROPIC_HEADERS)).json()
    assert body["content"] == [{"type": "tool_use", "id": "toolu_emu_1", "name": "get_weather",
                                "input": {"city": "Paris"}}]
    assert body["stop_reason"] == "tool_use"
    assert body["usage"]["output_tokens"] == 4
    follow_up = anthropic_body(tools=WEATHER_TOOL_ANTHROPIC, messages=[
        *ask["messages"], {"role": "assistant", "content": body["content"]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_emu_1", "content": "Sunny"}]}])
    answer = await (await client.post(MESSAGES, json=follow_up, headers=ANTHROPIC_HEADERS)).json()
    assert answer["stop_reason"] == "end_turn"
    none = anthropic_body(tools=WEATHER_TOOL_ANTHROPIC, tool_choice={"type": "none"},
                          messages=ask["messages"])
    text = await (await client.post(MESSAGES, json=none, headers=ANTHROPIC_HEADERS)).json()
    assert text["stop_reason"] == "end_turn"


async def test_anthropic_weather_tool_stream(client: Client) -> None:
    ask = anthropic_body(stream=True, tools=WEATHER_TOOL_ANTHROPIC,
                         messages=[{"role": "user", "content": "weather?"}])
    resp = await client.post(MESSAGES, json=ask, headers=ANTHROPIC_HEADERS)
    payloads = [json.loads(d) for _, d in sse(await resp.text())]
    assert payloads[1]["content_block"] == {"type": "tool_use", "id": "toolu_emu_1",
                                            "name": "get_weather", "input": {}}
    fragments = [p["delta"]["partial_json"] for p in payloads
                 if p["type"] == "content_block_delta"]
    assert json.loads("".join(fragments)) == {"city": "Paris"}
    assert payloads[-2]["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (anthropic_body(temperature_x=1), "temperature_x: Extra inputs are not permitted"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]},
         "max_tokens: Field required"),
        (anthropic_body(max_tokens=0), "max_tokens: Input should be greater than or equal to 1"),
        ({"max_tokens": 5, "messages": [{"role": "user", "content": "x"}]},
         "model: Field required"),
        (anthropic_body(messages=[]), "messages: at least one message is required"),
        (anthropic_body(messages=[{"role": "system", "content": "x"}]),
         "messages.0.role: Input should be 'user' or 'assistant'"),
        (anthropic_body(messages=[{"role": "user", "content": [{"type": "text", "text": ""}]}]),
         "messages: text content blocks must be non-empty"),
        (anthropic_body(temperature=1.5), "temperature: Input should be less than or equal to 1"),
        (anthropic_body(system=5), "system: Input should be a valid string"),
        (anthropic_body(tools=[{"name": "f"}]), "tools.0.input_schema: Field required"),
        (anthropic_body(messages=[
            {"role": "user", "content": "x"},
            {"role": "assistant", "content": [
                {"type": "tool_use", "id": "t1", "name": "f", "input": {}}]},
            {"role": "user", "content": "no result"}]),
         "messages.2: `tool_use` ids were found without `tool_result` blocks immediately after: "
         "t1. Each `tool_use` block must have a corresponding `tool_result` block in the next "
         "message."),
        (anthropic_body(messages=[{"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "zz", "content": "x"}]}]),
         "messages.0: unexpected `tool_use_id` found in `tool_result` blocks: zz. Each "
         "`tool_result` block must have a corresponding `tool_use` block in the previous "
         "message."),
    ],
)
async def test_anthropic_validation(client: Client, body: dict[str, Any], message: str) -> None:
    resp = await client.post(MESSAGES, json=body, headers=ANTHROPIC_HEADERS)
    assert resp.status == 400
    assert await resp.json() == anthropic_error(message)


async def test_anthropic_auth_and_version_header(client: Client) -> None:
    for headers in ({"anthropic-version": "2023-06-01"},
                    {"x-api-key": CANARY, "anthropic-version": "2023-06-01"},
                    {"Authorization": f"Bearer {KEY}", "anthropic-version": "2023-06-01"}):
        resp = await client.post(MESSAGES, json=anthropic_body(), headers=headers)
        assert resp.status == 401
        assert await resp.json() == anthropic_error("invalid x-api-key", "authentication_error")
    resp = await client.post(MESSAGES, json=anthropic_body(), headers={"x-api-key": KEY})
    assert resp.status == 400
    assert await resp.json() == anthropic_error("anthropic-version: header is required")
    records = (await (await client.get("/_emulator/requests")).json())["requests"]
    assert CANARY not in json.dumps(records)
    assert records[1]["headers"]["x-api-key"] == key_fingerprint(CANARY)


@pytest.mark.parametrize(
    ("status", "type_"),
    [(429, "rate_limit_error"), (529, "overloaded_error"), (500, "api_error"),
     (413, "request_too_large"), (403, "permission_error")],
)
async def test_anthropic_fault_errors(client: Client, status: int, type_: str) -> None:
    resp = await client.post(MESSAGES, json=anthropic_body(),
                             headers=ANTHROPIC_HEADERS | {"x-emulator-status": str(status)})
    assert resp.status == status
    body = await resp.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == type_


# --------------------------------------------------------------------------- openai weather


async def test_openai_weather_tool_call(client: Client) -> None:
    ask = {"model": "gpt", "tools": WEATHER_TOOL_OPENAI,
           "messages": [{"role": "user", "content": "Weather in Paris?"}]}
    body = await (await client.post(CHAT, json=ask, headers=BEARER)).json()
    assert body["choices"][0] == {"index": 0, "finish_reason": "tool_calls", "message": {
        "role": "assistant", "content": None, "tool_calls": [{
            "id": "call_emu_1", "type": "function",
            "function": {"name": "get_weather", "arguments": "{\"city\":\"Paris\"}"}}]}}
    assert body["usage"]["completion_tokens"] == 4
    follow = {**ask, "messages": [*ask["messages"], body["choices"][0]["message"],
                                  {"role": "tool", "tool_call_id": "call_emu_1",
                                   "content": "Sunny"}]}
    answer = await (await client.post(CHAT, json=follow, headers=BEARER)).json()
    assert answer["choices"][0]["message"]["content"] == "Hello from the emulator."


async def test_openai_weather_tool_stream(client: Client) -> None:
    ask = {"model": "gpt", "tools": WEATHER_TOOL_OPENAI, "stream": True,
           "messages": [{"role": "user", "content": "weather"}]}
    resp = await client.post(CHAT, json=ask, headers=BEARER)
    data = [d for _, d in sse(await resp.text())]
    chunks = [json.loads(d) for d in data[:-1]]
    calls = [c["choices"][0]["delta"]["tool_calls"][0] for c in chunks
             if "tool_calls" in c["choices"][0]["delta"]]
    assert calls[0] == {"index": 0, "id": "call_emu_1", "type": "function",
                        "function": {"name": "get_weather", "arguments": ""}}
    assert "".join(c["function"]["arguments"] for c in calls) == "{\"city\":\"Paris\"}"
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# --------------------------------------------------------------------------- mistral


async def test_mistral_non_streaming(mistral: Client) -> None:
    body = {"model": "mistral-small", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 2, "random_seed": 1, "safe_prompt": False, "tool_choice": "any",
            "tools": WEATHER_TOOL_OPENAI}
    resp = await mistral.post(CHAT, json=body, headers=BEARER)
    assert resp.status == 200, await resp.text()
    reply = await resp.json()
    assert reply["id"] == "cmpl-emu-1"
    assert reply["choices"][0]["message"]["content"] == "Hello from"
    assert reply["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


@pytest.mark.parametrize(
    "field",
    ["stream_options", "max_completion_tokens", "user", "seed", "logit_bias",
     "parallel_tool_calls", "store", "metadata", "service_tier"],
)
async def test_mistral_rejects_openai_only_fields(mistral: Client, field: str) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], field: None}
    resp = await mistral.post(CHAT, json=body, headers=BEARER)
    assert resp.status == 422
    assert await resp.json() == {
        "object": "error",
        "message": {"detail": [{"type": "extra_forbidden", "loc": ["body", field],
                                "msg": "Extra inputs are not permitted"}]},
        "type": "invalid_request_error", "param": None, "code": None}


async def test_mistral_stream_has_usage_in_last_chunk(mistral: Client) -> None:
    body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    resp = await mistral.post(CHAT, json=body, headers=BEARER)
    data = [d for _, d in sse(await resp.text())]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[-1]["choices"] == [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    assert chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 4,
                                   "total_tokens": 5}
    assert not any("usage" in c for c in chunks[:-1])


async def test_mistral_auth_and_404(mistral: Client) -> None:
    resp = await mistral.post(CHAT, json={}, headers={"Authorization": f"Bearer {CANARY}"})
    assert resp.status == 401
    assert CANARY not in await resp.text()
    resp = await mistral.post("/v1/nope", json={}, headers=BEARER)
    assert (resp.status, await resp.json()) == (404, {"detail": "Not Found"})


# --------------------------------------------------------------------------- azure


async def test_azure_non_streaming_uses_deployment(client: Client) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3}
    resp = await client.post(AZURE, json=body, headers=AZURE_HEADERS)
    assert resp.status == 200, await resp.text()
    reply = await resp.json()
    assert reply["model"] == "prod-4o"
    assert reply["choices"][0]["message"]["content"] == "Hello from the"
    resp = await client.post(AZURE, json={**body, "model": "ignored"}, headers=AZURE_HEADERS)
    assert (await resp.json())["model"] == "prod-4o"


async def test_azure_stream_starts_with_filter_chunk(client: Client) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "stream": True,
            "stream_options": {"include_usage": True}}
    resp = await client.post(AZURE, json=body, headers=AZURE_HEADERS)
    data = [d for _, d in sse(await resp.text())]
    first = json.loads(data[0])
    assert first["choices"] == []
    assert first["id"] == ""
    assert "prompt_filter_results" in first
    assert json.loads(data[-2])["usage"]["completion_tokens"] == 4
    assert json.loads(data[-2])["choices"] == []


@pytest.mark.parametrize("query", ["", "?api-version=latest", "?api_version=2024-10-21"])
async def test_azure_requires_api_version(client: Client, query: str) -> None:
    path = AZURE.partition("?")[0] + query
    resp = await client.post(path, json={"messages": [{"role": "user", "content": "x"}]},
                             headers=AZURE_HEADERS)
    assert resp.status == 404
    assert await resp.json() == {"error": {"code": "404", "message": "Resource not found"}}


async def test_azure_auth_uses_api_key_header(client: Client) -> None:
    body = {"messages": [{"role": "user", "content": "x"}]}
    for headers in ({"api-key": CANARY}, BEARER, {}):
        resp = await client.post(AZURE, json=body, headers=headers)
        assert resp.status == 401
        text = await resp.text()
        assert CANARY not in text
        assert json.loads(text)["error"]["code"] == "401"
    records = (await (await client.get("/_emulator/requests")).json())["requests"]
    assert records[0]["headers"]["api-key"] == key_fingerprint(CANARY)
    assert records[0]["query"] == "api-version=2024-10-21"


async def test_azure_rejects_unknown_fields_and_429_fault(client: Client) -> None:
    body = {"messages": [{"role": "user", "content": "x"}], "frobnicate": 1}
    resp = await client.post(AZURE, json=body, headers=AZURE_HEADERS)
    assert resp.status == 400
    assert (await resp.json())["error"]["message"] == \
        "Unrecognized request argument supplied: frobnicate"
    resp = await client.post(AZURE, json=body,
                             headers=AZURE_HEADERS | {"x-emulator-status": "429"})
    assert resp.status == 429
    assert resp.headers["retry-after"] == "1"
    assert (await resp.json())["error"]["code"] == "rate_limit_exceeded"


async def test_default_shapes_coexist(client: Client) -> None:
    start = time.monotonic()
    chat = await client.post(CHAT, json={"model": "g", "messages": [
        {"role": "user", "content": "hi"}]}, headers=BEARER)
    messages = await client.post(MESSAGES, json=anthropic_body(), headers=ANTHROPIC_HEADERS)
    azure = await client.post(AZURE, json={"messages": [{"role": "user", "content": "hi"}]},
                              headers=AZURE_HEADERS)
    assert (chat.status, messages.status, azure.status) == (200, 200, 200)
    assert time.monotonic() - start < 5
