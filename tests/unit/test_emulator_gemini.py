"""The emulator's Gemini shape: Google's key answers, validation, replies and usage,
alt=sse streams, the weather tool trick, and faults through the control API."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from extproc.emulator import EmulatorConfig, make_app
from extproc.emulator.app import key_fingerprint, shapes_named

KEY = "sk-emu-gemini-key"
GENERATE = "/v1beta/models/gemini-2.0-flash:generateContent"
STREAM = "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
HEADERS = {"x-goog-api-key": KEY}
REPLY = "Hello from the emulator."
Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    app = make_app(EmulatorConfig(keys=frozenset({KEY})), shapes_named(["openai", "gemini"]))
    test_client: Client = TestClient(TestServer(app))
    await test_client.start_server()
    yield test_client
    await test_client.close()


def body(text: str = "Hello there", **extra: Any) -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": text}]}], **extra}


async def post(client: Client, path: str, payload: Any, headers: dict[str, str] | None = None,
               ) -> tuple[int, Any]:
    resp = await client.post(path, json=payload, headers=HEADERS if headers is None else headers)
    return resp.status, await resp.json()


def google_error(code: int, status: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "status": status}}


# --------------------------------------------------------------------------- keys


async def test_missing_key_is_403_and_wrong_key_is_400_api_key_invalid(client: Client) -> None:
    status, missing = await post(client, GENERATE, body(), headers={})
    assert status == 403
    assert missing["error"]["status"] == "PERMISSION_DENIED"
    assert missing["error"]["message"].startswith("Method doesn't allow unregistered callers")
    status, wrong = await post(client, GENERATE, body(), headers={"x-goog-api-key": "sk-bad-1"})
    assert (status, wrong) == (400, {"error": {
        "code": 400, "message": "API key not valid. Please pass a valid API key.",
        "status": "INVALID_ARGUMENT", "details": [{
            "@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
            "domain": "googleapis.com",
            "metadata": {"service": "generativelanguage.googleapis.com"}}]}})
    # A bearer token is not Google's header.
    status, _ = await post(client, GENERATE, body(), headers={"authorization": f"Bearer {KEY}"})
    assert status == 403


async def test_key_in_the_query_is_accepted_and_redacted_in_records(client: Client) -> None:
    status, _ = await post(client, f"{GENERATE}?key={KEY}", body(), headers={})
    assert status == 200
    await post(client, GENERATE, body())
    records = (await (await client.get("/_emulator/requests")).json())["requests"]
    assert records[0]["query"] == f"key={key_fingerprint(KEY)}"
    assert records[1]["headers"]["x-goog-api-key"] == key_fingerprint(KEY)
    assert KEY not in json.dumps(records)


# --------------------------------------------------------------------------- replies


async def test_generate_content_reply_and_usage(client: Client) -> None:
    resp = await client.post(GENERATE, json=body(systemInstruction={"parts": [{"text": "Be."}]}),
                             headers=HEADERS)
    assert resp.status == 200
    assert not [name for name in resp.headers if name.lower().startswith(
        ("openai-", "x-ratelimit-", "anthropic-"))]
    answer = await resp.json()
    assert answer == {
        "candidates": [{"content": {"parts": [{"text": REPLY}], "role": "model"},
                        "index": 0, "finishReason": "STOP"}],
        # "Hello there" + "Be." = 14 characters: 4 tokens
        "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 4,
                          "totalTokenCount": 8,
                          "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 4}]},
        "modelVersion": "gemini-2.0-flash", "responseId": "emu-gemini-1",
    }


async def test_max_output_tokens_candidates_and_thinking_models(client: Client) -> None:
    status, answer = await post(
        client, "/v1beta/models/gemini-2.5-pro:generateContent",
        body(generationConfig={"maxOutputTokens": 10, "candidateCount": 3}))
    assert status == 200
    assert [(c["index"], c["content"]["parts"], c["finishReason"])
            for c in answer["candidates"]] == [
        (i, [{"text": "Hello from"}], "MAX_TOKENS") for i in range(3)]
    assert answer["usageMetadata"] == {
        "promptTokenCount": 3, "candidatesTokenCount": 6, "thoughtsTokenCount": 8,
        "totalTokenCount": 17, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 3}]}
    # Thinking counts within maxOutputTokens, as at Google: nothing is left for words.
    _, spent = await post(client, "/v1beta/models/gemini-2.5-flash:generateContent",
                          body(generationConfig={"maxOutputTokens": 5}))
    assert spent["candidates"][0]["finishReason"] == "MAX_TOKENS"
    assert spent["candidates"][0]["content"]["parts"] == [{"text": ""}]
    assert (spent["usageMetadata"]["candidatesTokenCount"],
            spent["usageMetadata"]["thoughtsTokenCount"]) == (0, 5)


@pytest.mark.parametrize(("payload", "message"), [
    (body(model="gemini"), 'Invalid JSON payload received. Unknown name "model": Cannot find '
                           "field."),
    (body(generationConfig={"max_tokens": 5}),
     'Invalid JSON payload received. Unknown name "max_tokens" at \'generation_config\': '
     "Cannot find field."),
    ({"contents": []}, "* GenerateContentRequest.contents: contents is not specified"),
    ({"contents": [{"role": "assistant", "parts": [{"text": "x"}]}]},
     "* GenerateContentRequest.contents[0].role: Please use a valid role: user, model."),
    ({"contents": [{"role": "user", "parts": []}]},
     "* GenerateContentRequest.contents[0].parts: contents.parts must not be empty."),
    ({"contents": [{"role": "user", "parts": [{"text": "a", "inlineData": {}}]}]},
     "* GenerateContentRequest.contents[0].parts[0].data: required oneof field 'data' must "
     "have one initialized field"),
    (body(generationConfig={"maxOutputTokens": 0}),
     "* GenerateContentRequest.generation_config.max_output_tokens: must be a positive "
     "integer"),
    (body(generationConfig={"candidateCount": 9}),
     "* GenerateContentRequest.generation_config.candidate_count: must be between 1 and 8"),
    (body(tools=[{"functionDeclarations": [{"name": "f", "parameters": {
        "type": "object", "properties": {}}}]}]),
     "* GenerateContentRequest.tools[0].function_declarations[0].parameters.properties: "
     "should be non-empty for OBJECT type"),
])
async def test_invalid_requests_get_googles_400(client: Client, payload: Any,
                                                message: str) -> None:
    assert await post(client, GENERATE, payload) == (
        400, google_error(400, "INVALID_ARGUMENT", message))


async def test_unknown_method_is_404(client: Client) -> None:
    status, answer = await post(client, "/v1beta/models/gemini-2.0-flash:embedContent", body())
    assert status == 404
    assert answer["error"]["status"] == "NOT_FOUND"


# --------------------------------------------------------------------------- tools

TOOLS = [{"functionDeclarations": [
    {"name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}},
    {"name": "get_weather"}]}]


async def test_weather_trick_calls_a_function(client: Client) -> None:
    status, answer = await post(client, GENERATE, body("Weather in Paris?", tools=TOOLS))
    assert status == 200
    assert answer["candidates"] == [{
        "content": {"parts": [{"functionCall": {"name": "get_weather",
                                                "args": {"city": "Paris"}}}], "role": "model"},
        "index": 0, "finishReason": "STOP"}]
    assert answer["usageMetadata"]["candidatesTokenCount"] == 4
    _, allowed = await post(client, GENERATE, body("weather?", tools=TOOLS, toolConfig={
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["lookup"]}}))
    assert allowed["candidates"][0]["content"]["parts"][0]["functionCall"]["name"] == "lookup"


@pytest.mark.parametrize("payload", [
    body("Weather in Paris?", tools=TOOLS, toolConfig={"functionCallingConfig": {"mode": "NONE"}}),
    {"tools": TOOLS, "contents": [
        {"role": "user", "parts": [{"text": "Weather?"}]},
        {"role": "model", "parts": [{"functionCall": {"name": "get_weather", "args": {}}}]},
        {"role": "user", "parts": [{"functionResponse": {"name": "get_weather",
                                                         "response": {"t": 1}}}]}]},
    body("Weather in Paris?"),
])
async def test_no_function_call_without_tools_or_after_a_result(client: Client,
                                                                payload: Any) -> None:
    status, answer = await post(client, GENERATE, payload)
    assert status == 200
    assert answer["candidates"][0]["content"]["parts"] == [{"text": REPLY}]


# --------------------------------------------------------------------------- streams


async def test_alt_sse_stream_framing_and_final_usage(client: Client) -> None:
    resp = await client.post(f"{STREAM}?alt=sse", json=body(), headers=HEADERS)
    assert resp.status == 200
    assert resp.content_type == "text/event-stream"
    raw = (await resp.read()).decode()
    assert raw.endswith("\r\n\r\n")
    events = [json.loads(block.removeprefix("data: ")) for block in raw.split("\r\n\r\n")[:-1]]
    assert ["".join(p["text"] for p in e["candidates"][0]["content"]["parts"])
            for e in events] == ["Hello", " from", " the", " emulator."]
    assert [e["candidates"][0].get("finishReason") for e in events] == [None, None, None, "STOP"]
    assert [e["usageMetadata"] for e in events[:-1]] == [
        {"promptTokenCount": 3, "totalTokenCount": 3}] * 3
    assert events[-1]["usageMetadata"]["candidatesTokenCount"] == 4


async def test_stream_without_alt_sse_is_one_json_array(client: Client) -> None:
    status, answer = await post(client, STREAM, body())
    assert status == 200
    assert isinstance(answer, list)
    assert [e["candidates"][0]["content"]["parts"][0]["text"] for e in answer] == [
        "Hello", " from", " the", " emulator."]


async def test_streamed_function_call_is_one_event(client: Client) -> None:
    resp = await client.post(f"{STREAM}?alt=sse", json=body("weather?", tools=TOOLS),
                             headers=HEADERS)
    [event] = (await resp.read()).decode().split("\r\n\r\n")[:-1]
    candidate = json.loads(event.removeprefix("data: "))["candidates"][0]
    assert candidate["content"]["parts"] == [
        {"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}}]
    assert candidate["finishReason"] == "STOP"


# --------------------------------------------------------------------------- faults


async def test_queued_faults_answer_in_googles_shape(client: Client) -> None:
    await client.post("/_emulator/faults", json={"status": 429, "retry_after": 4})
    resp = await client.post(GENERATE, json=body(), headers=HEADERS)
    assert (resp.status, resp.headers["retry-after"]) == (429, "4")
    assert await resp.json() == google_error(
        429, "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details.")
    await client.post("/_emulator/faults", json={"status": 500, "message": "kaput"})
    assert await post(client, GENERATE, body()) == (500, google_error(500, "INTERNAL", "kaput"))


async def test_stream_error_fault_is_a_google_error_event(client: Client) -> None:
    await client.post("/_emulator/faults", json={"stream_error": "overloaded"})
    resp = await client.post(f"{STREAM}?alt=sse", json=body(), headers=HEADERS)
    blocks = (await resp.read()).decode().split("\r\n\r\n")[:-1]
    assert len(blocks) == 2
    assert json.loads(blocks[1].removeprefix("data: ")) == google_error(
        500, "INTERNAL", "overloaded")
