"""The official SDKs through every translator against the emulator, in process.

A tiny gateway stand-in sits in an `httpx`/`httpx2` `MockTransport`: it picks the translator with
`front_door_for` + `translator_for`, sends the translated request to the emulator shape
of the backend (which validates it the way the provider does), and translates the answer
back - streams fed in 7-byte pieces. No Envoy, no sockets besides the emulator's loopback
test server: this pins the translators' wire formats against both SDKs and all shapes.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from extproc.emulator import EmulatorConfig, make_app
from extproc.emulator.app import SHAPES, shapes_named
from extproc.errors import GatewayError, error_body
from extproc.translate.base import (
    Backend,
    Usage,
    front_door_for,
    retry_after_headers,
    translator_for,
)

KEY = "sk-provider-key"
Client = TestClient[web.Request, web.Application]
REPLY = "Hello from the emulator."
WEATHER = {"city": "Paris"}


@dataclass
class Gateway:
    default: Client
    mistral: Client
    usages: list[Usage | None] = field(default_factory=list)
    sent: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def handler(self, backend: Backend, http: Any) -> Any:
        """The transport handler; `http` is the SDK's HTTP library (httpx or httpx2)."""

        async def handle(request: Any) -> Any:
            front = front_door_for(request.url.path)
            assert front is not None
            translator = translator_for(front, backend)
            try:
                upstream = translator.request(json.loads(request.content),
                                              upstream_model="up-model",
                                              api_version="2024-10-21")
            except GatewayError as exc:
                return http.Response(exc.status, content=error_body(exc, front),
                                      headers={"content-type": "application/json"})
            self.sent.append((upstream.path, json.loads(upstream.body)))
            headers = {"content-type": "application/json", **dict(upstream.headers)}
            headers.update({k: v for k, v in request.headers.items()
                            if k.startswith("x-emulator-")})
            if backend is Backend.ANTHROPIC:
                headers["x-api-key"] = KEY
            elif backend is Backend.AZURE:
                headers["api-key"] = KEY
            elif backend is Backend.GEMINI:
                headers["x-goog-api-key"] = KEY
            else:
                headers["authorization"] = f"Bearer {KEY}"
            emulator = self.mistral if backend is Backend.MISTRAL else self.default
            resp = await emulator.post(upstream.path, data=upstream.body, headers=headers)
            raw = await resp.read()
            if resp.status >= 400:
                status, body = translator.error(resp.status, raw, resp.headers)
                return http.Response(status, content=body, headers=[
                    ("content-type", "application/json"), *retry_after_headers(resp.headers)])
            if resp.content_type == "text/event-stream":
                stream = translator.stream()
                out = b"".join(stream.feed(raw[i:i + 7]) for i in range(0, len(raw), 7))
                out += stream.flush()
                self.usages.append(stream.usage)
                return http.Response(200, content=out,
                                      headers={"content-type": "text/event-stream"})
            result = translator.response(resp.status, raw)
            self.usages.append(result.usage)
            return http.Response(200, content=result.body,
                                  headers={"content-type": "application/json"})
        return handle

    def openai(self, backend: Backend) -> openai.AsyncOpenAI:
        transport = httpx.MockTransport(self.handler(backend, httpx))
        return openai.AsyncOpenAI(api_key="gw-key", base_url="http://gateway/v1", max_retries=0,
                                  http_client=httpx.AsyncClient(transport=transport))

    def anthropic(self, backend: Backend) -> anthropic.AsyncAnthropic:
        transport = httpx2.MockTransport(self.handler(backend, httpx2))
        return anthropic.AsyncAnthropic(api_key="gw-key", base_url="http://gateway",
                                        max_retries=0,
                                        http_client=httpx2.AsyncClient(transport=transport))


@pytest.fixture
async def gateway() -> AsyncIterator[Gateway]:
    config = EmulatorConfig(keys=frozenset({KEY}))
    # Gemini's paths are its own: it shares the default process.
    default: Client = TestClient(TestServer(make_app(
        config, (*SHAPES, *shapes_named(["gemini"])))))
    mistral: Client = TestClient(TestServer(make_app(config, shapes_named(["mistral"]))))
    await default.start_server()
    await mistral.start_server()
    yield Gateway(default, mistral)
    await default.close()
    await mistral.close()


BACKENDS = list(Backend)
OPENAI_TOOLS: list[Any] = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
ANTHROPIC_TOOLS: list[Any] = [{"name": "get_weather", "description": "Weather",
                               "input_schema": {"type": "object",
                                                "properties": {"city": {"type": "string"}}}}]


# --------------------------------------------------------------------------- OpenAI SDK


@pytest.mark.parametrize("backend", BACKENDS)
async def test_openai_sdk_plain(gateway: Gateway, backend: Backend) -> None:
    client = gateway.openai(backend)
    completion = await client.chat.completions.create(
        model="m", messages=[{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "hi"}], max_tokens=3)
    assert completion.choices[0].message.content == "Hello from the"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    # "Be brief." + "hi" = 11 chars -> 3 tokens, whatever the backend's shape
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 3)
    assert gateway.usages == [Usage(3, 3, 0)]


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_openai_sdk_stream(gateway: Gateway, backend: Backend, include_usage: bool) -> None:
    client = gateway.openai(backend)
    options: Any = {"include_usage": True} if include_usage else openai.NOT_GIVEN
    stream = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options=options)
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert (text, finish) == (REPLY, "stop")
    if include_usage:
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (1, 4)
    elif backend is not Backend.MISTRAL:  # Mistral always sends usage on its last chunk
        assert usage is None
    assert gateway.usages == [Usage(1, 4, 0)]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_openai_sdk_tool_round(gateway: Gateway, backend: Backend, stream: bool) -> None:
    client = gateway.openai(backend)
    messages: list[Any] = [{"role": "user", "content": "What is the weather in Paris?"}]
    if stream:
        async with client.chat.completions.stream(
                model="m", messages=messages, tools=OPENAI_TOOLS) as events:
            completion = await events.get_final_completion()
    else:
        completion = await client.chat.completions.create(
            model="m", messages=messages, tools=OPENAI_TOOLS)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == WEATHER
    messages += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": call.function.name, "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny"},
    ]
    answer = await client.chat.completions.create(model="m", messages=messages,
                                                  tools=OPENAI_TOOLS)
    assert answer.choices[0].message.content == REPLY


async def test_openai_sdk_image_to_anthropic(gateway: Gateway) -> None:
    client = gateway.openai(Backend.ANTHROPIC)
    completion = await client.chat.completions.create(model="m", messages=[{
        "role": "user", "content": [
            {"type": "text", "text": "What is this?"},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}])
    assert completion.choices[0].message.content == REPLY
    assert gateway.sent[0][1]["messages"][0]["content"][1]["source"]["type"] == "base64"


async def test_openai_sdk_unsupported_parameter(gateway: Gateway) -> None:
    client = gateway.openai(Backend.ANTHROPIC)
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], logit_bias={"1": 1})
    assert caught.value.status_code == 400
    assert caught.value.body == {
        "message": "The parameter 'logit_bias' is not supported by Anthropic.",
        "type": "invalid_request_error", "param": "logit_bias", "code": "invalid_request"}
    assert gateway.sent == []


@pytest.mark.parametrize("backend", BACKENDS)
async def test_openai_sdk_provider_429(gateway: Gateway, backend: Backend) -> None:
    client = gateway.openai(backend)
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}],
            extra_headers={"x-emulator-status": "429", "x-emulator-retry-after": "3"})
    assert caught.value.response.headers["retry-after"] == "3"


# --------------------------------------------------------------------------- Anthropic SDK


@pytest.mark.parametrize("backend", BACKENDS)
async def test_anthropic_sdk_plain(gateway: Gateway, backend: Backend) -> None:
    client = gateway.anthropic(backend)
    message = await client.messages.create(
        model="m", max_tokens=2, system="Be brief.",
        messages=[{"role": "user", "content": "hi"}])
    assert [block.type for block in message.content] == ["text"]
    assert message.content[0].text == "Hello from"  # type: ignore[union-attr]
    assert message.stop_reason == "max_tokens"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 2)
    assert gateway.usages == [Usage(3, 2, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_anthropic_sdk_stream(gateway: Gateway, backend: Backend) -> None:
    client = gateway.anthropic(backend)
    async with client.messages.stream(
            model="m", max_tokens=100, messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        message = await stream.get_final_message()
    assert text == REPLY
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (1, 4)
    assert gateway.usages == [Usage(1, 4, 0)]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_anthropic_sdk_tool_round(gateway: Gateway, backend: Backend,
                                        stream: bool) -> None:
    client = gateway.anthropic(backend)
    messages: list[Any] = [{"role": "user", "content": "Weather in Paris?"}]
    if stream:
        async with client.messages.stream(model="m", max_tokens=50, messages=messages,
                                          tools=ANTHROPIC_TOOLS) as events:
            message = await events.get_final_message()
    else:
        message = await client.messages.create(model="m", max_tokens=50, messages=messages,
                                               tools=ANTHROPIC_TOOLS)
    assert message.stop_reason == "tool_use"
    uses = [block for block in message.content if block.type == "tool_use"]
    assert len(uses) == 1
    assert uses[0].name == "get_weather"
    assert uses[0].input == WEATHER
    messages += [
        {"role": "assistant", "content": [block.model_dump(exclude_none=True)
                                          for block in message.content]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id,
                                      "content": "Sunny"}]},
    ]
    answer = await client.messages.create(model="m", max_tokens=50, messages=messages,
                                          tools=ANTHROPIC_TOOLS)
    assert answer.content[0].text == REPLY  # type: ignore[union-attr]


async def test_anthropic_sdk_unsupported_parameter(gateway: Gateway) -> None:
    client = gateway.anthropic(Backend.MISTRAL)
    with pytest.raises(anthropic.BadRequestError) as caught:
        await client.messages.create(model="m", max_tokens=5, extra_body={"top_k": 3},
                                     messages=[{"role": "user", "content": "hi"}])
    assert caught.value.status_code == 400
    assert caught.value.body == {"type": "error", "error": {
        "type": "invalid_request_error",
        "message": "The parameter 'top_k' is not supported by Mistral."}}


@pytest.mark.parametrize("backend", BACKENDS)
async def test_anthropic_sdk_provider_errors(gateway: Gateway, backend: Backend) -> None:
    client = gateway.anthropic(backend)
    with pytest.raises(anthropic.RateLimitError):
        await client.messages.create(model="m", max_tokens=5,
                                     messages=[{"role": "user", "content": "hi"}],
                                     extra_headers={"x-emulator-status": "429"})
    with pytest.raises(anthropic.InternalServerError) as caught:
        await client.messages.create(model="m", max_tokens=5,
                                     messages=[{"role": "user", "content": "hi"}],
                                     extra_headers={"x-emulator-status": "500"})
    assert caught.value.status_code == 502
    assert caught.value.body == {"type": "error", "error": {
        "type": "api_error", "message": "The provider failed with status 500."}}
