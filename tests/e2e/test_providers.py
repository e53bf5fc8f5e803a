"""Provider diversity through real Envoy: {openai, anthropic} SDK x five backends x
{plain, streaming}, tool calls across dialects, and errors in the client's dialect."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import anthropic
import httpx
import openai
import pytest

from extproc.auth import hash_key
from extproc.devstack import Stack
from extproc.secrets import Secret
from tests.e2e.config_stack import start_from_config

PEPPER = "providers-pepper-" + secrets.token_hex(6)
TENANT_KEY = "sk-canary-tenant-providers-" + secrets.token_hex(8)
PROVIDER_KEYS = {kind: f"sk-canary-{kind}-" + secrets.token_hex(8)
                 for kind in ("openai", "anthropic", "azure", "mistral", "compat")}
BACKENDS = ("openai", "anthropic", "azure", "mistral", "compat")
REPLY = "Hello from the emulator."
PROMPT = "Hello there"  # 11 characters: every emulator shape counts 3 prompt tokens
WEATHER_TOOL = {"name": "get_weather", "description": "Weather for a city",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                               "required": ["city"]}}


@dataclass
class Matrix:
    base_url: str
    emulators: dict[str, int]

    def recorded(self, emulator: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{self.emulators[emulator]}/_emulator/requests"
        requests: list[dict[str, Any]] = httpx.get(url, timeout=5).json()["requests"]
        return requests

    def clear(self) -> None:
        for port in self.emulators.values():
            httpx.delete(f"http://127.0.0.1:{port}/_emulator/requests", timeout=5)

    def queue_fault(self, emulator: str, **fault: Any) -> None:
        url = f"http://127.0.0.1:{self.emulators[emulator]}/_emulator/faults"
        assert httpx.post(url, json=fault, timeout=5).status_code == 200


def _config(main_port: int, mistral_port: int) -> dict[str, Any]:
    main, mistral = f"http://127.0.0.1:{main_port}", f"http://127.0.0.1:{mistral_port}"
    kinds = {"openai": ("openai", main), "anthropic": ("anthropic", main),
             "azure": ("azure", main), "mistral": ("mistral", mistral),
             "compat": ("openai_compatible", main)}
    providers = {}
    for name, (kind, url) in kinds.items():
        providers[f"p-{name}"] = {"kind": kind, "base_url": url, "region": "eu-west-1",
                                  "zone": "eu", "cluster": f"c_{name}",
                                  "credentials": [f"k-{name}"]}
    providers["p-azure"]["api_version"] = "2024-10-21"
    return {
        "version": 1,
        "auth": {"pepper": {"file": "pepper.txt"}},
        "credentials": {f"k-{name}": {"env": f"PROVIDERS_KEY_{name.upper()}"}
                        for name in kinds},
        "providers": providers,
        "models": {f"m-{name}": {"price": {"input_per_mtok": 1, "output_per_mtok": 2},
                                 "deployments": [{"provider": f"p-{name}",
                                                  "model": f"upstream-{name}"}]}
                   for name in kinds},
        "tenants": {"t1": {"zone": "eu",
                           "keys": [{"id": "k1", "hash": hash_key(Secret(PEPPER), TENANT_KEY)}],
                           "models": [f"m-{name}" for name in kinds]}},
    }


@pytest.fixture(scope="module")
def matrix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Matrix]:
    workdir = tmp_path_factory.mktemp("providers")
    keys = list(PROVIDER_KEYS.values())
    with Stack(workdir) as stack:
        _, main_port = stack.start_emulator(keys)
        _, mistral_port = stack.start_emulator(keys, extra_args=("--shape", "mistral"))
        listen_port = start_from_config(stack, _config(main_port, mistral_port), pepper=PEPPER,
                                        key_env_prefix="PROVIDERS_KEY",
                                        provider_keys=PROVIDER_KEYS)
        yield Matrix(f"http://127.0.0.1:{listen_port}",
                     {"main": main_port, "mistral": mistral_port})


def _emulator_of(backend: str) -> str:
    return "mistral" if backend == "mistral" else "main"


def _assert_provider_saw_its_own_request(matrix: Matrix, backend: str) -> dict[str, Any]:
    [seen] = matrix.recorded(_emulator_of(backend))
    headers = seen["headers"]
    expected_path = {
        "anthropic": "/v1/messages",
        "azure": "/openai/deployments/upstream-azure/chat/completions",
    }.get(backend, "/v1/chat/completions")
    assert seen["path"] == expected_path
    # Each provider gets its own auth header and only its own key (redacted by the emulator).
    from extproc.emulator.app import key_fingerprint

    auth = {"anthropic": "x-api-key", "azure": "api-key"}.get(backend, "authorization")
    prefix = "Bearer " if auth == "authorization" else ""
    assert headers[auth] == prefix + key_fingerprint(PROVIDER_KEYS[backend])
    others = {"authorization", "x-api-key", "api-key"} - {auth}
    assert not others & set(headers)
    body: dict[str, Any] = json.loads(seen["body"])
    if backend != "azure":
        assert body["model"] == f"upstream-{backend}"
    return body


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_openai_sdk_against_every_backend(matrix: Matrix, backend: str, stream: bool) -> None:
    matrix.clear()
    client = openai.OpenAI(base_url=f"{matrix.base_url}/v1", api_key=TENANT_KEY, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    if not stream:
        completion = client.chat.completions.create(model=f"m-{backend}", messages=messages)
        assert completion.choices[0].message.content == REPLY
        assert completion.choices[0].finish_reason == "stop"
        assert completion.usage is not None
        assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (3, 4)
    else:
        pieces, usage = [], None
        for chunk in client.chat.completions.create(
            model=f"m-{backend}", messages=messages, stream=True,
            stream_options={"include_usage": True},
        ):
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            if chunk.usage is not None:
                usage = chunk.usage
        assert "".join(pieces) == REPLY
        assert usage is not None
        assert (usage.prompt_tokens, usage.completion_tokens) == (3, 4)
    _assert_provider_saw_its_own_request(matrix, backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_anthropic_sdk_against_every_backend(
    matrix: Matrix, backend: str, stream: bool,
) -> None:
    matrix.clear()
    client = anthropic.Anthropic(base_url=matrix.base_url, api_key=TENANT_KEY, max_retries=0)
    messages: list[Any] = [{"role": "user", "content": PROMPT}]
    if not stream:
        message = client.messages.create(model=f"m-{backend}", max_tokens=64,
                                         messages=messages)
        assert [block.type for block in message.content] == ["text"]
        assert message.content[0].text == REPLY  # type: ignore[union-attr]
        assert message.stop_reason == "end_turn"
        assert (message.usage.input_tokens, message.usage.output_tokens) == (3, 4)
    else:
        with client.messages.stream(model=f"m-{backend}", max_tokens=64,
                                    messages=messages) as events:
            text = "".join(events.text_stream)
            final = events.get_final_message()
        assert text == REPLY
        assert final.stop_reason == "end_turn"
        assert final.usage.output_tokens == 4
    body = _assert_provider_saw_its_own_request(matrix, backend)
    if backend == "anthropic" or backend == "mistral":
        assert body["max_tokens"] == 64
    else:
        assert body.get("max_tokens", body.get("max_completion_tokens")) == 64


def test_openai_tool_call_through_an_anthropic_backend(matrix: Matrix) -> None:
    client = openai.OpenAI(base_url=f"{matrix.base_url}/v1", api_key=TENANT_KEY, max_retries=0)
    first = client.chat.completions.create(
        model="m-anthropic",
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[{"type": "function", "function": WEATHER_TOOL}],
    )
    call = first.choices[0].message.tool_calls
    assert first.choices[0].finish_reason == "tool_calls"
    assert call is not None
    assert call[0].function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call[0].function.arguments) == {"city": "Paris"}  # type: ignore[union-attr]

    second = client.chat.completions.create(
        model="m-anthropic",
        messages=[
            {"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call[0].model_dump()]},
            {"role": "tool", "tool_call_id": call[0].id, "content": "Sunny, 21 C"},
        ],
        tools=[{"type": "function", "function": WEATHER_TOOL}],
    )
    assert second.choices[0].message.content == REPLY


def test_anthropic_tool_call_through_an_openai_backend(matrix: Matrix) -> None:
    client = anthropic.Anthropic(base_url=matrix.base_url, api_key=TENANT_KEY, max_retries=0)
    tool = {"name": "get_weather", "description": "Weather for a city",
            "input_schema": WEATHER_TOOL["parameters"]}
    message = client.messages.create(
        model="m-openai", max_tokens=64, tools=[tool],  # type: ignore[list-item]
        messages=[{"role": "user", "content": "What is the weather in Paris?"}])
    assert message.stop_reason == "tool_use"
    [block] = message.content
    assert block.type == "tool_use"
    assert (block.name, block.input) == ("get_weather", {"city": "Paris"})  # type: ignore[union-attr]


def test_unsupported_parameter_is_400_in_the_client_dialect(matrix: Matrix) -> None:
    matrix.clear()
    response = httpx.post(f"{matrix.base_url}/v1/chat/completions", timeout=10, json={
        "model": "m-anthropic", "messages": [{"role": "user", "content": PROMPT}],
        "logit_bias": {"42": 1}}, headers={"authorization": f"Bearer {TENANT_KEY}"})
    assert response.status_code == 400
    assert response.json() == {"error": {
        "message": "The parameter 'logit_bias' is not supported by Anthropic.",
        "type": "invalid_request_error", "param": "logit_bias", "code": "invalid_request"}}
    assert matrix.recorded("main") == []


def test_anthropic_door_errors_are_anthropic_shaped(matrix: Matrix) -> None:
    client = anthropic.Anthropic(base_url=matrix.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as caught:
        client.messages.create(model="m-openai", max_tokens=8,
                               messages=[{"role": "user", "content": PROMPT}])
    assert caught.value.status_code == 401
    assert caught.value.body == {"type": "error", "error": {
        "type": "authentication_error", "message": "Invalid API key."}}


@pytest.mark.parametrize("backend", ["openai", "anthropic"])
def test_provider_rate_limit_reaches_an_anthropic_client_as_429(
    matrix: Matrix, backend: str,
) -> None:
    client = anthropic.Anthropic(base_url=matrix.base_url, api_key=TENANT_KEY, max_retries=0)
    matrix.queue_fault("main", status=429, retry_after=3)
    with pytest.raises(anthropic.RateLimitError) as caught:
        client.messages.create(model=f"m-{backend}", max_tokens=8,
                               messages=[{"role": "user", "content": PROMPT}])
    assert caught.value.status_code == 429
    assert caught.value.response.headers["retry-after"] == "3"
    assert caught.value.body["type"] == "error"  # type: ignore[index]
    assert caught.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]


def test_anthropic_in_stream_error_is_scrubbed(matrix: Matrix) -> None:
    matrix.queue_fault("main", stream_error="Overloaded for org proj_AbCd1234xyz: Used 9990")
    body = {"model": "m-anthropic", "max_tokens": 8, "stream": True,
            "messages": [{"role": "user", "content": PROMPT}]}
    with httpx.stream("POST", f"{matrix.base_url}/v1/messages", json=body, timeout=15,
                      headers={"x-api-key": TENANT_KEY}) as response:
        assert response.status_code == 200
        text = response.read().decode()

    blocks = [block.splitlines() for block in text.strip().split("\n\n")]
    assert [lines[0] for lines in blocks] == ["event: message_start", "event: error"]
    assert json.loads(blocks[1][1].removeprefix("data: ")) == {"type": "error", "error": {
        "message": "Overloaded for org [redacted]: Used [redacted]", "type": "overloaded_error"}}
    assert "proj_AbCd1234xyz" not in text
