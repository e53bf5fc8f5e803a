"""Translator selection, door validation, unsupported parameters and provider error mapping."""

from __future__ import annotations

import json
from typing import Any

import pytest

from extproc.errors import Dialect, GatewayError, error_body
from extproc.translate.anthropic_gemini import AnthropicToGemini
from extproc.translate.anthropic_openai import AnthropicToOpenAI
from extproc.translate.anthropic_passthrough import AnthropicPassthrough
from extproc.translate.base import (
    TRANSLATORS,
    Backend,
    front_door_for,
    map_provider_error,
    retry_after_headers,
    translator_for,
)
from extproc.translate.gemini import OpenAIToGemini
from extproc.translate.openai_anthropic import OpenAIToAnthropic
from extproc.translate.openai_passthrough import OpenAIPassthrough
from extproc.translate.provider_errors import scrub

OPENAI_BODY: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
ANTHROPIC_BODY: dict[str, Any] = {**OPENAI_BODY, "max_tokens": 16}


def openai_error(message: str, param: str | None, type_: str = "invalid_request_error",
                 code: str = "invalid_request") -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def anthropic_error(message: str, type_: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": type_, "message": message}}


def rejected(front: Dialect, backend: Backend, body: dict[str, Any]) -> tuple[int, Any]:
    with pytest.raises(GatewayError) as caught:
        translator_for(front, backend).request(body, upstream_model="up", api_version=None)
    return caught.value.status, json.loads(error_body(caught.value, front))


# --------------------------------------------------------------------------- selection


def test_backend_values_are_config_provider_kinds() -> None:
    assert [b.value for b in Backend] == [
        "openai", "openai_compatible", "mistral", "azure", "anthropic", "gemini"]


@pytest.mark.parametrize(
    ("front", "backend", "kind"),
    [
        (Dialect.OPENAI, Backend.OPENAI, OpenAIPassthrough),
        (Dialect.OPENAI, Backend.OPENAI_COMPATIBLE, OpenAIPassthrough),
        (Dialect.OPENAI, Backend.MISTRAL, OpenAIPassthrough),
        (Dialect.OPENAI, Backend.AZURE, OpenAIPassthrough),
        (Dialect.OPENAI, Backend.ANTHROPIC, OpenAIToAnthropic),
        (Dialect.ANTHROPIC, Backend.OPENAI, AnthropicToOpenAI),
        (Dialect.ANTHROPIC, Backend.OPENAI_COMPATIBLE, AnthropicToOpenAI),
        (Dialect.ANTHROPIC, Backend.MISTRAL, AnthropicToOpenAI),
        (Dialect.ANTHROPIC, Backend.AZURE, AnthropicToOpenAI),
        (Dialect.ANTHROPIC, Backend.ANTHROPIC, AnthropicPassthrough),
        (Dialect.OPENAI, Backend.GEMINI, OpenAIToGemini),
        (Dialect.ANTHROPIC, Backend.GEMINI, AnthropicToGemini),
    ],
)
def test_selection_table(front: Dialect, backend: Backend, kind: type) -> None:
    first = translator_for(front, backend)
    assert type(first) is kind
    assert translator_for(front, backend) is not first  # one translator per request
    if isinstance(first, OpenAIPassthrough | AnthropicToOpenAI):
        assert first.backend is backend


def test_table_covers_every_pair() -> None:
    assert set(TRANSLATORS) == {(d, b) for d in Dialect for b in Backend}


@pytest.mark.parametrize(
    ("path", "dialect"),
    [
        ("/v1/chat/completions", Dialect.OPENAI),
        ("/v1/chat/completions?x=1", Dialect.OPENAI),
        ("/v1/messages", Dialect.ANTHROPIC),
        ("/v1/messages?beta=true", Dialect.ANTHROPIC),
        ("/v1/completions", None),
        ("/v1/messages/count_tokens", None),
        ("", None),
    ],
)
def test_front_door_for(path: str, dialect: Dialect | None) -> None:
    assert front_door_for(path) is dialect


@pytest.mark.parametrize(
    ("backend", "path", "headers"),
    [
        (Backend.OPENAI, "/v1/chat/completions", ()),
        (Backend.OPENAI_COMPATIBLE, "/v1/chat/completions", ()),
        (Backend.MISTRAL, "/v1/chat/completions", ()),
        (Backend.AZURE, "/openai/deployments/up/chat/completions?api-version=2024-10-21", ()),
        (Backend.ANTHROPIC, "/v1/messages", (("anthropic-version", "2023-06-01"),)),
    ],
)
@pytest.mark.parametrize("front", list(Dialect))
def test_upstream_paths_and_headers(front: Dialect, backend: Backend, path: str,
                                    headers: tuple[tuple[str, str], ...]) -> None:
    body = OPENAI_BODY if front is Dialect.OPENAI else ANTHROPIC_BODY
    upstream = translator_for(front, backend).request(
        dict(body), upstream_model="up", api_version="2024-10-21")
    assert upstream.path == path
    assert upstream.headers == headers
    sent = json.loads(upstream.body)
    if backend is Backend.AZURE:
        assert "model" not in sent
    else:
        assert sent["model"] == "up"


def test_azure_path_quotes_deployment_and_defaults_api_version() -> None:
    upstream = translator_for(Dialect.OPENAI, Backend.AZURE).request(
        dict(OPENAI_BODY), upstream_model="my dep/x", api_version=None)
    assert upstream.path == (
        "/openai/deployments/my%20dep%2Fx/chat/completions?api-version=2024-10-21")


# --------------------------------------------------------------------------- door validation


DOOR_CASES = [
    ([], "The request body must be a JSON object.", None),
    ({"messages": [{"role": "user", "content": "hi"}]}, "'model' must be a non-empty string.",
     "model"),
    ({"model": "", "messages": [{"role": "user", "content": "hi"}]},
     "'model' must be a non-empty string.", "model"),
    ({"model": "m"}, "'messages' must be a non-empty array.", "messages"),
    ({"model": "m", "messages": []}, "'messages' must be a non-empty array.", "messages"),
    ({"model": "m", "messages": "hi"}, "'messages' must be a non-empty array.", "messages"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"},
     "'stream' must be a boolean.", "stream"),
]


@pytest.mark.parametrize(("body", "message", "param"), DOOR_CASES)
@pytest.mark.parametrize("backend", list(Backend))
def test_openai_door_validation(backend: Backend, body: Any, message: str,
                                param: str | None) -> None:
    assert rejected(Dialect.OPENAI, backend, body) == (400, openai_error(message, param))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        *[(body if not isinstance(body, dict) else {**body, "max_tokens": 5}, message)
          for body, message, _ in DOOR_CASES],
        ({"model": "m", "messages": [{"role": "user", "content": "x"}]},
         "'max_tokens' must be a positive integer."),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
         "'max_tokens' must be a positive integer."),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": "9"},
         "'max_tokens' must be a positive integer."),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": True},
         "'max_tokens' must be a positive integer."),
    ],
)
@pytest.mark.parametrize("backend", list(Backend))
def test_anthropic_door_validation(backend: Backend, body: Any, message: str) -> None:
    assert rejected(Dialect.ANTHROPIC, backend, body) == (400, anthropic_error(message))


# --------------------------------------------------------------------------- unsupported


@pytest.mark.parametrize(
    ("param", "value"),
    [
        ("n", 2),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("logit_bias", {"50256": -100}),
        ("presence_penalty", 0.5),
        ("frequency_penalty", 1),
        ("response_format", {"type": "json_object"}),
        ("seed", 7),
        ("audio", {"voice": "alloy"}),
        ("modalities", ["text", "audio"]),
        ("prediction", {"type": "content", "content": "x"}),
        ("reasoning_effort", "low"),
        ("web_search_options", {}),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("frobnicate", 1),
    ],
)
def test_openai_params_unsupported_by_anthropic(param: str, value: object) -> None:
    status, body = rejected(Dialect.OPENAI, Backend.ANTHROPIC, {**OPENAI_BODY, param: value})
    assert (status, body) == (400, openai_error(
        f"The parameter '{param}' is not supported by Anthropic.", param))


@pytest.mark.parametrize(
    ("param", "value"),
    [("n", 1), ("logprobs", False), ("logit_bias", {}), ("presence_penalty", 0),
     ("frequency_penalty", 0.0), ("response_format", {"type": "text"}), ("seed", None),
     ("modalities", ["text"]), ("store", True), ("metadata", {"a": "b"}),
     ("service_tier", "auto"), ("stream_options", {"include_usage": True})],
)
def test_neutral_or_dropped_values_are_accepted_for_anthropic(param: str, value: object) -> None:
    upstream = translator_for(Dialect.OPENAI, Backend.ANTHROPIC).request(
        {**OPENAI_BODY, param: value}, upstream_model="up", api_version=None)
    assert param not in json.loads(upstream.body)


def test_unknown_parameter_with_odd_name_is_not_echoed() -> None:
    name = "x" * 100
    assert rejected(Dialect.OPENAI, Backend.ANTHROPIC, {**OPENAI_BODY, name: 1}) == (
        400, openai_error("The request has a parameter Anthropic does not support.", None))
    assert rejected(Dialect.ANTHROPIC, Backend.OPENAI, {**ANTHROPIC_BODY, name: 1}) == (
        400, anthropic_error("The request has a parameter OpenAI does not support."))


@pytest.mark.parametrize(
    "param",
    ["user", "store", "service_tier", "metadata", "logit_bias", "parallel_tool_calls",
     "logprobs", "top_logprobs", "audio", "modalities", "reasoning_effort",
     "web_search_options", "functions", "function_call"],
)
def test_openai_params_unsupported_by_mistral(param: str) -> None:
    assert rejected(Dialect.OPENAI, Backend.MISTRAL, {**OPENAI_BODY, param: "x"}) == (
        400, openai_error(f"The parameter '{param}' is not supported by Mistral.", param))


@pytest.mark.parametrize(
    ("backend", "name"),
    [(Backend.OPENAI, "OpenAI"), (Backend.OPENAI_COMPATIBLE, "the OpenAI-compatible backend"),
     (Backend.MISTRAL, "Mistral"), (Backend.AZURE, "Azure OpenAI")],
)
@pytest.mark.parametrize(
    ("param", "value"),
    [("top_k", 5), ("thinking", {"type": "enabled", "budget_tokens": 1024}),
     ("container", "c"), ("mcp_servers", []), ("frobnicate", 1)],
)
def test_anthropic_params_unsupported_by_openai_backends(
    backend: Backend, name: str, param: str, value: object
) -> None:
    assert rejected(Dialect.ANTHROPIC, backend, {**ANTHROPIC_BODY, param: value}) == (
        400, anthropic_error(f"The parameter '{param}' is not supported by {name}."))


def test_disable_parallel_tool_use_unsupported_by_mistral() -> None:
    body = {**ANTHROPIC_BODY,
            "tools": [{"name": "f", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "auto", "disable_parallel_tool_use": True}}
    assert rejected(Dialect.ANTHROPIC, Backend.MISTRAL, body) == (400, anthropic_error(
        "The parameter 'tool_choice.disable_parallel_tool_use' is not supported by Mistral."))


@pytest.mark.parametrize(
    ("front", "backend", "body", "message", "param"),
    [
        (Dialect.OPENAI, Backend.ANTHROPIC, {**OPENAI_BODY, "temperature": 1.5},
         "'temperature' must be between 0 and 1 for Anthropic.", "temperature"),
        (Dialect.OPENAI, Backend.ANTHROPIC, {**OPENAI_BODY, "temperature": "hot"},
         "'temperature' must be a number.", "temperature"),
        (Dialect.OPENAI, Backend.ANTHROPIC,
         {**OPENAI_BODY, "messages": [{"role": "user", "content": [
             {"type": "input_audio", "input_audio": {"data": "x", "format": "wav"}}]}]},
         "Only 'text' and 'image_url' content parts are supported by Anthropic.",
         "messages[0].content[0].type"),
        (Dialect.OPENAI, Backend.ANTHROPIC,
         {**OPENAI_BODY, "messages": [{"role": "user", "content": [
             {"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}]}]},
         "'messages[0].content[0].image_url.url' must be an https URL or a data: URL.",
         "messages[0].content[0].image_url.url"),
        (Dialect.OPENAI, Backend.ANTHROPIC,
         {**OPENAI_BODY, "tools": [{"type": "custom", "custom": {"name": "x"}}]},
         "Only 'function' tools are supported by Anthropic.", "tools[0].type"),
        (Dialect.OPENAI, Backend.ANTHROPIC,
         {**OPENAI_BODY, "messages": [{"role": "function", "name": "f", "content": "x"}]},
         "Messages with role 'function' are not supported by Anthropic; use 'tool' messages.",
         "messages[0].role"),
        (Dialect.OPENAI, Backend.ANTHROPIC,
         {**OPENAI_BODY, "messages": [{"role": "system", "content": "only system"}]},
         "'messages' must contain at least one user or assistant message.", "messages"),
        (Dialect.OPENAI, Backend.ANTHROPIC,
         {**OPENAI_BODY, "messages": [
             {"role": "user", "content": "hi"},
             {"role": "assistant", "tool_calls": [{"id": "c", "type": "function", "function": {
                 "name": "f", "arguments": "[1]"}}]}]},
         "'messages[1].tool_calls[0].function.arguments' must be a JSON object encoded as a "
         "string.", "messages[1].tool_calls[0].function.arguments"),
        (Dialect.OPENAI, Backend.ANTHROPIC, {**OPENAI_BODY, "stop": 5},
         "'stop' must be a string or an array of strings.", "stop"),
        (Dialect.OPENAI, Backend.OPENAI, {**OPENAI_BODY, "stream_options": []},
         "'stream_options' must be an object.", "stream_options"),
        (Dialect.OPENAI, Backend.MISTRAL, {**OPENAI_BODY, "max_completion_tokens": 0},
         "'max_completion_tokens' must be a positive integer.", "max_completion_tokens"),
    ],
)
def test_openai_door_translation_errors(front: Dialect, backend: Backend, body: dict[str, Any],
                                        message: str, param: str) -> None:
    assert rejected(front, backend, body) == (400, openai_error(message, param))


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({**ANTHROPIC_BODY, "messages": [{"role": "user", "content": [
            {"type": "document", "source": {"type": "text", "data": "x"}}]}]},
         "Only 'text', 'image' and 'tool_result' content blocks are supported by OpenAI."),
        ({**ANTHROPIC_BODY, "tools": [{"type": "web_search_20250305", "name": "web_search"}]},
         "Only client tools (name, description, input_schema) are supported by OpenAI."),
        ({**ANTHROPIC_BODY, "messages": [{"role": "system", "content": "x"}]},
         "'messages[0].role' must be 'user' or 'assistant'."),
        ({**ANTHROPIC_BODY, "system": [{"type": "image"}]},
         "'system' must be a string or an array of text blocks."),
        ({**ANTHROPIC_BODY, "tool_choice": {"type": "sometimes"},
          "tools": [{"name": "f", "input_schema": {}}]},
         "'tool_choice.type' must be 'auto', 'any', 'tool' or 'none'."),
    ],
)
def test_anthropic_door_translation_errors(body: dict[str, Any], message: str) -> None:
    assert rejected(Dialect.ANTHROPIC, Backend.OPENAI, body) == (400, anthropic_error(message))


# --------------------------------------------------------------------------- provider errors


OPENAI_429 = b'{"error":{"message":"Rate limit reached for gpt-4o in organization org-x.",' \
    b'"type":"requests","param":null,"code":"rate_limit_exceeded"}}'
ANTHROPIC_400 = b'{"type":"error","error":{"type":"invalid_request_error",' \
    b'"message":"max_tokens: 100000 > 8192, which is the maximum"}}'
MISTRAL_422 = (b'{"object":"error","message":{"detail":[{"type":"extra_forbidden",'
               b'"loc":["body","user"],"msg":"Extra inputs are not permitted","input":"u"}]},'
               b'"type":"invalid_request_error","param":null,"code":null}')
OPENAI_401 = (b'{"error":{"message":"Incorrect API key provided: sk-proj-****************abcd.",'
              b'"type":"invalid_request_error","param":null,"code":"invalid_api_key"}}')


@pytest.mark.parametrize(
    ("status", "body", "client_status", "openai", "anthropic"),
    [
        (400, ANTHROPIC_400, 400,
         openai_error("max_tokens: 100000 > 8192, which is the maximum", None),
         anthropic_error("max_tokens: 100000 > 8192, which is the maximum")),
        (422, MISTRAL_422, 400,
         openai_error("body.user: Extra inputs are not permitted", None),
         anthropic_error("body.user: Extra inputs are not permitted")),
        (404, b'{"error":{"message":"The model `x` does not exist","code":"model_not_found"}}',
         404,
         openai_error("The model `x` does not exist", None, "not_found_error", "not_found"),
         anthropic_error("The model `x` does not exist", "not_found_error")),
        (413, b'{"error":"request too large"}', 413,
         openai_error("request too large", None, "invalid_request_error", "payload_too_large"),
         anthropic_error("request too large", "request_too_large")),
        # A 429 describes the shared account (organization, limits): never shown.
        (429, OPENAI_429, 429,
         openai_error("The provider's rate limit was reached; retry later.", None,
                      "rate_limit_error", "rate_limited"),
         anthropic_error("The provider's rate limit was reached; retry later.",
                         "rate_limit_error")),
        (429, b"{}", 429,
         openai_error("The provider's rate limit was reached; retry later.", None,
                      "rate_limit_error", "rate_limited"),
         anthropic_error("The provider's rate limit was reached; retry later.",
                         "rate_limit_error")),
        (401, OPENAI_401, 502,
         openai_error("The provider rejected the gateway's credential.", None,
                      "upstream_error", "provider_error"),
         anthropic_error("The provider rejected the gateway's credential.", "api_error")),
        (403, b"<html>forbidden</html>", 502,
         openai_error("The provider rejected the gateway's credential.", None,
                      "upstream_error", "provider_error"),
         anthropic_error("The provider rejected the gateway's credential.", "api_error")),
        (500, b'{"error":{"message":"boom"}}', 502,
         openai_error("The provider failed with status 500.", None,
                      "upstream_error", "provider_error"),
         anthropic_error("The provider failed with status 500.", "api_error")),
        (400, b"<html>Bad Request</html>", 502,
         openai_error("The provider failed with status 400.", None,
                      "upstream_error", "provider_error"),
         anthropic_error("The provider failed with status 400.", "api_error")),
        (429, b"", 502,
         openai_error("The provider failed with status 429.", None,
                      "upstream_error", "provider_error"),
         anthropic_error("The provider failed with status 429.", "api_error")),
        (409, b'{"error":{"message":"conflict"}}', 502,
         openai_error("The provider failed with status 409.", None,
                      "upstream_error", "provider_error"),
         anthropic_error("The provider failed with status 409.", "api_error")),
        (529, b'{"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}',
         503,
         openai_error("The provider is overloaded; retry later.", None,
                      "service_unavailable", "gateway_unavailable"),
         anthropic_error("The provider is overloaded; retry later.", "overloaded_error")),
    ],
)
def test_provider_error_mapping(status: int, body: bytes, client_status: int,
                                openai: dict[str, Any], anthropic: dict[str, Any]) -> None:
    got_status, got = map_provider_error(Dialect.OPENAI, status, body)
    assert (got_status, json.loads(got)) == (client_status, openai)
    got_status, got = map_provider_error(Dialect.ANTHROPIC, status, body)
    assert (got_status, json.loads(got)) == (client_status, anthropic)
    for front, backend in TRANSLATORS:
        translator = translator_for(front, backend)
        expected = openai if front is Dialect.OPENAI else anthropic
        mapped_status, mapped = translator.error(status, body, {})
        assert (mapped_status, json.loads(mapped)) == (client_status, expected)


@pytest.mark.parametrize(
    "secret",
    ["sk-ant-api03-abcdefghijklmnop", "sk-proj-****abcd", "Bearer abc.def.ghi",
     "0123456789abcdef0123456789abcdef", "key_live_1234567890"],
)
def test_provider_messages_never_echo_keys(secret: str) -> None:
    body = json.dumps({"error": {"message": f"Key {secret} is not allowed here"}}).encode()
    for status in (400, 404, 413):
        _, mapped = map_provider_error(Dialect.OPENAI, status, body)
        assert secret not in mapped.decode()
        assert "[redacted]" in json.loads(mapped)["error"]["message"]


def test_scrub_keeps_model_names_and_bounds_length() -> None:
    assert scrub("model claude-3-5-sonnet-20241022 not found") == \
        "model claude-3-5-sonnet-20241022 not found"
    assert len(scrub("word " * 500)) == 500


def test_scrub_removes_provider_account_ids() -> None:
    said = ("Project proj_AbCdEf123456 of organization org-XyZ987654 (account "
            "3f2b8c1e-9a4d-4e6f-8b7a-1c2d3e4f5a6b) cannot use gpt-4o.")
    assert scrub(said) == ("Project [redacted] of organization [redacted] (account "
                           "[redacted]) cannot use gpt-4o.")


_MIB = 1 << 20


@pytest.mark.parametrize(
    ("hostile", "expected"),
    [
        # One unbroken token: the quadratic masked-key pattern took hours on this.
        ("a" * _MIB, "..."),
        ("*" * _MIB, "..."),
        ("a*" * (_MIB // 2), "..."),
        ("sk-" * (_MIB // 3), "..."),
        # Many tokens: cut to the scanned bound, the cut token dropped, then to 500.
        ("ab " * (_MIB // 3), ("ab " * 200)[:497] + "..."),
        # A masked key right at the cut is dropped, never shown half.
        ("x " * 999 + "sk-abc***wxyz", ("x " * 250)[:497] + "..."),
    ],
    ids=["letters", "stars", "letter-star", "key-prefixes", "words", "key-at-cut"],
)
def test_scrub_is_linear_and_bounded_on_hostile_input(hostile: str, expected: str) -> None:
    assert scrub(hostile) == expected


def test_scrub_redacts_a_masked_key_inside_a_long_message() -> None:
    text = "Incorrect API key provided: sk-abc***wxyz. " + "pad " * 100
    assert scrub(text).startswith("Incorrect API key provided: [redacted] pad pad")


def test_retry_after_headers() -> None:
    assert retry_after_headers({"Retry-After": " 7 ", "x-other": "1"}) == (("retry-after", "7"),)
    assert retry_after_headers({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == (
        ("retry-after", "Wed, 21 Oct 2015 07:28:00 GMT"),)
    assert retry_after_headers({"retry-after": "1\r\nset-cookie: x"}) == ()
    assert retry_after_headers({}) == ()


def test_deeply_nested_provider_error_is_a_plain_provider_failure() -> None:
    body = b'{"error":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    status, mapped = map_provider_error(Dialect.OPENAI, 400, body)
    assert (status, json.loads(mapped)) == (502, openai_error(
        "The provider failed with status 400.", None, "upstream_error", "provider_error"))
